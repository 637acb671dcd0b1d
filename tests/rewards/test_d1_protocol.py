"""Rewards reproduce d1's published evaluation protocol on real LLaDA-8B-Instruct output.

The cases below are completions from ../shared/reference/d1-llada-generations (the tail of each
completion, reasoning cut) that the previous parser graded differently from d1's own evaluation
script; each asserts d1's label. The full agreement table is a benchmark
(`python -m bgpo_jax.benchmarks.rewards --d1 PATH`, BENCHMARKS.md), not a test.
"""

import json
import types

import jax
import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import rescore
from bgpo_jax import rewards
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.rewards.sudoku import solutions

GSM8K = [  # (completion tail, ground truth, d1_correct)
    ('ch class has 15 students, so she teaches 33 * 15 = 495 students in a week.\nShe charges $15.00 per student, so she makes 495 * 15 = $7425 in a week.\n</reasoning><|eot_id|><|endoftext|>',
     '7425', False),
    ('54 miles. Stanley biked at 10 miles per hour for 2.5 hours, so he distance = 10 * 2.5 = 25 miles. The total distance they biked is 54 + 25 = 79 miles.\n</answer><|eot_id|><|endoftext|>',
     '79', False),
    ('ming 280 pounds in a week, the amount of feed left is \\(300 - 280 = 20\\) pounds.\n\nThus, the amount of feed left after a week is \\(\\boxed{20}\\) pounds.\n</answer><|eot_id|>\n\\boxed{0}<|eot_id|><|endoftext|>',
     '20', True),
    ('Finally, we divide the remaining money by the cost of one plum:\n\\[ \\frac{0.75}{0.25} = 3 \\text{ plums} \\]\n\nTherefore, Jamaar can buy \\boxed{3} plums.\n</<answer><|eot_id|><|endoftext|>',
     '3', True),
    ('6 \\text{ per person} = \\$36\\]\n\nFinally, add the costs of both salads to find the total cost:\n\\[\\$65 + \\$36 = \\$101\\]\n</reasoning>\n<answer>\n\\boxed{}101\n</answer><|eot_id|><|endoftext|>',
     '101', True),
]
COUNTDOWN = [  # (completion tail, target, numbers, d1_correct)
    ('e numbers 91, 89, and 61, we need to consider the operations and constraints - each number must be used exactly once.\n\n\n\n<answer>\n\\boxed{91 - 89 + 61}\n</answer><|eot_id|><|endoftext|>',
     '63', [91, 89, 61], True),
    (' to find a combination of operations (+, -, *, /) that will inbalance the numbers numbers to the desired9. \n</reasoning>\n<answer>\n\\boxed{95 - 34 - 52}\n</answer><|eot_id|><|endoftext|>',
     '9', [95, 34, 52], True),
    (', -, *, and / exactly once. We can start by considering the properties of the numbers and the operations..\n</reasoning>\n<<answer>\n\\boxed{34 - 24 + 24}\n</answer><|eot_id|><|endoftext|>',
     '34', [24, 24, 34], True),
    ('nts - each number must be used exactly once. We can start by trying to think of a combination to reach the target number.\n\n</reasoning>\n\n<>\n\\boxed{91 - 83 + 27}<|eot_id|><|endoftext|>',
     '35', [27, 83, 91], True),
]
SUDOKU = [  # (completion tail, puzzle, solution, d1_score)
    (' are already filled.\n</reasoning>\n<answer>\n1234432\n</answer><|eot_id|><|endoftext|>',
     '0100200104033210', '4132234114233214', 0.25),
    ('digits for each cell.\n</reasoning>\n<answer>\n1331124\n</answer<|eot_id|><|endoftext|>',
     '0100301010022340', '4123321414322341', 0.125),
    (' criteria.\n</reasoning>\n<answer>\n01240013030020014\n</answer><|eot_id|><|endoftext|>',
     '0124001303002001', '3124421313422431', 0.0),
    ('the rules.\n</reasoning>\n<answer>\n12043\n43201\n21430\n</answer><|eot_id|><|endoftext|>',
     '0000302403401032', '4213312423411432', 0.25),
    ('doku grid.\n</reasoning>\n<answer>\n13204000243100102\n</answer><|eot_id|><|endoftext|>',
     '1300400024300102', '1324421324313142', 0.25),
    ('doku grid.\n</reasoning>\n<answer>\n12340\n41023\n30214\n</answer><|eot_id|><|endoftext|>',
     '1030041003002103', '1234341243212143', 0.375),
]


