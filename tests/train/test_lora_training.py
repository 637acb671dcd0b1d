"""LoRA training end to end on the tiny demo: only the adapters train (the base stays bitwise), the
KL reference at RL start is the base itself, a 2-step RL run resumes exactly, export to PEFT and
to Hugging Face files, init.adapter, the refusals, and the shipped `:lora` variant."""

import importlib
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax.metrics import read_metrics
from bgpo_jax.models import hf, lora, transformer
from bgpo_jax.tools import export as export_lib
from bgpo_jax.train.loop import train
from bgpo_jax.train.run import build_run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rl_recipes import tiny  # noqa: E402

TIMING = ("time/", "perf/")


def tiny_lora(**kw):
  """tiny()'s 2-layer demo, 2 RL steps of BGPO with mu = 2 and a KL term (old and reference terms
  both run), adapters of rank 4 on every LLaDA block matrix."""
  c = tiny("bgpo", mu=2, kl=0.1)
  c.total_steps = 2
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.lora.targets = "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out"
  for k, v in kw.items():
    setattr(c.lora, k, v)
  return c


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _strip(rows):
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(workdir, the run after training, its base before training, its adapters before training)."""
  workdir = str(tmp_path_factory.mktemp("lora") / "run")
  run = build_run(tiny_lora(), workdir)
  base0, adapters0 = _host(run.lora.params), _host(run.state.params)
  # The reference at RL start is the frozen base itself: the same buffers, no copy.
  assert run.reference.params is run.lora.params
  train(run)
  return workdir, run, base0, adapters0


def test_only_the_adapters_train(straight):
  _, run, base0, adapters0 = straight
  base, adapters = _host(run.lora.params), _host(run.state.params)
  assert jax.tree.structure(base) == jax.tree.structure(base0)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base0)))
  assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(base))  # lora.base_dtype
  assert set(adapters) == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
  assert not any(np.any(ab["b"]) for ab in adapters0.values())  # B = 0 at the start
  assert all(np.any(ab["b"]) for ab in adapters.values())  # every B moved
  # The optimizer state holds the adapters' moments only.
  n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  n_opt = sum(x.size for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0)
  assert n_opt == 2 * n_adapter
  assert run.reference.params is run.lora.params  # still no copy after training
  rows = read_metrics(straight[0])
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in rows)


def test_resume_reproduces_the_uninterrupted_run(straight, tmp_path):
  workdir = straight[0]
  half = str(tmp_path / "half")
  train(build_run(tiny_lora(), half), stop_at=1)
  resumed = build_run(tiny_lora(), half)
  assert resumed.start_step == 1 and resumed.reference.params is resumed.lora.params
  train(resumed)
  assert _strip(read_metrics(half)) == _strip(read_metrics(workdir))
  # A resume onto another base is refused (here: the checkpoint's recorded base edited).
  host = {"lora_base": dict(resumed.lora.record(), fingerprint=resumed.lora.fingerprint + 1)}
  with pytest.raises(ckpt_lib.RunError, match="resume with the same init.checkpoint"):
    resumed.lora.check_resume(host, "ckpt")


def test_export_peft_and_hf(straight, tmp_path):
  workdir, run, _, _ = straight
  out = tmp_path / "peft"
  assert export_lib.main([workdir, str(out), "--format=peft"]) == 0
  adapters, spec = lora.load_peft(out, run.model_cfg)
  assert spec == run.lora.spec
  want = _host(run.state.params)
  assert jax.tree.structure(_host(adapters)) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(adapters)), jax.tree.leaves(want)))

  c = tiny_lora()
  c.init.checkpoint = workdir  # a LoRA workdir holds no weights: export them first
  with pytest.raises(ValueError, match="is a LoRA run.*--format=hf"):
    build_run(c, str(tmp_path / "from_lora_run"))

  out_hf = tmp_path / "hf"
  assert export_lib.main([workdir, str(out_hf), "--format=hf"]) == 0
  _, params = hf.load(str(out_hf), dtype=None)
  merged = _host(lora.merge(run.model_cfg, run.lora.params, run.state.params, run.lora.spec))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(params)), jax.tree.leaves(merged)))


def test_export_refuses_peft_of_a_full_fine_tuning_run(tmp_path, capsys):
  c = tiny("bgpo", mu=1, kl=0.0)
  c.total_steps = 1
  workdir = str(tmp_path / "full")
  train(build_run(c, workdir))
  assert export_lib.main([workdir, str(tmp_path / "out"), "--format=peft"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "full fine-tuning run" in err and "--format=hf" in err


def test_init_adapter_starts_from_the_file_and_copies_it_as_the_reference(straight, tmp_path):
  workdir, run, _, _ = straight
  out = tmp_path / "peft"
  export_lib.export(workdir, str(out), "peft")
  c = tiny_lora()
  c.init.adapter = str(out)
  new = build_run(c, str(tmp_path / "from_adapter"))
  got, want = _host(new.state.params), _host(run.state.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  ref = new.reference.params
  assert isinstance(ref, transformer.Adapted) and ref.base is new.lora.params
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(ref.adapters)), jax.tree.leaves(want)))
  assert jax.tree.leaves(ref.adapters)[0] is not jax.tree.leaves(new.state.params)[0]  # a copy: the step donates
  c.lora.rank = 8
  with pytest.raises(config_lib.ConfigError, match="holds r=4.*set --config.lora.rank=4"):
    build_run(c, str(tmp_path / "other_rank"))


def test_dropout_trains_with_masks_keyed_by_row(straight, tmp_path):
  """lora.dropout > 0: the trained forward drops the adapters' inputs (the loss moves off the
  dropout-free run's), with masks keyed by row seed, so the micro-batching leaves the run as it was
  (the whole batch at once vs micro-batches of 2 rows); rollouts run unmerged (sampler_weights)."""
  runs = {}
  for name, micro in (("whole", 0), ("micro", 2)):
    c = tiny_lora(dropout=0.25, sampler_weights="unmerged")
    c.rl.micro_batch_per_device = micro
    train(build_run(c, str(tmp_path / name)))
    runs[name] = read_metrics(str(tmp_path / name))
  plain = read_metrics(straight[0])
  for key in ("train/loss", "train/grad_norm"):
    whole, micro = [np.array([r[key] for r in runs[n]]) for n in ("whole", "micro")]
    np.testing.assert_allclose(micro, whole, rtol=2e-5, atol=1e-7)
  # Step 1's rollouts come from the same weights (B = 0, so the loss too): B's gradient,
  # (dropout(x) @ A)^T dy, differs by the dropout alone.
  assert runs["whole"][0]["train/reward_mean"] == plain[0]["train/reward_mean"]
  assert abs(runs["whole"][0]["train/grad_norm"] / plain[0]["train/grad_norm"] - 1) > 1e-3


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.lora, "dropout", 1.0), "config.lora.dropout 1.0 must lie in"),
    (lambda c: setattr(c.lora, "sampler_weights", "folded"), "config.lora.sampler_weights 'folded' is unknown"),
    (lambda c: setattr(c.lora, "rank", -1), "config.lora.rank -1 must be >= 0"),
    (lambda c: setattr(c.lora, "alpha", 0.0), "config.lora.alpha 0.0 must be > 0"),
    (lambda c: setattr(c.lora, "base_dtype", "float16"), "config.lora.base_dtype 'float16' is unknown"),
    (lambda c: setattr(c.lora, "targets", "q_proj,,q_proj"), "config.lora.targets 'q_proj,,q_proj' must be"),
    (lambda c: (setattr(c.lora, "rank", 0), setattr(c.init, "adapter", "/tmp")),
     "config.init.adapter '/tmp' needs LoRA training"),
])
def test_config_errors(mutate, message):
  c = tiny_lora()
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("variant", ["lora", "diffu_grpo+lora"])
@pytest.mark.parametrize("name", ["math", "code", "countdown", "sudoku", "dream_math"])
def test_lora_variant_of_every_task_config_validates(name, variant, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config(variant)
  c.task.data_dir = c.tokenizer.path = str(tmp_path)
  c.init.checkpoint = ""
  if name == "code":
    c.task.train_file = str(tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").write_text("")
  config_lib.validate(c, data_parallel_size=8)
  assert (c.lora.rank, c.lora.alpha, config_lib.lora_targets(c)) == (
      128, 64.0, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"))
  assert c.rl.objective == ("diffu_grpo" if variant.startswith("diffu_grpo") else "bgpo")
  with pytest.raises(ValueError, match="variant 'lorax' is unknown"):
    importlib.import_module(f"configs.{name}").get_config("lorax")
