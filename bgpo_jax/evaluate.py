r"""Evaluation: `python -m bgpo_jax.evaluate --config=configs/<task>.py --checkpoint=PATH [--out=FILE]`.

Generates with the config's eval sampler settings (greedy by default), scores with the task's
verifiable reward, prints accuracy per eval task and writes a JSONL of prompt, completion,
reward and ground truth. PATH is a Hugging Face LLaDA directory, a run's workdir, or one of its
Orbax checkpoints; without --checkpoint the config's init.checkpoint is evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from bgpo_jax import config as config_lib
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.models import llada
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import state as state_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when this module is the program (so it stays importable)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "HF directory, run workdir or Orbax checkpoint.")
  flags.DEFINE_string("out", None, "JSONL of per-example results (default: eval_<task>.jsonl here).")


def run_eval(config, checkpoint: str | None, out: str | None, progress: bool = True) -> dict:
  if checkpoint:
    config.init.checkpoint = checkpoint
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  config_lib.validate(config, data_parallel_size=mesh_lib.data_parallel_size(mesh))
  task = tasks_lib.build_task(config, workdir=os.path.dirname(os.path.abspath(out or ".")))
  model_cfg, params = tasks_lib.build_model(config, task.tokenizer, mesh)
  if params is None:
    logging.warning("no checkpoint given: evaluating a randomly initialized %s model", config.model.preset)
    params = jax.jit(lambda r: llada.init_params(model_cfg, r), out_shardings=state_lib.param_shardings(model_cfg, mesh))(jax.random.key(config.seed))
  sampler = tasks_lib.build_rollout_sampler(config, model_cfg, task.tokenizer, mesh, "eval")
  records: list = []
  t0 = time.time()
  result = tasks_lib.evaluate(sampler, task, params, rng=jax.random.key(config.seed),
                              num_examples=config.eval.num_examples, batch_size=config.eval.batch_size,
                              records=records, progress=progress)
  result["time/eval_s"] = time.time() - t0
  out = out or f"eval_{config.task.name}.jsonl"
  with open(out, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  result["out"] = out
  return result


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
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
