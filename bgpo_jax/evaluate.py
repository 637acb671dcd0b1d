r"""Evaluation: `python -m bgpo_jax.evaluate --checkpoint=PATH [--config=configs/<task>.py] [--out=FILE]`.

Generates with the config's eval sampler settings (greedy by default), scores with the task's
verifiable reward, prints accuracy per eval task and writes a JSONL of prompt, completion,
reward and ground truth. PATH is a run's workdir (its latest checkpoint), one step of it
(WORKDIR/checkpoints/<step>) or a Hugging Face LLaDA / Dream directory; without --checkpoint
the config's init.checkpoint is evaluated. Any split size runs on any mesh: the last batch is
padded to eval.batch_size and the padding is not scored.

The config: --config, else the run's own WORKDIR/run_config.json (the whole config it trained
with), so `--checkpoint=WORKDIR` needs nothing else; --config.KEY=VALUE overrides apply on top
of either. The architecture and the tokenizer of a run come from its run.json and tokenizer/.

Where it writes: the JSONL goes to --out, else to WORKDIR/eval/<step>/eval_<task>.jsonl beside
the evaluated checkpoint; the datasets of file-backed tasks reuse the run's TFDS builds
(task.tfds_dir, else WORKDIR/tfds). A Hugging Face directory is no run: give --out (its datasets
are built once into ~/.cache/bgpo_jax/tfds). Nothing goes into the current folder.

`python -m bgpo_jax.evaluate --score FILE` re-grades saved generations (this command's JSONL,
d1's generation JSON/JSONL) without a model and prints the per-task table (bgpo_jax.rescore).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax import main as main_lib
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.models import family
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import state as state_lib

FLAGS = flags.FLAGS
PROG = "bgpo_jax.evaluate"
FLAG_NAMES = ("checkpoint", "config", "out", "score", "show_config", "verbose")


# ------------------------------------------------------------------------------ the run's config


def run_dir_of(path: str | None) -> str | None:
  """The workdir of the run `path` belongs to (a workdir, its checkpoints/ or one step of it);
  None for a Hugging Face directory, a random init or anything else."""
  if not path or (epath.Path(path) / "config.json").exists():  # a Hugging Face directory
    return None
  found = ckpt_lib.find_run_record(path)
  return found[1] if found else None


def _overlay(c: ml_collections.ConfigDict, values: dict) -> None:
  """Sets `values` (nested, as JSON) on `c`: keys of base_config keep their types (an unset
  placeholder stays overridable from the command line), keys it lacks are added."""
  for k, v in values.items():
    if isinstance(v, dict):
      if k in c and isinstance(c[k], ml_collections.ConfigDict):
        _overlay(c[k], v)
      else:
        c[k] = ml_collections.ConfigDict(v)
      continue
    if isinstance(v, list):  # JSON has no tuples; the config's sequences are tuples
      v = tuple(v)
    try:
      c[k] = v
    except TypeError:  # a type changed since the run started: the recorded value wins
      with c.ignore_type():
        c[k] = v


def config_from_run(workdir: str) -> ml_collections.ConfigDict | None:
  """The config WORKDIR/run_config.json records, as a ConfigDict (None when there is none)."""
  values = ckpt_lib.read_run_config(workdir)
  if values is None:
    return None
  c = config_lib.base_config()
  _overlay(c, values)
  return c


def _arg(argv: list[str], name: str) -> str | None:
  """The value of --name=V / --name V on a command line (None when absent)."""
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_saved_overrides(argv: list[str], config, source: str) -> None:
  """Like config_lib.check_override_keys, for overrides of a run's recorded config."""
  keys = config_lib.flat_keys(config)
  for a in argv[1:]:
    if not a.startswith(("--config.", "--noconfig.")):
      continue
    key, node = a.split("=", 1)[0].split(".", 1)[1], config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # an index into a tuple value: ml_collections checks it
      if part not in node:
        raise config_lib.ConfigError(
            f"unknown config key --config.{key} ({source}); closest valid keys: "
            + ", ".join(f"--config.{k}" for k in config_lib.closest_keys(key, keys)))
      node = node[part]


