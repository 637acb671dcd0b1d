r"""Evaluation: `python -m bgpo_jax.evaluate --config=configs/<task>.py --checkpoint=PATH [--out=FILE]`.

Generates with the config's eval sampler settings (greedy by default), scores with the task's
verifiable reward, prints accuracy per eval task and writes a JSONL of prompt, completion,
reward and ground truth. PATH is a Hugging Face LLaDA directory, a run's workdir, or one of its
Orbax checkpoints (a workdir's run.json and tokenizer/ give the architecture and the tokenizer);
without --checkpoint the config's init.checkpoint is evaluated. Any split size runs on any mesh:
the last batch is padded to eval.batch_size and the padding is not scored.

`python -m bgpo_jax.evaluate --score FILE` re-grades saved generations (this command's JSONL,
d1's generation JSON/JSONL) without a model and prints the per-task table (bgpo_jax.rescore).
"""

from __future__ import annotations

import json
import logging
import time

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from bgpo_jax import config as config_lib
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.models import family
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import state as state_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when this module is the program (so it stays importable)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "HF directory, run workdir or Orbax checkpoint.")
  flags.DEFINE_string("out", None, "JSONL of per-example results (default: eval_<task>.jsonl here).")
  flags.DEFINE_string("score", None, "Re-grade this file of saved generations without a model (bgpo_jax.rescore).")


def run_eval(config, checkpoint: str | None, out: str | None, progress: bool = True) -> dict:
  if checkpoint:
    config.init.checkpoint = checkpoint
  mesh_lib.maybe_initialize_distributed(config.distributed)  # each host evaluates its share
  tasks_lib.enable_compilation_cache(config)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  config_lib.validate(config, data_parallel_size=mesh_lib.data_parallel_size(mesh))
  # epath: --out may be a gs:// (or other epath) path.
  task = tasks_lib.build_task(config, workdir=str(epath.Path(out).parent if out else epath.Path(".")))
  model_cfg, params = tasks_lib.build_model(config, task.tokenizer, mesh)
  if params is None:
    logging.warning("no checkpoint given: evaluating a randomly initialized %s model", config.model.preset)
    params = jax.jit(lambda r: family.module_for(model_cfg).init_params(model_cfg, r), out_shardings=state_lib.param_shardings(model_cfg, mesh))(jax.random.key(config.seed))
  sampler = tasks_lib.build_rollout_sampler(config, model_cfg, task.tokenizer, mesh, "eval")
  records: list = []
  t0 = time.time()
  result = tasks_lib.evaluate(sampler, task, params, rng=jax.random.key(config.seed),
                              num_examples=config.eval.num_examples, batch_size=config.eval.batch_size,
                              records=records, progress=progress)
  result["time/eval_s"] = time.time() - t0
  out = out or f"eval_{config.task.name}.jsonl"
  if jax.process_index() == 0:  # every process holds all records; one writes them
    epath.Path(out).write_text("".join(json.dumps(r) + "\n" for r in records))
  result["out"] = out
  return result


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if FLAGS.score:
    from bgpo_jax import rescore
    rescore.score_file(FLAGS.score, out=FLAGS.out)
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/math.py")
  result = run_eval(FLAGS.config, FLAGS.checkpoint, FLAGS.out)
  for k, v in sorted(result.items()):
    if k.endswith("accuracy"):
      print(f"{k:32s} {v:.4f}")
  print(f"per-example results: {result['out']}  ({result['time/eval_s']:.1f}s)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
