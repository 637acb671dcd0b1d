"""Reward throughput: sandboxed code rewards vs pool workers and timeouts, plus the cheap tasks.

  python -m bgpo_jax.benchmarks.rewards                       # ~1 minute on 2 CPU cores
  python -m bgpo_jax.benchmarks.rewards --n 64 --workers 1,2,4,8 --out rewards.json

Code rows are MBPP-style completions (a small function + three asserts) scored end to end with
`rewards.score_batch` (program building, sandbox launch, namespaces, interpreter start-up, test
run). A `--timeout-frac` share of the completions loops forever, so each of those costs the full
`--timeout` in one worker: `ideal_s` is the makespan if per-program cost were the measured
1-worker cost of a passing program and timeouts ran in parallel. math500 rows go through the
math-verify worker (first call includes its start-up); gsm8k / countdown / sudoku are inline.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from bgpo_jax import rewards
from bgpo_jax.benchmarks import common

_GOOD = "```python\ndef add_{i}(a, b):\n    return a + b\n```"
_LOOP = "```python\ndef add_{i}(a, b):\n    while True:\n        pass\n```"


def _code_batch(n: int, timeout_frac: float) -> tuple[list, list, list]:
  n_loop = round(n * timeout_frac)
  comps, truths = [], []
  for i in range(n):
    comps.append((_LOOP if i < n_loop else _GOOD).format(i=i))
    truths.append(json.dumps([f"assert add_{i}({i}, 1) == {i + 1}", f"assert add_{i}(0, 0) == 0",
                              f"assert add_{i}(-1, 1) == 0"]))
  return ["mbpp"] * n, comps, truths


def bench_code(n: int, workers: int, timeout_frac: float, timeout_s: float) -> dict:
  tasks, comps, truths = _code_batch(n, timeout_frac)
  with rewards.SandboxPool(max_workers=workers) as pool:
    rewards.score_batch(tasks[:1], comps[-1:], truths[-1:], pool=pool)  # warm page cache
    t0 = time.perf_counter()
    got = rewards.score_batch(tasks, comps, truths, pool=pool, code_timeout_s=timeout_s)
    wall = time.perf_counter() - t0
  n_loop = round(n * timeout_frac)
  if got != [0.0] * n_loop + [1.0] * (n - n_loop):
    raise RuntimeError(f"unexpected code rewards {got}")
  return {"case": "code (mbpp)", "workers": workers, "n": n, "timeouts": n_loop,
          "timeout_s": timeout_s, "wall_s": wall, "per_s": n / wall}


def bench_simple(task: str, n: int) -> dict:
  if task == "gsm8k":
    comps = [f"<reasoning>...</reasoning><answer>{i:,} dollars</answer>" for i in range(n)]
    truths, extras = [str(i) for i in range(n)], None
  elif task == "countdown":
    comps = ["<answer>(100 - 93) * 30</answer>"] * n
    truths, extras = ["210"] * n, [{"numbers": "[30, 100, 93]"}] * n
  elif task == "sudoku":
    comps = ["The grid:\n<answer>3 1 4 2\n2 4 3 1\n4 2 1 3\n1 3 2 4</answer>"] * n
    truths, extras = ["3142243142131324"] * n, [{"puzzle": "3102200002100320"}] * n
  elif task == "math500":
    comps = [f"\\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(n)]  # needs math-verify
    truths, extras = [str(i / 2) if i % 2 else f"\\frac{{{i}}}{{4}}" for i in range(n)], None
  else:
    raise ValueError(task)
  t0 = time.perf_counter()
  rewards.score_batch(task, comps, truths, extras)
  wall = time.perf_counter() - t0
  return {"case": task, "workers": 1, "n": n, "timeouts": 0, "timeout_s": 0.0, "wall_s": wall,
          "per_s": n / wall}


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=40, help="code completions per measurement")
  ap.add_argument("--workers", default="1,2,4", help="sandbox pool sizes, comma separated")
  ap.add_argument("--timeout-frac", type=float, default=0.1, help="share of looping programs")
  ap.add_argument("--timeout", type=float, default=1.0, help="code timeout (s)")
  ap.add_argument("--simple-n", type=int, default=2000, help="rows for gsm8k/countdown/sudoku")
  ap.add_argument("--math-n", type=int, default=40, help="math500 rows (math-verify worker)")
  ap.add_argument("--out", default=None, help="write JSON records here")
  args = ap.parse_args(argv)
  rows = []
  base = None
  for w in [int(x) for x in args.workers.split(",")]:
    for frac in (0.0, args.timeout_frac):
      r = bench_code(args.n, w, frac, args.timeout)
      if w == 1 and frac == 0.0:
        base = r["wall_s"] / args.n
      n_loop = r["timeouts"]
      # Makespan lower bound: timeouts spread over workers, the rest at the 1-worker cost.
      r["ideal_s"] = (math.ceil(n_loop / w) * args.timeout
                      + (args.n - n_loop) * base / w) if base else float("nan")
      rows.append(r)
  for task in ("gsm8k", "countdown", "sudoku"):
    rows.append(bench_simple(task, args.simple_n))
  rows.append(bench_simple("math500", args.math_n))
  common.print_table(rows, ["case", "workers", "n", "timeouts", "timeout_s", "wall_s",
                            "ideal_s", "per_s"],
                     title="Reward throughput (per_s = completions scored per second)")
  common.write_json(args.out, rows, meta={"argv": argv, "device": common.device_description()})
  return rows


if __name__ == "__main__":
  main()