def define_flags(argv: list[str] | None = None) -> ml_collections.ConfigDict | None:
  """Command-line flags; defined only when this module is the program (so it stays importable).

  Without --config, a --checkpoint inside a run makes the run's recorded config the default of
  --config (so --config.KEY=VALUE overrides still apply); returns that config, else None."""
  argv = sys.argv if argv is None else argv
  saved = None
  if _arg(argv, "config") is None and _arg(argv, "score") is None:
    run_dir = run_dir_of(_arg(argv, "checkpoint"))
    saved = config_from_run(run_dir) if run_dir else None
  if saved is not None:
    try:  # DEFINE_config_dict applies the overrides right away: a mistyped key fails here
      _check_saved_overrides(argv, saved, f"{run_dir}/{ckpt_lib.RUN_CONFIG}")
    except config_lib.ConfigError as e:
      main_lib.usage_error(PROG, str(e))
    config_flags.DEFINE_config_dict("config", saved, "Config file (configs/*.py); default: the run's "
                                    "run_config.json.", lock_config=False)
  else:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); default: the run's "
                                    "WORKDIR/run_config.json when --checkpoint is a run.", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Run workdir, one of its checkpoints/<step>, or a Hugging Face directory.")
  flags.DEFINE_string("out", None, "JSONL of per-example results (default: WORKDIR/eval/<step>/eval_<task>.jsonl).")
  flags.DEFINE_string("score", None, "Re-grade this file of saved generations without a model (bgpo_jax.rescore).")
  main_lib.define_common_flags()
  return saved


# ------------------------------------------------------------------------------ evaluation


def _user_cache() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bgpo_jax")


def _not_a_run(path: str | None) -> str:
  if not path:
    return "a random init (no --checkpoint)"
  if not epath.Path(path).exists():
    raise ValueError(f"--checkpoint {path} does not exist; pass a run's workdir or a Hugging Face directory")
  return f"--checkpoint {path} (not a run of this trainer: no run.json in it or above it)"


def default_out(config, run_dir: str | None) -> str:
  """WORKDIR/eval/<step>/eval_<task>.jsonl for the checkpoint config.init.checkpoint names."""
  if run_dir is None:
    raise ValueError(f"{_not_a_run(config.init.checkpoint)} has no run folder to write the per-example results "
                     "into; pass --out=FILE.jsonl")
  step = ckpt_lib.checkpoint_step(config.init.checkpoint)
  return str(epath.Path(run_dir) / "eval" / str(step) / f"eval_{config.task.name}.jsonl")


def run_eval(config, checkpoint: str | None, out: str | None, progress: bool = True) -> dict:
  if checkpoint:
    config.init.checkpoint = checkpoint
  run_dir = run_dir_of(config.init.checkpoint)
  out = out or default_out(config, run_dir)
  mesh_lib.maybe_initialize_distributed(config.distributed)  # each host evaluates its share
  # A run's compiled programs and TFDS builds are reused; other checkpoints use the user cache.
  tasks_lib.enable_compilation_cache(config, run_dir)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  config_lib.validate(config, data_parallel_size=mesh_lib.data_parallel_size(mesh))
  task = tasks_lib.build_task(config, workdir=run_dir or _user_cache())
  lora_run = _lora_run(config, run_dir, mesh)
  if lora_run is not None:
    model_cfg, params = lora_run
  else:
    model_cfg, params = tasks_lib.build_model(config, task.tokenizer, mesh)
  if params is None:
    logging.warning("no checkpoint given: evaluating a randomly initialized %s model", config.model.preset)
    params = jax.jit(lambda r: family.module_for(model_cfg).init_params(model_cfg, r),
                     out_shardings=state_lib.param_shardings(model_cfg, mesh))(jax.random.key(config.seed))
  sampler = tasks_lib.build_rollout_sampler(config, model_cfg, task.tokenizer, mesh, "eval")
  records: list = []
  t0 = time.time()
  result = tasks_lib.evaluate(sampler, task, params, rng=jax.random.key(config.seed),
                              num_examples=config.eval.num_examples, batch_size=config.eval.batch_size,
                              records=records, progress=progress)
  result["time/eval_s"] = time.time() - t0
  if jax.process_index() == 0:  # every process holds all records; one writes them
    path = epath.Path(out)  # epath: --out may be a gs:// (or other epath) path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  result["out"] = out
  return result


