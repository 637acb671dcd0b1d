"""Worker for test_multihost.py (a subprocess; not collected by pytest).

  multihost_trainer_worker.py single WORKDIR                 one process, 8 CPU devices
  multihost_trainer_worker.py multi PID NPROC PORT WORKDIR   one of NPROC jax.distributed processes

Runs the trainer on a shrunk demo config: SFT warm-up, RL with evaluation, stop and save at
step 3, resume in a freshly built run to the end, then `evaluate.run_eval` on the final checkpoint
(process 0 writes WORKDIR/eval.jsonl). The rewards are replaced by a fixed pattern of the GLOBAL
prompt index, so group skipping keeps the same groups on any topology: on two processes the live
groups sit on the second process only, and the first must train rows it did not generate.
Prints one RESULT line of JSON: metrics rows, rows per evaluation generate call, and more.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Rewards per group member for global prompt k: k % 4 in (2, 3) are live, the rest all-equal.
PATTERN = {0: [0.0, 0.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0, 1.0], 2: [0.0, 1.0, 0.5, 0.0], 3: [1.0, 0.0, 0.0, 0.25]}


def config():
  from configs import demo
  c = demo.get_config()
  c.model.n_layers = 1
  c.task.demo_train_size = 64
  c.task.demo_test_size = 16
  c.sft.steps = 2
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0
  c.sft.eval_every = 0
  c.total_steps = 2
  c.rl.prompts_per_step = 4
  c.rl.group_size = 4
  c.rl.num_mc_samples = 2
  c.rl.micro_batch_per_device = 0
  c.rl.skip_zero_advantage = True
  c.eval.num_examples = 16
  c.eval.batch_size = 16
  c.eval.at_start = False
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 1
  c.plot_at_end = False
  return c


def instrument(trainer, log: dict) -> None:
  """Patterned rewards by global prompt index; counts the rows of each evaluation generate call."""
  from bgpo_jax import tasks as tasks_lib
  orig_score = getattr(tasks_lib.rollout_and_score, "original", tasks_lib.rollout_and_score)

  def rollout_and_score(sampler, task, params, batch, rng, *, group_size, chunk=0, **kw):
    rollout, rewards, waited, *more = orig_score(sampler, task, params, batch, rng, group_size=group_size,
                                                 chunk=chunk, **kw)
    first = jax.process_index() * len(batch.prompt_ids)  # this host's first global prompt
    r = [x for k in range(len(batch.prompt_ids)) for x in PATTERN[(first + k) % 4]]
    return (rollout, np.asarray(r, np.float32), waited, *more)

  rollout_and_score.original = orig_score
  tasks_lib.rollout_and_score = rollout_and_score
  orig_sample = trainer.eval_sampler.sample_ids

  def sample_ids(params, ids, rng):
    log.setdefault("eval_rows", []).append(len(ids))
    return orig_sample(params, ids, rng)

  trainer.eval_sampler.sample_ids = sample_ids


def main():
  mode = sys.argv[1]
  if mode == "multi":
    pid, nproc, port, workdir = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
  else:
    workdir = sys.argv[2]
  from bgpo_jax.evaluate import run_eval
  from bgpo_jax.metrics import read_metrics
  from bgpo_jax.train.loop import train
  from bgpo_jax.train.run import build_run

  log: dict = {"process_count": jax.process_count(), "local_devices": jax.local_device_count()}
  first = build_run(config(), workdir)
  instrument(first, log)
  train(first, stop_at=3)
  resumed = build_run(config(), workdir)
  log["resumed_at"] = resumed.start_step
  instrument(resumed, log)
  summary = train(resumed)
  log["summary_accuracy"] = summary.get("eval/accuracy")
  out = str(Path(workdir) / "eval.jsonl")
  result = run_eval(config(), workdir, out, progress=False)
  log["run_eval_accuracy"] = result["eval/accuracy"]
  log["metrics"] = read_metrics(workdir) if jax.process_index() == 0 else None
  print("RESULT " + json.dumps(log), flush=True)
  if mode == "multi":
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