@pytest.mark.parametrize("completion,truth,d1", GSM8K)
def test_gsm8k_d1_labels(completion, truth, d1):
  assert rewards.grade("gsm8k", completion, truth).correct == d1


@pytest.mark.parametrize("completion,target,numbers,d1", COUNTDOWN)
def test_countdown_d1_labels(completion, target, numbers, d1):
  g = rewards.grade("countdown", completion, target, {"numbers": numbers})
  assert g.correct == d1 and g.score == float(d1)


@pytest.mark.parametrize("completion,puzzle,solution,d1", SUDOKU)
def test_sudoku_d1_scores(completion, puzzle, solution, d1):
  g = rewards.grade("sudoku", completion, solution, {"puzzle": puzzle})
  assert g.score == pytest.approx(d1) and not g.correct


# ----------------------------------------------------------------------------- sudoku


def test_sudoku_accepts_any_valid_completion():
  puzzle, listed = "3040413004000304", "3241413224131324"  # a test-set puzzle with 2 solutions
  sols = solutions(puzzle)
  assert sols == ("3241413214232314", listed)
  other = sols[0]
  g = rewards.grade("sudoku", f"<answer>{other}</answer>", listed, {"puzzle": puzzle})
  assert g.correct and g.score == 1.0 and g.reward == 1.0
  # Each solution keeps the givens and has 1-4 once per row, column and 2x2 box.
  for s in sols:
    assert all(p in ("0", c) for p, c in zip(puzzle, s))
    grid = np.array([int(c) for c in s]).reshape(4, 4)
    blocks = [grid[r:r + 2, c:c + 2].ravel() for r in (0, 2) for c in (0, 2)]
    for line in [*grid, *grid.T, *blocks]:
      assert sorted(line) == [1, 2, 3, 4]
  # Unique puzzles have exactly one; contradictory givens none.
  assert solutions("3102200002100320") == ("3142243142131324",)
  assert solutions("1100000000000000") == ()
  # Not a solution: partial credit against the listed one only.
  wrong = rewards.grade("sudoku", f"<answer>{other[:-1]}1</answer>", listed, {"puzzle": puzzle})
  assert not wrong.correct and wrong.score < 1.0


def test_correct_is_not_the_reward():
  # 7 of 8 empty cells right (0.875) + a 0.5 format bonus: reward >= 1, yet not solved.
  puzzle, sol = "3102200002100320", "3142243142131324"
  comp = "<reasoning>r</reasoning>\n<answer>3142243142131323</answer>"
  g = rewards.grade("sudoku", comp, sol, {"puzzle": puzzle}, format_reward=0.5)
  assert g.reward == pytest.approx(0.875 + 0.5) and g.score == pytest.approx(0.875)
  assert not g.correct
  binary = rewards.grade("sudoku", comp, sol, {"puzzle": puzzle}, recipes={"sudoku": "binary"})
  assert binary.reward == 0.0
  with pytest.raises(ValueError, match="sudoku reward recipe 'best'"):
    rewards.grade("sudoku", comp, sol, {"puzzle": puzzle}, recipes={"sudoku": "best"})


def test_evaluate_accuracy_counts_fully_correct_only():
  puzzle, sol = "3102200002100320", "3142243142131324"
  completions = ["<reasoning>r</reasoning><answer>3142243142131323</answer>",  # 7/8 + bonus
                 f"<reasoning>r</reasoning><answer>{sol}</answer>"]
  exs = [{"task": "sudoku", "index": i, "messages": [{"role": "user", "content": puzzle}],
          "ground_truth": sol, "extra": {"puzzle": puzzle}} for i in range(2)]
  ds = type("DS", (), {"examples_at": lambda self, rows: [exs[int(i)] for i in rows],
                       "prompt_ids": lambda self, ex: [1, 2], "__len__": lambda self: 2})()
  sampler = types.SimpleNamespace(
      inference_params=lambda params: params,
      sample_ids=lambda params, ids, rng: types.SimpleNamespace(completions=completions[:len(ids)]))
  task = tasks_lib.Task("sudoku", None, None, {"sudoku": ds},
                        {"format_reward": 0.5, "recipes": {"sudoku": "fraction"}})
  records = []
  out = tasks_lib.evaluate(sampler, task, None, rng=jax.random.key(0), batch_size=2, records=records)
  assert out["eval/sudoku/accuracy"] == 0.5  # the 0.875 + 0.5 = 1.375 row is not solved
  assert out["eval/sudoku/reward_mean"] == pytest.approx((1.375 + 1.5) / 2)
  assert out["eval/sudoku/score_mean"] == pytest.approx((0.875 + 1.0) / 2)
  assert [r["correct"] for r in records] == [False, True]
  assert records[0]["grader"] == "sudoku" and records[0]["extra"] == {"puzzle": puzzle}


