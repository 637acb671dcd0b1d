"""`benchmarks.rewards --humaneval`: canonical solutions graded as whole functions and as bodies."""

from __future__ import annotations

import gzip
import json

from bgpo_jax.benchmarks import rewards as rewards_bench

_PROBLEMS = [
    {"task_id": "T/0", "entry_point": "add", "prompt": 'def add(a, b):\n    """Sum."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    # A wrong "canonical" solution: the benchmark must report it, not pass it.
    {"task_id": "T/1", "entry_point": "neg", "prompt": 'def neg(x):\n    """Negate."""\n',
     "canonical_solution": "    return x\n",
     "test": "def check(candidate):\n    assert candidate(4) == -4\n"},
]


def test_humaneval_canonical_check_counts_passes_and_names_failures(tmp_path):
  path = tmp_path / "HumanEval.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(p) + "\n" for p in _PROBLEMS)
  out = tmp_path / "he.json"
  rows = rewards_bench.main(["--humaneval", str(path), "--out", str(out)])
  assert [(r["form"], r["n"], r["passed"], r["failed_ids"]) for r in rows] == [
      ("function", 2, 1, "T/1"), ("body", 2, 1, "T/1")]
  assert out.exists()
