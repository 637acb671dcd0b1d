"""The trainer end to end on the embedded demo (shrunk): validation, metrics, plot, checkpoints,
exact resume, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax.train.loop import train
from bgpo_jax.train.run import build_run
from bgpo_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

# Keys that depend on wall-clock time, not on the computation.
TIMING = ("time/", "perf/")


def small_demo(sft_steps=2, rl_steps=2):
  c = demo.get_config()
  c.model.n_layers = 2
  c.task.demo_train_size = 200
  c.task.demo_test_size = 16
  c.sft.steps = sft_steps
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0  # whole batch (the demo's 16 exceeds these tiny batches)
  c.rl.micro_batch_per_device = 0
  c.total_steps = rl_steps
  c.rl.prompts_per_step = 2
  c.rl.group_size = 4
  c.rl.num_mc_samples = 2
  c.eval.num_examples = 16
  c.eval.batch_size = 16
  c.eval.at_start = True
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 1
  return c


def _strip(rows):
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.rollout, "gen_length", 20), "config.rollout.gen_length 20 is not a multiple of config.rollout.block_length 16"),
    (lambda c: (setattr(c.rollout, "block_length", 8), setattr(c.rollout, "steps", 15)),
     "config.rollout.steps 15 is not a multiple of the number of blocks 2"),
    (lambda c: setattr(c.rl, "group_size", 1), "config.rl.group_size 1 must be >= 2"),
    (lambda c: setattr(c.rl, "objective", "ppo"), "config.rl.objective 'ppo' is unknown"),
    (lambda c: setattr(c.init, "checkpoint", "/nonexistent/ckpt"), "config.init.checkpoint '/nonexistent/ckpt' is not a directory"),
    (lambda c: (setattr(c.rl, "prompts_per_step", 3), setattr(c.rl, "group_size", 3)),
     "= 9 is not divisible by the data-parallel size 2"),
    (lambda c: setattr(c.sft, "schedule", "step"), "config.sft.schedule 'step' is unknown"),
    (lambda c: setattr(c.sft, "eval_every", -1), "config.sft.eval_every -1 must be >= 0"),
    (lambda c: setattr(c.sft, "mc_estimator", "uniform"), "config.sft.mc_estimator 'uniform' is unknown"),
    (lambda c: setattr(c.rl, "micro_batch_per_device", 3), "config.rl.micro_batch_per_device 3 x 2 devices does not divide"),
])
def test_config_errors_name_key_value_and_fix(mutate, message):
  c = small_demo()
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(c, data_parallel_size=2)


def test_unknown_override_key_is_rejected():
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.main", "--config=configs/demo.py", "--workdir=/tmp/x",
                      "--config.rl.num_samples=4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0
  assert "num_samples" in p.stderr


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = train(build_run(small_demo(), workdir))
  return workdir, summary


def test_end_to_end_demo_metrics_plot_checkpoints(straight_run):
  workdir, summary = straight_run
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == [0, 1, 2, 3, 4], steps
  assert "eval/accuracy" in rows[0]  # evaluation at step 0
  rl_rows = [r for r in rows if "train/reward_mean" in r]
  assert [r["step"] for r in rl_rows] == [3, 4]
  for r in rows[1:]:
    for k in ("train/loss", "train/grad_norm", "train/lr", "time/train_s"):
      assert isinstance(r[k], float) and np.isfinite(r[k]), (r["step"], k, r.get(k))
  for r in rl_rows:
    for k in ("train/reward_mean", "train/response_len", "time/rollout_s", "time/reward_s", "perf/tokens_per_s"):
      assert isinstance(r[k], float) and np.isfinite(r[k]), (k, r)
    assert 0.0 <= r["train/reward_mean"] <= 1.0
  assert os.path.exists(summary["plot"]) and os.path.getsize(summary["plot"]) > 1000
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert ckpts[-1] == 4 and 2 in ckpts
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


def test_exact_resume(straight_run, tmp_path):
  workdir, _ = straight_run
  half = str(tmp_path / "half")
  train(build_run(small_demo(), half), stop_at=2)  # stops after the SFT phase, saves
  assert read_metrics(half)[-1]["step"] == 2
  resumed = build_run(small_demo(), half)
  assert resumed.start_step == 2
  train(resumed)
  assert _strip(read_metrics(half)) == _strip(read_metrics(workdir))


@pytest.mark.slow  # a trainer subprocess, signalled mid-run
def test_sigterm_saves_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "bgpo_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
          "--config.model.n_layers=2", "--config.task.demo_train_size=200", "--config.task.demo_test_size=16",
          "--config.sft.steps=400", "--config.sft.batch_size=8", "--config.sft.micro_batch_per_device=0", "--config.total_steps=1",
          "--config.rl.prompts_per_step=2", "--config.rl.group_size=4", "--config.rl.num_mc_samples=2",
          "--config.rl.micro_batch_per_device=0",
          "--config.eval_every=0", "--config.checkpoint_every=1000", "--config.log_every=1"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = Path(workdir) / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  assert metrics.exists(), "the run never wrote metrics"
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  stopped = read_metrics(workdir)[-1]["step"]
  assert 2 <= stopped < 401
  ckpts = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(ckpts) == stopped
  # Same command again: resumes from the saved step (and SIGTERM again right away).
  p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and read_metrics(workdir)[-1]["step"] <= stopped:
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  assert "resumed" in out and f"at step {stopped}" in out
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == sorted(set(steps)), "each step is logged once"
  assert steps[-1] > stopped


def test_sft_mode_without_start_eval_and_with_the_stratified_estimator(tmp_path):
  c = small_demo()
  c.mode = "sft"
  c.total_steps = 2
  c.sft.mc_estimator = "stratified"
  c.eval.at_start = False
  c.checkpoint_every = 1000
  summary = train(build_run(c, str(tmp_path)))
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]  # no step-0 evaluation
  assert "eval/accuracy" not in rows[0] and "eval/accuracy" in rows[1]
  assert summary["step"] == 2 and all(np.isfinite(r["train/loss"]) for r in rows)


def test_evaluate_reproduces_the_trainers_final_eval(straight_run, tmp_path):
  from bgpo_jax.evaluate import run_eval
  workdir, summary = straight_run
  out = str(tmp_path / "eval.jsonl")
  result = run_eval(small_demo(), workdir, out, progress=False)
  lines = [json.loads(l) for l in open(out)]
  assert len(lines) == 16
  assert set(lines[0]) >= {"prompt", "completion", "reward", "ground_truth"}
  # Same checkpoint, same greedy settings, same examples: the same accuracy as the run's last eval.
  assert result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
  assert np.mean([l["reward"] >= 1.0 for l in lines]) == pytest.approx(result["eval/accuracy"])


@pytest.mark.parametrize("name", ["math", "code", "countdown", "sudoku", "demo", "base"])
def test_shipped_configs_validate(name, tmp_path):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  if name != "demo":
    c.task.data_dir = str(tmp_path)
    c.tokenizer.path = str(tmp_path)
    if name == "code":
      c.task.train_file = str(tmp_path / "train.jsonl")
      (tmp_path / "train.jsonl").write_text("")
  config_lib.validate(c, data_parallel_size=8)
  if name in ("math", "sudoku"):
    c.task.data_dir = ""
    with pytest.raises(config_lib.ConfigError, match="set --config.task.data_dir"):
      config_lib.validate(c)
