"""config.validate: every numeric key has a range rule, a bad value is one ConfigError naming the
key, and every shipped config still validates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import objectives
from bgpo_jax.data import dataset

ROOT = Path(__file__).resolve().parents[1]
RULES = {key: kind for key, kind, _, _ in config_lib.NUMERIC_RULES}


def _load(spec: str):
  return config_lib._load_config_file(str(ROOT / "configs" / spec))


DEMO = _load("demo.py")  # validates without data files


def _demo():
  return DEMO.copy_and_resolve_references()


def _set(c, key: str, value) -> None:
  *sections, leaf = key.split(".")
  node = c
  for s in sections:
    node = node[s]
  node[leaf] = value


def _numeric_keys(c, prefix: str = "") -> list[str]:
  """Keys whose value (or placeholder type) is an int or a float, or a tuple of numbers."""
  out = []
  for k in c.keys():
    v = c[k]
    if hasattr(v, "keys"):
      out += _numeric_keys(v, f"{prefix}{k}.")
      continue
    t = c.get_type(k)
    if t in (int, float) or (isinstance(v, tuple) and v and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
      out.append(prefix + k)
  return out


def _rejects(c, key: str, *, data_parallel_size: int | None = 1) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, data_parallel_size=data_parallel_size)
  message = str(e.value)
  assert f"config.{key} " in message and "\n" not in message, message
  return message


def test_every_numeric_key_of_base_config_has_a_range_rule():
  # config.rl.<objective> sections hold an objective's Hparams, which check their own ranges.
  sections = tuple(f"rl.{n}." for n in objectives.names())
  numeric = {k for k in _numeric_keys(config_lib.base_config()) if not k.startswith(sections)}
  assert {"seed", "optim.learning_rate", "model.d_model", "rl.clip_eps", "rollout.prompt_buckets",
          "mesh.shape", "optim.max_nonfinite_steps"} <= numeric  # the walk sees placeholders and tuples
  assert sorted(numeric - set(RULES)) == [], "numeric keys without a rule in config.NUMERIC_RULES"
  assert sorted(set(RULES) - numeric) == [], "rules for keys base_config does not have"
  assert len(RULES) == len(config_lib.NUMERIC_RULES)  # one row per key
  base = config_lib.base_config()
  for key, kind in RULES.items():  # each rule reads the kind base_config declares
    *sections, leaf = key.split(".")
    node = base
    for s in sections:
      node = node[s]
    declared = node.get_type(leaf)
    assert kind in {int: (int, "int?"), float: (float, "float?"), tuple: ("ints",)}[declared], key
    assert (node[leaf] is None) == (kind in ("int?", "float?")), key  # placeholders may stay unset


def _bad_values(key: str, kind) -> list:
  """Values the rule of `key` must refuse, by kind: out of range, NaN / inf, wrong types that
  ml_collections lets through (a bool for an int, None for a key that is not a placeholder)."""
  if key == "rollout.prompt_buckets":
    return [(), (0, 64), (64.5,)]
  if key == "mesh.shape":
    return [(1, 1), (0, 1, 1), (-1, -1, 1), (1.5, 1, 1)]
  if kind in (int, "int?"):
    return [-1, True] + ([None] if kind is int else [])
  return [math.nan, math.inf, -1.0] + ([None] if kind is float else [])


CASES = [(key, bad) for key, kind in RULES.items() for bad in _bad_values(key, kind)]


@pytest.mark.parametrize("key, bad", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_a_bad_numeric_value_is_a_config_error_naming_the_key(key, bad):
  c = _demo()
  _set(c, key, bad)
  message = _rejects(c, key)
  assert " must " in message  # and says what the value must be


@pytest.mark.parametrize("key, value, message", [
    ("optim.learning_rate", -1e-6, "config.optim.learning_rate -1e-06 must be > 0"),
    ("optim.learning_rate", math.nan, "config.optim.learning_rate nan is not a finite number: it must be > 0"),
    ("sft.learning_rate", -3e-3, "config.sft.learning_rate -0.003 must be > 0"),
    ("sft.learning_rate", math.nan, "config.sft.learning_rate nan is not a finite number"),
    ("optim.grad_clip_norm", -1.0, "config.optim.grad_clip_norm -1.0 must be >= 0 (0 = no clipping)"),
    ("optim.warmup_steps", -5, "config.optim.warmup_steps -5 must be >= 0"),
    ("sft.steps", -300, "config.sft.steps -300 must be >= 0 (0 = no warm-up SFT)"),
    ("total_steps", True, "config.total_steps True is not an int: it must be >= 1"),
    ("optim.max_nonfinite_steps", 0, "config.optim.max_nonfinite_steps 0 must be >= 1"),
    ("rl.dual_clip", math.inf, "config.rl.dual_clip inf is not a finite number or unset"),
    ("rollout.temperature", math.nan, "config.rollout.temperature nan is not a finite number"),
    ("seed", 2**32, "config.seed 4294967296 must lie in [0, 2**32)"),
])
def test_values_the_check_used_to_let_through(key, value, message):
  c = _demo()
  _set(c, key, value)
  assert message in _rejects(c, key)


def test_edges_of_the_ranges_are_accepted():
  c = _demo()
  for key, value in (("seed", 2**32 - 1), ("eval_every", 0), ("sft.steps", 0), ("optim.warmup_steps", 0),
                     ("optim.grad_clip_norm", 0.0), ("optim.final_lr_fraction", 1.0), ("optim.b1", 0.0),
                     ("rl.clip_eps", 0.0), ("rl.dual_clip", 0.0), ("rl.kl_beta", 0.0),
                     ("rollout.threshold", 1.0), ("rollout.cfg_scale", 0.0), ("model.n_layers", 1),
                     ("mesh.shape", (1, -1, 1))):
    _set(c, key, value)
  config_lib.validate(c, data_parallel_size=1)


def test_prompt_buckets_must_hold_max_prompt_tokens():
  c = _demo()
  assert max(c.rollout.prompt_buckets) >= c.task.max_prompt_tokens
  c.rollout.prompt_buckets = (8,)  # used to cut every prompt to 8 tokens, silently
  message = _rejects(c, "rollout.prompt_buckets")
  assert ("the largest bucket 8 is below config.task.max_prompt_tokens 64" in message
          and "--config.rollout.prompt_buckets='(8, 64)'" in message
          and "--config.task.max_prompt_tokens=8" in message)
  c.task.max_prompt_tokens = 8  # either fix validates
  config_lib.validate(c, data_parallel_size=1)
  c.task.max_prompt_tokens, c.rollout.prompt_buckets = 64, (8, 64)
  config_lib.validate(c, data_parallel_size=1)


def test_truncation_modes_are_the_prompt_pipelines():
  assert dataset.TRUNCATION == ("left", "drop", "error")
  for mode in dataset.TRUNCATION:  # every mode the data side implements validates
    c = _demo()
    c.task.truncation = mode
    config_lib.validate(c, data_parallel_size=1)
  c.task.truncation = "right"
  assert f"use one of {dataset.TRUNCATION}" in _rejects(c, "task.truncation")
  with pytest.raises(ValueError, match="'right' not in"):  # and the data side refuses the same
    dataset.TaskDataset([], batch_size=1, truncation="right")


SHIPPED = ["base", "demo", "math", "code", "countdown", "sudoku", "dream_math",
           "math:diffu_grpo", "code:diffu_grpo", "countdown:diffu_grpo", "sudoku:diffu_grpo"]


@pytest.mark.parametrize("spec", SHIPPED)
def test_every_shipped_config_validates(spec, tmp_path):
  name, _, variant = spec.partition(":")
  c = _load(f"{name}.py" + (f":{variant}" if variant else ""))
  if name != "demo":  # paths are checked to exist, not read
    c.task.data_dir = c.tokenizer.path = str(tmp_path)
  if name == "code":
    c.task.train_file = str(tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").write_text("")
  for dp in (1, 8):
    config_lib.validate(c, data_parallel_size=dp)
