"""Small-scale comparison on the demo task: BGPO (n=16), VRPO-OL (n=4), diffu-GRPO from one SFT start.

python -m bgpo_jax.benchmarks.compare --out compare.json [--seeds 0,1,2 --rl-steps 40]

One SFT warm-up (configs/demo.py's settings) makes the shared start; then each objective runs
the same number of RL steps from it for each seed. Reports held-out accuracy before and after
RL (mean and spread over seeds), the compiled train-step memory (XLA memory analysis) and time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bgpo_jax.benchmarks.common import device_description, print_table, write_json
from bgpo_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]

OBJECTIVES = {"bgpo": 16, "vrpo_ol": 4, "diffu_grpo": 1}


def _demo_config():
  sys.path.insert(0, str(ROOT))
  from configs import demo
  return demo.get_config()


def run(seeds, rl_steps: int, sft_steps: int | None, workdir: str, objectives=OBJECTIVES,
        sft_seed: int = 0, overrides=None) -> list[dict]:
  """One SFT start, then `rl_steps` RL steps per objective and seed. `overrides(config)` edits
  the demo config in place first (tests shrink it). Returns one record per (objective, seed)."""
  from bgpo_jax.train import loop, run as run_lib

  base = _demo_config()
  if overrides is not None:
    overrides(base)
  sft = base.copy_and_resolve_references()
  sft.mode = "sft"
  sft.seed = sft_seed
  sft.total_steps = sft_steps or base.sft.steps
  sft.eval_every = sft.total_steps
  sft_dir = os.path.join(workdir, "sft")
  t0 = time.time()
  start = loop.train(run_lib.build_run(sft, sft_dir))
  print(f"SFT start (seed {sft_seed}): {sft.total_steps} steps, held-out accuracy {start.get('eval/accuracy', float('nan')):.3f} "
        f"({time.time() - t0:.0f}s)", flush=True)
  records = []
  for name, n in objectives.items():
    for seed in seeds:
      c = base.copy_and_resolve_references()
      c.seed = seed
      c.init.checkpoint = sft_dir
      c.sft.steps = 0
      c.total_steps = rl_steps
      c.eval_every = rl_steps
      c.eval.at_start = True  # the "before" accuracy, on this seed's test set
      c.checkpoint_every = rl_steps
      c.plot_at_end = False
      c.rl.objective = name
      c.rl.num_mc_samples = n
      d = os.path.join(workdir, f"{name}_s{seed}")
      t0 = time.time()
      loop.train(run_lib.build_run(c, d))
      rows = read_metrics(d)
      acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
      mem = [r.get("mem/step_temp_bytes", 0) for r in rows]
      tot = [r.get("mem/step_total_bytes", 0) for r in rows]
      step_s = [r["time/train_s"] for r in rows if "time/train_s" in r][1:]  # skip the compile step
      rec = {"objective": name, "n": n, "seed": seed, "acc_before": acc[0], "acc_after": acc[-1],
             "temp_bytes": max(mem), "total_bytes": max(tot), "train_step_s": float(np.median(step_s)) if step_s else None,
             "wall_s": time.time() - t0}
      records.append(rec)
      print(rec, flush=True)
  return records


def summarize(records: list[dict]) -> list[dict]:
  out = []
  for name in dict.fromkeys(r["objective"] for r in records):
    rs = [r for r in records if r["objective"] == name]
    after = np.array([r["acc_after"] for r in rs])
    out.append({"objective": name, "n": rs[0]["n"], "seeds": len(rs),
                "acc_before": float(np.mean([r["acc_before"] for r in rs])),
                "acc_after_mean": float(after.mean()), "acc_after_std": float(after.std()),
                "acc_after_min": float(after.min()), "acc_after_max": float(after.max()),
                "temp_MiB": max(r["temp_bytes"] for r in rs) / 2**20,
                "train_step_s": float(np.median([r["train_step_s"] for r in rs if r["train_step_s"]]))})
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rl-steps", type=int, default=None, help="default: configs/demo.py total_steps")
  p.add_argument("--sft-steps", type=int, default=None, help="default: configs/demo.py sft.steps")
  p.add_argument("--sft-seed", type=int, default=0, help="seed of the shared SFT start")
  p.add_argument("--objectives", default=",".join(OBJECTIVES))
  p.add_argument("--workdir", default=None)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  seeds = [int(s) for s in a.seeds.split(",")]
  objectives = {k: OBJECTIVES[k] for k in a.objectives.split(",")}
  rl_steps = a.rl_steps or _demo_config().total_steps
  workdir = a.workdir or tempfile.mkdtemp(prefix="bgpo_compare_")
  records = run(seeds, rl_steps, a.sft_steps, workdir, objectives, sft_seed=a.sft_seed)
  table = summarize(records)
  print_table(table, ["objective", "n", "seeds", "acc_before", "acc_after_mean", "acc_after_std",
                      "acc_after_min", "acc_after_max", "temp_MiB", "train_step_s"],
              title=f"demo task, {rl_steps} RL steps from one SFT start (seed {a.sft_seed}); {device_description()}")
  write_json(a.out, records, meta={"summary": table, "rl_steps": rl_steps, "sft_seed": a.sft_seed,
                                   "device": device_description()})


if __name__ == "__main__":
  main()
