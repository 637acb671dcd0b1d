"""The recipe matrix: every shipped task config runs as a researcher runs it.

Each entry trains 2 RL steps and evaluates (at step 0 and at the end) on a split whose size is
not a multiple of the eval batch, from a tiny random LLaDA checkpoint in the Hugging Face layout
(bgpo_jax.tools.tiny_checkpoint), on 8 forced CPU devices with the config's OWN mesh, reading
the real data in ../shared/datasets. Only lengths and batch sizes are shrunk, and only through
`--config.*` overrides. The whole matrix runs in one subprocess (one JAX start, shared TFDS
builds). Add a variant by appending (name, config file, extra overrides) to RECIPES.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one 8-device subprocess training every shipped config

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
EVAL_ROWS = 12  # eval.num_examples: not a multiple of eval.batch_size 8 (one padded batch)
EVAL_BATCH = 8

# Lengths and batches shrunk for 2 CPU cores; everything else (mesh, objective, n's role, G,
# remat, dtypes, samplers' remasking, truncation) is the shipped config's.
SHRINK = [
    "--config.total_steps=2", "--config.eval_every=2", "--config.checkpoint_every=2",
    "--config.rl.prompts_per_step=2", "--config.rl.num_mc_samples=2",
    "--config.rollout.gen_length=32", "--config.rollout.steps=8",
    "--config.eval.gen_length=32", "--config.eval.steps=8",
    "--config.task.max_prompt_tokens=64", "--config.rollout.prompt_buckets=(64,)",
    f"--config.eval.num_examples={EVAL_ROWS}", f"--config.eval.batch_size={EVAL_BATCH}",
    "--config.eval.at_start=True", "--config.plot_at_end=False",
]

# (name, config file, extra overrides). {code_train} is a tiny code JSONL written by the test.
RECIPES = [
    ("math", "configs/math.py", []),
    ("code", "configs/code.py", ["--config.task.train_file={code_train}"]),
    ("countdown", "configs/countdown.py", []),
    ("sudoku", "configs/sudoku.py", []),
    # VRPO-OL keeps every sample's graph: the task configs' "activations" remat is refused for it.
    ("countdown_vrpo_ol", "configs/countdown.py", ["--config.rl.objective=vrpo_ol", "--config.model.remat_policy=full"]),
    # Off-policy (mu = 2, stored old terms, SPEC's clip defaults) with the frozen reference's KL.
    ("math_bgpo_mu2_kl", "configs/math.py", ["--config.rl.updates_per_batch=2", "--config.rl.kl_beta=0.05"]),
    ("sudoku_vrpo_ol_mu2_kl", "configs/sudoku.py",
     ["--config.rl.objective=vrpo_ol", "--config.model.remat_policy=full", "--config.rl.updates_per_batch=2",
      "--config.rl.kl_beta=0.05"]),
    # d1's diffu-GRPO recipe (KL 0.04, G = 6, fresh prompt masks per inner update); mu shrunk 8 -> 2
    # and 4 prompts so the 24 rows split over 8 devices.
    ("countdown_d1_diffu_grpo", "configs/countdown.py:diffu_grpo",
     ["--config.rl.updates_per_batch=2", "--config.rl.prompts_per_step=4"]),
    # The one-device LoRA variant of every task config (d1's adapters with dropout, unmerged
    # samplers in calls of 8 rows), here FSDP over 8 devices.
    ("math_lora", "configs/math.py:lora", []),
    ("code_lora", "configs/code.py:lora", ["--config.task.train_file={code_train}"]),
    ("countdown_lora", "configs/countdown.py:lora", []),
    ("sudoku_lora", "configs/sudoku.py:lora", []),
    # Dream (its real tokenizer on a tiny random Dream-7B-shaped checkpoint) through the LoRA variant.
    ("dream_math_lora", "configs/dream_math.py:lora", ["--config.init.checkpoint={dream_ckpt}"]),
]
EVAL_SETS = {"math": ["gsm8k", "math500"], "code": ["humaneval", "mbpp"], "countdown": ["countdown"],
             "sudoku": ["sudoku"], "countdown_vrpo_ol": ["countdown"], "math_bgpo_mu2_kl": ["gsm8k", "math500"],
             "sudoku_vrpo_ol_mu2_kl": ["sudoku"], "countdown_d1_diffu_grpo": ["countdown"],
             "math_lora": ["gsm8k", "math500"], "code_lora": ["humaneval", "mbpp"], "countdown_lora": ["countdown"],
             "sudoku_lora": ["sudoku"], "dream_math_lora": ["gsm8k", "math500"]}
LORA_RECIPES = ("math_lora", "code_lora", "countdown_lora", "sudoku_lora", "dream_math_lora")
DREAM_TOKENIZER = ROOT.parent / "shared" / "reference" / "dream-v0-instruct-7b"
KL_RECIPES = ("math_bgpo_mu2_kl", "sudoku_vrpo_ol_mu2_kl", "countdown_d1_diffu_grpo")
# Rows of the real test splits (../shared/datasets/README.md); each eval scores EVAL_ROWS of them.
SPLIT_ROWS = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 500, "countdown": 256, "sudoku": 500}

CODE_TRAIN = [
    {"prompt": "Write a function add(a, b) that returns a + b.", "tests": ["assert add(1, 2) == 3"]},
    {"prompt": "Write a function neg(x) that returns -x.", "tests": ["assert neg(2) == -2"]},
    {"prompt": "Write a function sq(x) that returns x * x.", "tests": ["assert sq(3) == 9"]},
]


def _tiny_dream(path: Path) -> Path:
  """A Hugging Face Dream directory: Dream-7B's vocabulary and special ids with 2 layers of width 64
  (random weights, `hf.save`) and Dream's real tokenizer files from ../shared/reference."""
  import shutil

  import jax

  from bgpo_jax.models import dream, hf
  cfg = dream.DreamConfig.preset("dream_7b", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128)
  hf.save(cfg, dream.init_params(cfg, jax.random.key(0)), path)
  for f in DREAM_TOKENIZER.iterdir():
    if f.name.startswith(("vocab", "merges", "tokenizer", "special", "added")):
      shutil.copy(f, path / f.name)
  return path


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  if not DATASETS.is_dir() or not DREAM_TOKENIZER.is_dir():
    pytest.skip(f"{DATASETS} (the shared real task data) is absent; the recipe matrix needs it")
  root = tmp_path_factory.mktemp("recipes")
  from bgpo_jax.tools import tiny_checkpoint
  ckpt = root / "tiny_llada"
  tiny_checkpoint.write(ckpt)
  code_train = root / "code_train.jsonl"
  code_train.write_text("".join(json.dumps(r) + "\n" for r in CODE_TRAIN))
  dream_ckpt = _tiny_dream(root / "tiny_dream")
  common = SHRINK + [f"--config.init.checkpoint={ckpt}", f"--config.task.data_dir={DATASETS}",
                     f"--config.task.tfds_dir={root / 'tfds'}"]
  entries = [{"name": n, "config": c,
              "overrides": common + [o.format(code_train=code_train, dream_ckpt=dream_ckpt) for o in extra]}
             for n, c, extra in RECIPES]
  out = root / "results.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  spec = {"entries": entries, "out": str(out), "root": str(root),
          "eval_workdir_of": ["sudoku", "sudoku_lora", "dream_math_lora"]}
  p = subprocess.run([sys.executable, str(ROOT / "tests" / "recipes_worker.py"), json.dumps(spec)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0 and out.exists(), (p.stdout[-3000:], p.stderr[-5000:])
  return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("name", [r[0] for r in RECIPES])
def test_recipe_runs_two_steps_and_evaluates(matrix, name):
  r = matrix[name]
  assert r["ok"], r.get("traceback")
  assert r["devices"] == 8
  assert r["mesh_resolved"] == [1, 8, 1]  # the shipped configs' FSDP layout, not an override
  rows = r["metrics"]
  assert [m["step"] for m in rows if "eval/accuracy" in m] == [0, 2]  # eval.at_start and the end
  train = [m for m in rows if "train/loss" in m]
  assert [m["step"] for m in train] == [1, 2]
  for m in train:
    assert all(isinstance(m[k], float) for k in ("train/loss", "train/grad_norm", "train/reward_mean"))
  for ev in EVAL_SETS[name]:
    # Exactly the requested rows were scored: the padding of the last batch is not.
    assert r["eval_sizes"][ev] == SPLIT_ROWS[ev]  # the whole real split was loaded
    assert rows[-1][f"eval/{ev}/num_examples"] == EVAL_ROWS, (ev, rows[-1])
    assert 0.0 <= rows[-1][f"eval/{ev}/accuracy"] <= 1.0


@pytest.mark.parametrize("name", KL_RECIPES)
def test_kl_recipes_report_a_finite_nonnegative_kl(matrix, name):
  r = matrix[name]
  assert r["ok"], r.get("traceback")
  kl = [m["train/kl"] for m in r["metrics"] if "train/kl" in m]
  assert len(kl) == 2 and all(k >= 0.0 and k == k for k in kl), kl


@pytest.mark.parametrize("name", LORA_RECIPES)
def test_lora_recipes_train_adapters(matrix, name):
  r = matrix[name]
  assert r["ok"], r.get("traceback")
  assert r["lora"] == {"r": 128, "dropout": 0.05, "sampler_weights": "unmerged"}
  # The adapters moved: B starts at 0, so a non-zero norm after 2 steps is training.
  assert all(m["train/param_norm"] > 0 for m in r["metrics"] if "train/param_norm" in m)


@pytest.mark.parametrize("name", ["sudoku", "sudoku_lora", "dream_math_lora"])
def test_evaluate_a_run_workdir(matrix, name):
  """`bgpo_jax.evaluate --checkpoint=WORKDIR` on a run trained from an HF checkpoint: the
  tokenizer and the architecture come from the workdir's run.json and tokenizer/ copy; for a LoRA
  run the base is re-made from its source and the checkpoint's adapters applied."""
  r = matrix[name]
  assert r["ok"], r.get("traceback")
  ev = r["eval_workdir"]
  assert {"run.json", "tokenizer", "checkpoints"} <= set(ev["run_json"])
  assert ev["records"] == EVAL_ROWS * len(EVAL_SETS[name])  # each eval set's rows
  assert ev["same_indices"] and ev["same_completions"]
  assert ev["accuracy"] == pytest.approx(ev["trainer_accuracy"])


def _config(name: str):
  import importlib
  sys.path.insert(0, str(ROOT))
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", ["math", "code", "countdown", "sudoku"])
def test_task_configs_shard_fsdp_and_their_batches_divide_8_devices(name):
  from bgpo_jax import config as config_lib
  c = _config(name)
  assert tuple(c.mesh.shape) == (1, -1, 1)  # FSDP over every device (LLaDA-8B does not fit replicated)
  rows = c.rl.prompts_per_step * c.rl.group_size
  assert rows % 8 == 0 and c.eval.batch_size % 8 == 0
  assert config_lib.micro_batch_rows(c.rl.micro_batch_per_device, rows, 8) == 8


@pytest.mark.parametrize("key, value, dp, message", [
    ("eval.batch_size", 12, 8, "config.eval.batch_size 12 is not divisible by the data-parallel size 8 "
                               "(mesh data x fsdp): each generate call splits its rows over the devices; "
                               "use a multiple of 8 such as 16"),
    ("rollout.batch_size", 32, 64, "config.rollout.batch_size 32 is not divisible by the data-parallel size 64"),
    ("rollout.batch_size", 4, 4, "config.rollout.batch_size 4 is not a multiple of config.rl.group_size 8; "
                                 "use a multiple such as 8"),
    ("rollout.batch_size", 48, 8, "config.rollout.batch_size 48 must divide the rollout batch 128"),
    ("eval.batch_size", 0, 8, "config.eval.batch_size 0 must be >= 1"),
    ("rl.micro_batch_per_device", 3, 8, "config.rl.micro_batch_per_device 3 x 8 devices does not divide"),
])
def test_validation_names_every_batch_divisibility_constraint(key, value, dp, message, tmp_path):
  import re
  from bgpo_jax import config as config_lib
  c = _config("countdown")
  c.task.data_dir = str(tmp_path)
  c.tokenizer.path = str(tmp_path)
  section, k = key.split(".")
  setattr(c[section], k, value)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(c, data_parallel_size=dp)


def test_validation_rejects_an_unknown_eval_set(tmp_path):
  from bgpo_jax import config as config_lib
  c = _config("math")
  c.task.data_dir = str(tmp_path)
  c.tokenizer.path = str(tmp_path)
  config_lib.validate(c, data_parallel_size=8)  # gsm8k,math500 are known
  c.task.eval_tasks = "gsm8k,math5000"
  with pytest.raises(config_lib.ConfigError, match=r"config.task.eval_tasks 'gsm8k,math5000' names unknown "
                                                   r"test sets \['math5000'\]"):
    config_lib.validate(c, data_parallel_size=8)
