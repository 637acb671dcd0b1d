"""Re-grade saved generations without a model and print the per-task table.

  python -m bgpo_jax.evaluate --score FILE [--score_recipes countdown=binary,...]
  python -m bgpo_jax.rescore FILE [FILE ...] [--out graded.jsonl]

FILE is any of:
- an eval JSONL written by `bgpo_jax.evaluate` / the trainer (one object per line with `task`,
  `completion`, `ground_truth` and, since this module exists, `grader` and `extra`; older files
  without them get countdown numbers / the sudoku puzzle back from the prompt text);
- a d1 generation JSON (`{"generations": [{"question", "generations", "ground_truth"}, ...]}`,
  as d1's eval scripts write; the task comes from the file name: gsm8k / math / countdown /
  sudoku, the generation length from a `_<number>_generations.json` suffix when present);
- a JSONL of d1 labelled generations (`task`, `gen_length`, `question`, `completion`,
  `ground_truth`, `d1_correct` or `d1_score`), like ../shared/reference/d1-llada-generations.

Each row is graded with `bgpo_jax.rewards.grade_batch` (code rows in the sandbox). The table has,
per task and generation length: n, accuracy (fully correct), score (the published per-example
metric: sudoku's fraction of empty cells), the mean training reward, and, where the file holds
another grader's labels (d1's, or the file's own `correct` / `reward`), that grader's accuracy
and the share of rows on which the two agree. Unreadable rows are counted and reported.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Any, Iterable

from bgpo_jax import rewards
from bgpo_jax.tasks import registry


def _d1_names() -> dict[str, str]:
  """d1's names for the eval sets (its file names and labels) -> grader: TaskSpec.d1_names."""
  return {alias: s.name for s in registry.specs() for alias in s.d1_names}


def _grader(task: str) -> str:
  """The grader of a task name in a saved file: a d1 name ("gsm", "math" = MATH500) or the
  name itself."""
  return _d1_names().get(task, task)


def _text(prompt: Any) -> str:
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, list):
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
  return str(prompt or "")


def _row(task: str, completion: str, ground_truth: Any, question: str, extra: dict | None,
         **more) -> dict:
  """One normalized row: grader, completion, ground_truth (str but for code), extra (what the
  grader's spec recovers from the question when the file has none), + passthrough keys."""
  grader = _grader(task)
  spec = registry.find(grader)
  extra = dict(extra or {})
  gt = ground_truth
  if spec is not None and spec.recover_extra is not None:
    gt, extra = spec.recover_extra(gt, question, extra)
  if isinstance(gt, float) and gt.is_integer():
    gt = int(gt)
  if spec is not None and spec.is_grader and not spec.code:
    gt = str(gt)
  return {"task": task, "grader": grader, "completion": completion or "", "ground_truth": gt,
          "extra": extra, **more}


def _from_obj(obj: dict, task_hint: str | None, gen_length: int | None) -> dict:
  if "generations" in obj and isinstance(obj["generations"], str):  # a d1 generation item
    task = task_hint or obj.get("task")
    return _row(task, obj["generations"], obj.get("ground_truth"), obj.get("question", ""), None,
                gen_length=gen_length)
  task = obj.get("grader") or obj.get("task")
  ref = {}
  if "d1_correct" in obj:
    ref = {"ref": "d1", "ref_correct": bool(obj["d1_correct"]), "ref_score": float(obj["d1_correct"])}
  elif "d1_score" in obj:
    s = float(obj["d1_score"])
    ref = {"ref": "d1", "ref_correct": s >= 1.0, "ref_score": s}
  elif "correct" in obj:
    ref = {"ref": "file", "ref_correct": bool(obj["correct"]), "ref_score": float(obj.get("score", obj["correct"]))}
  elif "reward" in obj:  # eval files before the correctness flag: reward >= 1 was "correct"
    ref = {"ref": "file", "ref_correct": float(obj["reward"]) >= 1.0, "ref_score": float(obj["reward"])}
  question = obj.get("question") or _text(obj.get("prompt"))
  return _row(task, obj.get("completion", ""), obj.get("ground_truth"), question,
              obj.get("extra"), gen_length=obj.get("gen_length", gen_length), name=obj.get("task"),
              **ref)


def load(path: str, task: str | None = None) -> tuple[list[dict], list[str]]:
  """(normalized rows, problems): every row of FILE that could be read, and one message per row
  that could not (line number and why)."""
  base = os.path.basename(path).lower()
  hint = task or next((g for name, g in _d1_names().items() if name in base), None)
  m = re.search(r"_(\d+)_generations\.json$", base)
  gen_length = int(m.group(1)) if m else None
  rows, problems = [], []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  objs: Iterable = []
  try:
    whole = json.loads(text)
  except json.JSONDecodeError:
    whole = None
  if isinstance(whole, dict) and isinstance(whole.get("generations"), list):  # d1's JSON
    objs = list(enumerate(whole["generations"]))
    if hint is None:
      raise ValueError(f"{path}: a d1 generation file whose task the name does not tell; pass "
                       "the task (gsm8k, math500, countdown, sudoku)")
  else:
    parsed = []
    for i, line in enumerate(text.splitlines()):
      if not line.strip():
        continue
      try:
        parsed.append((i + 1, json.loads(line)))
      except json.JSONDecodeError as e:
        problems.append(f"line {i + 1}: not JSON ({e.msg})")
    objs = parsed
  for i, obj in objs:
    try:
      r = _from_obj(obj, hint, gen_length)
      if r["grader"] not in rewards.graders():
        raise ValueError(f"unknown task {r['grader']!r}")
      rows.append(r)
    except (KeyError, TypeError, ValueError) as e:
      problems.append(f"row {i}: {e}")
  return rows, problems


