"""What a user sees first: --help, --show_config, the startup summary, WORKDIR/run_config.json,
and quiet library logs (JAX's TPU probe, TFDS's build notes and progress bars)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgpo_jax import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
TINY = ("--config.mode=sft", "--config.model.n_layers=1", "--config.task.demo_train_size=64",
        "--config.task.demo_test_size=8", "--config.total_steps=2", "--config.sft.batch_size=8",
        "--config.sft.micro_batch_per_device=0", "--config.eval.num_examples=8", "--config.eval.batch_size=8",
        "--config.eval_every=0", "--config.sft.eval_every=0", "--config.checkpoint_every=1000",
        "--config.plot_at_end=false")


def _cli(module, *args, cwd, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("module", ["bgpo_jax.main", "bgpo_jax.evaluate"])
def test_help_exits_0_and_points_to_the_configs(module, tmp_path):
  p = _cli(module, "--help", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  for text in ("docs/configs.md", "configs/demo.py", "configs/math.py", "--show_config", "--verbose", "--config"):
    assert text in p.stdout, (text, p.stdout)
  assert list(tmp_path.iterdir()) == []


def test_show_config_prints_the_resolved_config_and_exits(tmp_path):
  p = _cli("bgpo_jax.main", f"--config={DEMO}", "--config.rl.group_size=3", "--show_config", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  shown = json.loads(p.stdout)
  assert shown["rl"]["group_size"] == 3 and shown["task"]["name"] == "demo"
  assert list(tmp_path.iterdir()) == []  # no --workdir needed, nothing written


def test_run_config_is_rewritten_atomically_on_resume(tmp_path):
  first = {"seed": 0, "total_steps": 2, "rl": {"kl_beta": 0.0}}
  ckpt_lib.check_run_config(str(tmp_path), first, resuming=False)
  path = tmp_path / ckpt_lib.RUN_CONFIG
  assert path.read_text() == json.dumps(first, indent=2, sort_keys=True) + "\n"
  longer = dict(first, total_steps=5)  # a key a resume may change
  ckpt_lib.check_run_config(str(tmp_path), longer, resuming=True)
  assert json.loads(path.read_text())["total_steps"] == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt_lib.RUN_CONFIG]  # no temporary file left
  assert ckpt_lib.read_run_config(str(tmp_path)) == longer


def test_library_logs_are_quiet_unless_verbose():
  from bgpo_jax import main
  names = ("", "absl", "jax")
  before = {n: logging.getLogger(n).level for n in names}
  try:
    main.quiet_libraries(verbose=False)
    assert logging.getLogger().level == logging.INFO  # our own lines
    assert logging.getLogger("absl").level == logging.WARNING  # Orbax, TFDS
    assert logging.getLogger("jax").level == logging.WARNING  # "Unable to initialize backend 'tpu'"
    main.quiet_libraries(verbose=True)
    assert logging.getLogger("absl").level == logging.INFO and logging.getLogger("jax").level == logging.INFO
  finally:
    for n, level in before.items():
      logging.getLogger(n).setLevel(level)


def test_tfds_build_prints_no_download_notes_or_bars(tmp_path, capfd):
  from bgpo_jax.data import tfds_builder
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.WARNING)  # as bgpo_jax.main / evaluate set it without --verbose
  try:
    tfds_builder.build_tfds("countdown", data_dir=tmp_path, generate={"train": 4, "test": 2, "seed": 0})
  finally:
    absl_logger.setLevel(level)
  out, err = capfd.readouterr()
  assert "Downloading and preparing" not in out + err and "downloaded and prepared" not in out + err
  assert "\r" not in err and "\x1b[" not in err, err  # pytest's capture is no terminal: no tqdm bars


@pytest.mark.slow  # a trainer subprocess
def test_startup_summary_and_a_quiet_log(tmp_path):
  here, wd = tmp_path / "cwd", tmp_path / "run"
  here.mkdir()
  p = _cli("bgpo_jax.main", f"--config={DEMO}", f"--workdir={wd}", *TINY, cwd=here)
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  head = "\n".join(out.splitlines()[:6])  # the summary is stdout's first lines, before any step
  assert [line.split(":")[0] for line in out.splitlines()[:6]] == [
      "devices", "model", "objective", "lengths", "steps", "workdir"], out
  for text in ("devices: ", "mesh data=", "parameters ", " trainable", "objective: masked-diffusion SFT, 8 rows",
               "lengths: prompts up to 64 tokens", "responses 16 tokens", "steps: 2 SFT + 0 RL = 2, from step 0",
               f"workdir: {wd} (config: run_config.json)", f"metrics: {wd}/metrics.jsonl",
               f"curves: python -m bgpo_jax.plot {wd}"):
    assert text in head, (text, out)
  log = p.stdout + p.stderr
  assert "Unable to initialize backend" not in log and "\x1b[" not in log and "\r" not in log, log
  assert list(here.iterdir()) == []
  recorded = (wd / ckpt_lib.RUN_CONFIG).read_text()
  values = json.loads(recorded)
  assert recorded == json.dumps(values, indent=2, sort_keys=True) + "\n"
  assert values["model"]["n_layers"] == 1 and values["mode"] == "sft"  # the overrides, resolved
