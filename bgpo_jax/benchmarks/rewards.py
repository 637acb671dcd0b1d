"""Reward throughput: sandboxed code rewards vs pool workers and timeouts, plus the cheap tasks;
and, with --d1, agreement with d1's published evaluation labels on real LLaDA generations.

  python -m bgpo_jax.benchmarks.rewards                       # ~1 minute on 2 CPU cores
  python -m bgpo_jax.benchmarks.rewards --n 64 --workers 1,2,4,8 --out rewards.json
  python -m bgpo_jax.benchmarks.rewards --d1 ../shared/reference/d1-llada-generations/generations.jsonl
  python -m bgpo_jax.benchmarks.rewards --humaneval HumanEval.jsonl.gz   # github:openai/human-eval data/

--humaneval grades HumanEval's canonical solutions through `rewards.grade_batch` twice: as the
whole function (prompt + solution in a code block) and as the body alone after the prompt's stub
(the prompt passed as `extra["prompt"]`, as the loader does); every one must pass.

--d1 grades every completion with `rewards.grade_batch` and compares with d1's label per task and
generation length (sudoku: the same fraction of empty cells; other tasks: the same correctness).
Each disagreement where d1's parser is plainly wrong is put in a named category (`d1_faults`);
`agree_excl` is the agreement over the other rows, and `--examples K` prints K rows per category.

Code rows are MBPP-style completions (a small function + three asserts) scored end to end with
`rewards.score_batch` (test rewrite, sandbox launch, namespaces, root filesystem, interpreter
start-up, the three calls over the judge's pipe). A `--timeout-frac` share of the completions loops forever, so each of those costs the full
`--timeout` in one worker: `ideal_s` is the makespan if per-program cost were the measured
1-worker cost of a passing program and timeouts ran in parallel. math500 rows go through the
math-verify worker (first call includes its start-up); gsm8k / countdown / sudoku are inline.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import time

from bgpo_jax import rewards
from bgpo_jax.benchmarks import common
from bgpo_jax.rewards.extract import answer_tag, boxed_all
from bgpo_jax.rewards.math_reward import gsm8k_answer_text
from bgpo_jax.rewards.sudoku import extract_grid
from bgpo_jax.rewards.sudoku import solutions as sudoku_solutions

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


# ------------------------------------------------------------------------------ d1 agreement

_END = re.compile(r"<\|(?:eot_id|endoftext)\|>")


def d1_fault(row: dict) -> str | None:
  """The category of a disagreement where d1's evaluation parser is plainly wrong, else None
  (a disagreement we do not excuse). `row`: a graded rescore row with d1's label."""
  text = _END.split(row["completion"])[0]
  task, ours, d1 = row["grader"], row["correct"], row["ref_correct"]
  if task == "math500" and ours and not d1:
    return "equivalent answer that d1's string comparison rejects (15.975 vs \\frac{639}{40})"
  if task == "gsm8k" and ours and not d1:
    ans = gsm8k_answer_text(row["completion"]) or ""
    if re.search(r"\d,\d{3}", ans):
      return "thousands separator: d1 reads 43,500 as 43"
    boxes = [b for b in boxed_all(text) if re.search(r"\d", b)]
    if len(boxes) > 1 and boxes[0] != boxes[-1]:
      return "several boxed answers: d1 takes the first"
    if re.search(r"\\boxed\s+\{", text):
      return "\\boxed {..} with a space or newline: d1 finds no box"
    if "<answer>" in text and "</answer>" not in text.split("<answer>")[-1]:
      return "answer in an unclosed <answer> tag (cut off or malformed): d1 finds none"
  if task == "countdown" and ours and not d1 and "\\boxed" not in text:
    return "answer without \\boxed{}: d1 parses the whole completion as the expression"
  if task == "sudoku":
    puzzle = row["extra"].get("puzzle", "")
    grid = extract_grid(row["completion"])
    if grid and grid != row["ground_truth"] and grid in sudoku_solutions(puzzle):
      return "another valid solution of a puzzle with several: d1 compares to one"
    first = text.split("</answer>")[0]
    if first.count("<answer>") > 1:
      return "<answer> opened twice: d1 reads the second tag's text as cells"
    region = answer_tag(text)
    if region is None and "</answer>" in text:
      region = text.split("</answer>", 1)[1]
    if region is not None and re.search(r"[^\d\s]", region.strip()):
      return "non-digit characters in the answer: d1 keeps them, shifting the cells"
  return None


