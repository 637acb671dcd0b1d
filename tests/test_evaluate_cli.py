"""`python -m bgpo_jax.evaluate --checkpoint=WORKDIR`: the run's recorded config is the config
(overrides on top), the results go under WORKDIR/eval/<step>/, the run's datasets and compiled
programs are reused, and nothing is written to the current folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import evaluate
from bgpo_jax.train.loop import train
from bgpo_jax.train.run import build_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

EVAL_ROWS = 8


def tiny_demo():
  """3 SFT steps of a 1-layer demo model (SFT only: no RL step or rollout sampler to compile)."""
  c = demo.get_config()
  c.mode = "sft"
  c.model.n_layers = 1
  c.task.demo_train_size = 64
  c.task.demo_test_size = EVAL_ROWS
  c.total_steps = 3
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0
  c.eval.num_examples = EVAL_ROWS
  c.eval.batch_size = EVAL_ROWS
  c.eval_every = 0
  c.sft.eval_every = 0
  c.checkpoint_every = 2  # steps 2 and 3 (the end)
  c.plot_at_end = False
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run"))
  train(build_run(tiny_demo(), wd))
  return wd


def _cli(*args, cwd, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "bgpo_jax.evaluate", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_the_recorded_config_round_trips(workdir):
  recorded = json.loads((Path(workdir) / ckpt_lib.RUN_CONFIG).read_text())
  c = evaluate.config_from_run(workdir)
  assert json.loads(c.to_json_best_effort()) == recorded
  assert isinstance(c.rollout.prompt_buckets, tuple)  # JSON lists back to the config's tuples
  c.model.d_model = 64  # an unset placeholder keeps its type: still overridable
  assert evaluate.config_from_run(str(Path(workdir) / "nowhere")) is None


def test_run_eval_writes_under_the_run_and_not_here(workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  result = evaluate.run_eval(evaluate.config_from_run(workdir), workdir, None, progress=False)
  out = Path(workdir) / "eval" / "3" / "eval_demo.jsonl"
  assert result["out"] == str(out)
  assert len(_lines(out)) == EVAL_ROWS
  assert list(tmp_path.iterdir()) == []


def test_without_a_run_the_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="does not exist; pass a run's workdir"):
    evaluate._no_config_message(str(tmp_path / "missing"))
  msg = evaluate._no_config_message(str(tmp_path))
  assert "not a run of this trainer" in msg and "pass --config=configs/<task>.py" in msg
  c = tiny_demo()
  c.init.checkpoint = str(tmp_path)  # e.g. a Hugging Face directory: no run folder to write into
  with pytest.raises(ValueError, match="pass --out=FILE.jsonl"):
    evaluate.default_out(c, evaluate.run_dir_of(c.init.checkpoint))


@pytest.mark.slow  # evaluation subprocesses
def test_checkpoint_alone_is_enough_and_the_cwd_stays_clean(workdir, tmp_path):
  here = tmp_path / "cwd"
  here.mkdir()
  p = _cli(f"--checkpoint={workdir}", cwd=here)
  assert p.returncode == 0, p.stderr[-3000:]
  out = Path(workdir) / "eval" / "3" / "eval_demo.jsonl"
  assert f"per-example results: {out}" in p.stdout
  assert len(_lines(out)) == EVAL_ROWS
  assert list(here.iterdir()) == []
  log = p.stdout + p.stderr
  # Library INFO chatter stays off without --verbose.
  assert "orbax" not in log.lower() and "Unable to initialize backend" not in log, log

  # Overrides apply on top of the recorded config; one step of the run is evaluated on its own.
  p = _cli(f"--checkpoint={workdir}/checkpoints/2", "--config.eval.num_examples=4",
           "--config.eval.batch_size=4", cwd=here)
  assert p.returncode == 0, p.stderr[-3000:]
  assert len(_lines(Path(workdir) / "eval" / "2" / "eval_demo.jsonl")) == 4
  assert list(here.iterdir()) == []

  p = _cli(f"--checkpoint={workdir}", "--config.eval.num_exampls=4", cwd=here)
  assert p.returncode == 2
  assert p.stderr.strip() == (f"bgpo_jax.evaluate: error: unknown config key --config.eval.num_exampls "
                              f"({workdir}/run_config.json); closest valid keys: --config.eval.num_examples, "
                              "--config.eval.steps, --config.eval.gen_length")