def grade(rows: list[dict], recipes: dict | None = None, **kwargs) -> list[dict]:
  """Adds `reward`, `correct`, `score` (rewards.Grade) to every row; rows whose grading fails
  (e.g. a countdown row without numbers) get `error` instead. kwargs: rewards.grade_batch's."""
  def batch(rs):
    return rewards.grade_batch([r["grader"] for r in rs], [r["completion"] for r in rs],
                               [r["ground_truth"] for r in rs], [r["extra"] for r in rs],
                               recipes=recipes, **kwargs)
  try:
    pairs = list(zip(rows, batch(rows))) if rows else []
  except (KeyError, TypeError, ValueError):  # find the bad rows one by one
    pairs = []
    for r in rows:
      try:
        pairs.append((r, batch([r])[0]))
      except (KeyError, TypeError, ValueError) as e:
        r["error"] = str(e)
  for r, g in pairs:
    r.update(reward=g.reward, correct=g.correct, score=g.score)
  return rows


def table(rows: list[dict]) -> list[dict]:
  """Per (task, gen_length): n, accuracy, score_mean, reward_mean and, with reference labels,
  ref_accuracy / ref_score_mean / agreement (same correctness; sudoku: same score)."""
  groups = collections.defaultdict(list)
  for r in rows:
    if "correct" in r:
      groups[(r.get("name") or r["task"], r.get("gen_length"))].append(r)
  out = []
  for (task, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
    n = len(rs)
    rec = {"task": task, "gen_length": length if length is not None else "", "n": n,
           "accuracy": sum(r["correct"] for r in rs) / n,
           "score_mean": sum(r["score"] for r in rs) / n,
           "reward_mean": sum(r["reward"] for r in rs) / n}
    refs = [r for r in rs if "ref_correct" in r]
    if refs:
      partial = registry.get(rs[0]["grader"]).partial_score
      same = [(abs(r["score"] - r["ref_score"]) < 1e-6) if partial else (r["correct"] == r["ref_correct"])
              for r in refs]
      rec.update(ref=refs[0]["ref"], ref_accuracy=sum(r["ref_correct"] for r in refs) / len(refs),
                 ref_score_mean=sum(r["ref_score"] for r in refs) / len(refs),
                 agreement=sum(same) / len(refs))
    out.append(rec)
  return out


def print_table(recs: list[dict], file=None) -> None:
  cols = ["task", "gen_length", "n", "accuracy", "score_mean", "reward_mean"]
  if any("ref" in r for r in recs):
    cols += ["ref", "ref_accuracy", "ref_score_mean", "agreement"]
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in cols] for r in recs]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def parse_recipes(spec: str | None) -> dict | None:
  """"countdown=binary,sudoku=fraction" -> {"countdown": "binary", "sudoku": "fraction"}."""
  if not spec:
    return None
  out = {}
  for part in spec.split(","):
    k, sep, v = part.partition("=")
    if not sep:
      raise ValueError(f"recipe {part!r} is not task=name (e.g. countdown=binary)")
    out[k.strip()] = v.strip()
  rewards.check_recipes(out)
  return out


def score_file(path: str, *, task: str | None = None, recipes: dict | None = None,
               out: str | None = None, file=None) -> list[dict]:
  """Loads, grades and prints one file's table; returns the table records."""
  file = file or sys.stdout
  rows, problems = load(path, task)
  rows = grade(rows, recipes)
  bad = [r for r in rows if "error" in r]
  print(f"{path}: {len(rows) - len(bad)} rows graded", file=file)
  recs = table(rows)
  print_table(recs, file=file)
  if problems or bad:
    msgs = problems + [f"{r['task']}: {r['error']}" for r in bad]
    print(f"{len(msgs)} rows could not be graded; first: {msgs[:3]}", file=file)
  if out:
    with open(out, "w") as f:
      for r in rows:
        f.write(json.dumps(r, default=str) + "\n")
  return recs


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("files", nargs="+")
  ap.add_argument("--task", default=None, help="task of a d1 generation JSON whose name does not say")
  ap.add_argument("--recipes", default=None, help="training reward recipes, e.g. countdown=binary")
  ap.add_argument("--out", default=None, help="write the graded rows here (JSONL; one file only)")
  args = ap.parse_args(argv)
  recipes = parse_recipes(args.recipes)
  for p in args.files:
    score_file(p, task=args.task, recipes=recipes, out=args.out if len(args.files) == 1 else None)


if __name__ == "__main__":
  main()