def _lora_run(config, run_dir: str | None, mesh):
  """(model config, sampler params) when config.init.checkpoint is a LoRA run's workdir (or one of
  its checkpoints): the base re-made as the run made it (its recorded fingerprint checked), the
  checkpoint's adapters on it, merged or unmerged as config.lora.sampler_weights says; else None."""
  if run_dir is None:
    return None
  found = ckpt_lib.find_run_record(run_dir)
  if found is None or not found[0].get("lora"):
    return None
  import dataclasses

  from bgpo_jax.models import lora
  from bgpo_jax.tools import export

  record, hf_cfg, saved = export.read_run(run_dir)
  spec = export.lora_spec(record)
  model_cfg = dataclasses.replace(hf_cfg, **tasks_lib.model_knobs(config))
  # Made on one device (as export makes them), then laid out on the mesh like the trainer's.
  base = jax.device_put(export.lora_base(record, hf_cfg, saved), state_lib.param_shardings(model_cfg, mesh))
  adapters = jax.device_put(export.latest_adapters(config.init.checkpoint, hf_cfg, spec, saved),
                            state_lib.adapter_shardings(model_cfg, spec, mesh))
  if config.lora.sampler_weights == "unmerged":
    return model_cfg, lora.adapted(base, adapters, spec)
  cdt = model_cfg.compute_jnp_dtype
  merge = jax.jit(lambda b, a: jax.tree.map(lambda x: x.astype(cdt), lora.merge(model_cfg, b, a, spec)),
                  out_shardings=state_lib.param_shardings(model_cfg, mesh))
  return model_cfg, merge(base, adapters)


def _no_config_message(checkpoint: str | None) -> str:
  if not checkpoint:
    return ("give --checkpoint=WORKDIR (a run of this trainer: its run_config.json is the config) or --config, "
            "e.g. --checkpoint=/tmp/bgpo_demo, or --config=configs/math.py --checkpoint=/models/LLaDA-8B-Instruct "
            "--out=math_eval.jsonl")
  if run_dir_of(checkpoint) is not None:
    return (f"--checkpoint {checkpoint} is a run without {ckpt_lib.RUN_CONFIG} (written at every start by current "
            "versions); pass the config it trained with: --config=configs/<task>.py and its --config.KEY=VALUE "
            "overrides")
  return f"{_not_a_run(checkpoint)} has no recorded config; pass --config=configs/<task>.py (the list: --help)"


def main(argv) -> None:
  del argv
  main_lib.quiet_libraries(FLAGS.verbose)
  if FLAGS.score:
    from bgpo_jax import rescore
    rescore.score_file(FLAGS.score, out=FLAGS.out)
    return
  config = FLAGS.config
  if config is None:
    try:
      message = _no_config_message(FLAGS.checkpoint)
    except ValueError as e:  # the checkpoint does not exist
      message = str(e)
    main_lib.usage_error(PROG, message)
  if FLAGS.checkpoint:
    config.init.checkpoint = FLAGS.checkpoint
  if FLAGS.show_config:
    print(main_lib.config_json(config))
    return
  try:
    out = FLAGS.out or default_out(config, run_dir_of(config.init.checkpoint))
  except (ValueError, FileNotFoundError) as e:
    main_lib.usage_error(PROG, str(e))
  try:
    result = run_eval(config, None, out, progress=True)
  except config_lib.ConfigError as e:  # names the key, the value and the fix: no traceback needed
    print(f"{PROG}: config error: {e}", file=sys.stderr)
    sys.exit(2)
  for k, v in sorted(result.items()):
    if k.endswith("accuracy"):
      print(f"{k:32s} {v:.4f}")
  print(f"per-example results: {result['out']}  ({result['time/eval_s']:.1f}s)")


if __name__ == "__main__":
  define_flags()
  app.run(main_lib.one_line_errors(main, PROG), flags_parser=main_lib.flags_parser(__doc__, FLAG_NAMES))
