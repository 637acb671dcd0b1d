r"""The trainer: `python -m bgpo_jax.main --config=configs/<task>.py --workdir=DIR [--config.k=v ...]`.

`train.run.build_run` makes the run's pieces from the config (mesh, task, model, optimizer,
sharded state resumed from the workdir, samplers); `train.loop.train` is the loop: SFT warm-up
steps, then RL steps (rollouts -> rewards -> RL batch -> train step), evaluation, checkpoints and
preemption. `mode=sft` (or `sft.steps > 0` before RL) trains with the masked-diffusion SFT loss.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax.train import loop as loop_lib
from bgpo_jax.train import run as run_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when this module is the program (so it stays importable)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, curves.png.")


def one_line_errors(fn):
  """`fn` with a RunError (a stopped run: non-finite updates, a failed save, a workdir that is a
  file, no checkpoint restores) printed as its one-line message and exit status 1, no traceback."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ckpt_lib.RunError as e:
      print(f"bgpo_jax.main: {e}", file=sys.stderr)
      sys.exit(1)
  return wrapped


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/bgpo_demo")
  try:
    run = run_lib.build_run(config, FLAGS.workdir)
  except config_lib.ConfigError as e:  # names the key, the value and the fix: no traceback needed
    print(f"bgpo_jax.main: config error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = loop_lib.train(run)
  if run.is_main:
    print_summary(summary, run.phases.sft_steps)


def print_summary(summary: dict, sft_steps: int) -> None:
  """The held-out accuracy before and after RL (or from step 0), and where the curves are."""
  first, before_rl = summary.get("first_eval", {}), summary.get("before_rl", {})
  if "eval/accuracy" in before_rl and "eval/accuracy" in summary:
    print(f"held-out accuracy before RL (step {sft_steps}): {before_rl['eval/accuracy']:.3f} -> "
          f"after RL (step {summary['step']}): {summary['eval/accuracy']:.3f}")
  elif "eval/accuracy" in first and "eval/accuracy" in summary:
    print(f"held-out accuracy: {first['eval/accuracy']:.3f} at step 0 -> {summary['eval/accuracy']:.3f} "
          f"at step {summary['step']}")
  elif "eval/accuracy" in summary:
    print(f"held-out accuracy at step {summary['step']}: {summary['eval/accuracy']:.3f}")
  if "plot" in summary:
    print(f"learning curves: {summary['plot']}")


if __name__ == "__main__":
  define_flags()
  app.run(one_line_errors(main), flags_parser=config_lib.parse_flags)
