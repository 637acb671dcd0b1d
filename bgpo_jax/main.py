r"""The trainer: `python -m bgpo_jax.main --config=configs/<task>.py --workdir=DIR [--config.KEY=VALUE ...]`.

Trains the config's model on its task (an SFT warm-up when sft.steps > 0, then RL; mode=sft:
SFT only) and writes everything to DIR: run_config.json (the whole config), checkpoints/,
metrics.jsonl, tensorboard/ and curves.png. The same command again resumes from the latest
checkpoint. Evaluate a run with `python -m bgpo_jax.evaluate --checkpoint=DIR`.

`train.run.build_run` makes the run's pieces from the config (mesh, task, model, optimizer,
sharded state resumed from the workdir, samplers); `train.loop.train` is the loop: SFT warm-up
steps, then RL steps (rollouts -> rewards -> RL batch -> train step), evaluation, checkpoints and
preemption.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax.train import loop as loop_lib
from bgpo_jax.train import run as run_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when this module is the program (so it stays importable)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py, or configs/<task>.py:<objective>); "
                                  "override any key with --config.KEY=VALUE.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, run_config.json, metrics.jsonl, curves.png.")
  define_common_flags()


def define_common_flags() -> None:
  """The flags the trainer and bgpo_jax.evaluate share."""
  flags.DEFINE_bool("show_config", False, "Print the resolved config (file + overrides) as JSON and exit.")
  flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (JAX backends, Orbax, TFDS).")


# ------------------------------------------------------------------------------ command line


def quiet_libraries(verbose: bool) -> None:
  """Our INFO lines stay; the libraries' INFO chatter (JAX's "Unable to initialize backend 'tpu'" on
  every start without a TPU, Orbax's dozen lines per restore, TFDS's build notes) shows only with
  --verbose. Orbax and TFDS log through absl's logger, JAX through its own."""
  logging.getLogger().setLevel(logging.INFO)
  level = logging.INFO if verbose else logging.WARNING
  for name in ("absl", "jax"):
    logging.getLogger(name).setLevel(level)


REPO = Path(__file__).resolve().parents[1]
HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort")


def _first_sentence(path: Path) -> str:
  try:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  except (OSError, SyntaxError):
    return ""
  para = " ".join(doc.split("\n\n")[0].split())
  return re.split(r"(?<=\.)\s", para)[0]


def config_files_help() -> str:
  """configs/*.py, each with its docstring's first sentence, and where every key is explained."""
  lines = ["config files (every key, its default and meaning: docs/configs.md; the code: bgpo_jax/config.py):"]
  files = sorted((REPO / "configs").glob("*.py")) if (REPO / "configs").is_dir() else []
  for f in files:
    if f.name.startswith("_"):
      continue
    head = f"  configs/{f.name:15s} "
    lines.append(textwrap.fill(_first_sentence(f), width=110, initial_indent=head,
                               subsequent_indent=" " * len(head)))
  if not files:
    lines.append(f"  (none in {REPO / 'configs'}: the config files ship with the source checkout, not the wheel)")
  lines.append("  a task config takes an objective's recipe after a colon: --config=configs/countdown.py:diffu_grpo")
  return "\n".join(lines)


def usage_text(doc: str, names: tuple[str, ...]) -> str:
  """The --help page: the command's docstring, its flags and the config files."""
  rows = []
  for name in names:
    f = FLAGS[name]
    head = f"  --{name:13s} "
    rows.append(textwrap.fill(f.help, width=110, initial_indent=head, subsequent_indent=" " * len(head)))
  rows.append(f"  --{'helpfull':13s} every flag, absl's own included")
  return f"{doc.strip()}\n\nflags:\n" + "\n".join(rows) + "\n\n" + config_files_help() + "\n"


def flags_parser(doc: str, names: tuple[str, ...]):
  """An absl flags parser whose --help prints `usage_text` and exits 0 (absl's own exits 1 and
  lists only this module's flags); --helpfull adds every flag, also with exit 0."""
  def parser(argv):
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
      print(usage_text(doc, names), end="")
      sys.exit(0)
    if "--helpfull" in args:
      print(usage_text(doc, names) + "\nevery flag:\n" + FLAGS.get_help())
      sys.exit(0)
    return config_lib.parse_flags(argv)
  return parser


def usage_error(prog: str, message: str) -> None:
  """A wrong command line: one line on stderr and exit 2 (absl's UsageError buries the line under
  the whole --help page)."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def config_json(config) -> str:
  """The config as run_config.json records it: every key, indent 2, sorted."""
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)


def one_line_errors(fn, prog: str = "bgpo_jax.main"):
  """`fn` with a RunError (a stopped run: non-finite updates, a failed save, a workdir that is a
  file, no checkpoint restores) printed as its one-line message and exit status 1, no traceback."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ckpt_lib.RunError as e:
      print(f"{prog}: {e}", file=sys.stderr)
      sys.exit(1)
  return wrapped


def main(argv) -> None:
  del argv
  quiet_libraries(FLAGS.verbose)
  config = FLAGS.config
  if config is None:
    usage_error("bgpo_jax.main", "--config is required, e.g. --config=configs/demo.py (the list: --help)")
  if FLAGS.show_config:
    print(config_json(config))
    return
  if not FLAGS.workdir:
    usage_error("bgpo_jax.main", "--workdir is required, e.g. --workdir=/tmp/bgpo_demo")
  try:
    run = run_lib.build_run(config, FLAGS.workdir)
  except config_lib.ConfigError as e:  # names the key, the value and the fix: no traceback needed
    print(f"bgpo_jax.main: config error: {e}", file=sys.stderr)
    sys.exit(2)
  if run.is_main:
    print("\n".join(run_lib.startup_summary(run)), flush=True)
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
  app.run(one_line_errors(main), flags_parser=flags_parser(__doc__, ("config", "workdir", "show_config", "verbose")))