def bench_d1(path: str, examples: int = 0) -> list[dict]:
  from bgpo_jax import rescore

  rows, problems = rescore.load(path)
  if problems:
    print(f"{len(problems)} rows of {path} could not be read; first: {problems[:3]}")
  rows = rescore.grade(rows)
  rows = [r for r in rows if "ref_correct" in r and "correct" in r]
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["grader"], r.get("gen_length"))].append(r)
  out, faults_all = [], collections.defaultdict(list)
  for (task, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
    partial = task == "sudoku"
    differ = [r for r in rs if (abs(r["score"] - r["ref_score"]) > 1e-6 if partial
                                else r["correct"] != r["ref_correct"])]
    faults = collections.Counter()
    for r in differ:
      why = d1_fault(r)
      if why:
        faults[why] += 1
        faults_all[why].append(r)
    excused = sum(faults.values())
    n = len(rs)
    out.append({"task": task, "gen_length": length, "n": n,
                "agree": 1 - len(differ) / n,
                "agree_excl": 1 - (len(differ) - excused) / max(1, n - excused),
                "d1_acc": sum(r["ref_score"] for r in rs) / n,
                "ours_acc": sum(r["score"] for r in rs) / n,
                "differ": len(differ), "d1_faults": excused,
                "faults": "; ".join(f"{v} {k.split(':')[0]}" for k, v in faults.most_common())})
  common.print_table(out, ["task", "gen_length", "n", "agree", "agree_excl", "d1_acc", "ours_acc",
                           "differ", "d1_faults"],
                     title="Agreement with d1's evaluation labels (sudoku: acc = mean fraction "
                           "of empty cells; agree_excl leaves out rows where d1's parser is wrong)")
  print("\nWhere d1's parser is plainly wrong (count over all tasks and lengths):")
  for why, rs in sorted(faults_all.items(), key=lambda kv: -len(kv[1])):
    print(f"  {len(rs):4d}  {why}")
    for r in rs[:examples]:
      tail = _END.split(r["completion"])[0][-160:].replace("\n", "\\n")
      print(f"        ours {r['score']:.3f} d1 {r['ref_score']:.3f} truth {r['ground_truth']!r}: ...{tail}")
  return out


def bench_humaneval(path: str) -> list[dict]:
  """HumanEval's canonical solutions through the grader: [{form, n, passed, failed_ids}]."""
  import gzip

  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    problems = [json.loads(line) for line in f if line.strip()]
  out = []
  for form in ("function", "body"):
    completions = [f"```python\n{p['prompt']}{p['canonical_solution']}```" if form == "function"
                   else p["canonical_solution"] for p in problems]
    extras = [{"prompt": [{"role": "user", "content": f"```python\n{p['prompt']}```"}],
               "entry_point": p["entry_point"]} for p in problems]
    t0 = time.time()
    grades = rewards.grade_batch("humaneval", completions, [p["test"] for p in problems], extras)
    failed = [p["task_id"] for p, g in zip(problems, grades) if not g.correct]
    out.append({"form": form, "n": len(problems), "passed": len(problems) - len(failed),
                "wall_s": time.time() - t0, "failed_ids": " ".join(failed)})
  common.print_table(out, ["form", "n", "passed", "wall_s", "failed_ids"],
                     title="HumanEval canonical solutions through rewards.grade_batch")
  return out


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
  ap.add_argument("--d1", default=None, help="JSONL of d1-labelled generations: print the "
                  "agreement table instead of the throughput benchmark")
  ap.add_argument("--examples", type=int, default=2, help="--d1: example rows per d1 fault")
  ap.add_argument("--humaneval", default=None, help="HumanEval.jsonl(.gz) with canonical solutions: "
                  "grade them all instead of the throughput benchmark")
  args = ap.parse_args(argv)
  if args.humaneval:
    rows = bench_humaneval(args.humaneval)
    common.write_json(args.out, rows, meta={"argv": argv, "file": args.humaneval})
    return rows
  if args.d1:
    rows = bench_d1(args.d1, args.examples)
    common.write_json(args.out, rows, meta={"argv": argv, "file": args.d1})
    return rows
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