# ----------------------------------------------------------------------------- config


def _demo_config():
  import importlib.util
  from pathlib import Path
  spec = importlib.util.spec_from_file_location(
      "demo_cfg", Path(__file__).resolve().parents[2] / "configs" / "demo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_reward_config_keys_are_wired():
  c = _demo_config()
  c.rewards.code_workers = 3
  c.rewards.countdown = "binary"
  config_lib.validate(c)
  kw = tasks_lib.reward_kwargs(c)
  assert kw["pool"].max_workers == 3
  assert kw["recipes"] == {"countdown": "binary", "sudoku": "fraction"}
  c.rewards.code_workers = 0
  assert tasks_lib.reward_kwargs(c)["pool"].max_workers >= 1  # the default size
  for key, bad, msg in (("code_workers", -1, "code_workers -1"),
                        ("countdown", "tinyzero", "rewards.countdown 'tinyzero'")):
    c2 = _demo_config()
    c2.rewards[key] = bad
    with pytest.raises(config_lib.ConfigError, match=msg):
      config_lib.validate(c2)


# ----------------------------------------------------------------------------- re-scoring


def test_rescore_eval_jsonl_and_d1_json(tmp_path, capsys):
  puzzle, sol = "3102200002100320", "3142243142131324"
  ours = tmp_path / "eval_sudoku.jsonl"
  lines = [  # an eval file of this trainer (an old one: no grader / extra / correct fields)
      {"task": "sudoku", "prompt": [{"role": "user", "content": f"Sudoku puzzle: {puzzle}"}],
       "completion": f"<answer>{sol}</answer>", "reward": 1.0, "ground_truth": sol},
      {"task": "sudoku", "prompt": [{"role": "user", "content": f"Sudoku puzzle: {puzzle}"}],
       "completion": "<answer>1234</answer>", "reward": 0.0, "ground_truth": sol},
      {"task": "countdown", "prompt": "Numbers: [30, 100, 93]\nTarget: 37",
       "completion": "<answer>\\boxed{100 - 93 + 30}</answer><|eot_id|>", "reward": 0.0,
       "ground_truth": "37"},
  ]
  ours.write_text("\n".join(json.dumps(l) for l in lines) + "\nnot json\n")
  recs = {r["task"]: r for r in rescore.score_file(str(ours))}
  assert recs["sudoku"]["n"] == 2 and recs["sudoku"]["accuracy"] == 0.5
  assert recs["countdown"]["accuracy"] == 1.0 and recs["countdown"]["agreement"] == 0.0
  assert "1 rows could not be graded" in capsys.readouterr().out
  d1 = tmp_path / "countdown_llada_512_generations.json"  # d1's eval output layout
  d1.write_text(json.dumps({"generations": [
      {"question": "Numbers: [30, 100, 93]\nTarget: 37", "ground_truth": [[30, 100, 93], 37],
       "generations": "<answer>\\boxed{100 - 93 + 30}</answer><|eot_id|><|endoftext|>"},
      {"question": "Numbers: [30, 100, 93]\nTarget: 37", "ground_truth": [[30, 100, 93], 37],
       "generations": "<answer>100 + 93 - 30</answer>"}]}))
  (rec,) = rescore.score_file(str(d1))
  assert rec["gen_length"] == 512 and rec["n"] == 2 and rec["accuracy"] == 0.5
  assert rec["reward_mean"] == pytest.approx((1.0 + 0.1) / 2)  # d1 recipe: 0.1 if well-formed
