"""sudoku4, the generated long-response task: its puzzles, its reward and its registry entry."""

import json

import pytest

from bgpo_jax import rewards
from bgpo_jax.data import dataset, procedural, records
from bgpo_jax.rewards.sudoku import solutions
from bgpo_jax.rewards.sudoku4 import sudoku4_grade
from bgpo_jax.tasks import registry
from bgpo_jax.tasks.builtin import _check_sudoku4
from bgpo_jax.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def examples():
  return procedural.demo_examples("sudoku4", "train", n=200, seed=1)


def test_generator_is_deterministic_unique_and_split(examples):
  assert examples == procedural.demo_examples("sudoku4", "train", n=200, seed=1)
  test = procedural.demo_examples("sudoku4", "test", n=50, seed=1)
  puzzles = [json.loads(e["extra_json"])["puzzle"] for e in examples]
  assert len(set(puzzles)) == 200
  assert not set(puzzles) & {json.loads(e["extra_json"])["puzzle"] for e in test}
  for e, p in zip(examples[:30], puzzles):
    sol = e["ground_truth"]
    assert len(p) == len(sol) == 64  # the 64-token canvas, exactly
    for g in range(4):  # every grid: 1-2 blanks and a unique solution, the ground truth's
      grid = p[16 * g:16 * g + 16]
      assert 1 <= grid.count("0") <= 2 and solutions(grid) == (sol[16 * g:16 * g + 16],)
    assert json.loads(e["extra_json"])["blanks"] == p.count("0")
  with pytest.raises(ValueError, match="blanks range"):
    procedural.generate_sudoku4(2, min_blanks=3, max_blanks=2)


def test_demo_prompt_fits_the_sweep_bucket(examples):
  """The n sweep pads prompts to 96 tokens (n_sweep.TASK_OVERRIDES): every demo prompt fits."""
  tok = CharTokenizer()
  assert {len(dataset.encode_prompt(tok, json.loads(e["prompt_json"]))) for e in examples[:10]} == {95}


def test_grade(examples):
  ex = examples[0]
  sol, puzzle = ex["ground_truth"], json.loads(ex["extra_json"])["puzzle"]
  blanks = [i for i, c in enumerate(puzzle) if c == "0"]
  assert sudoku4_grade(sol, sol, puzzle) == (True, 1.0)
  assert sudoku4_grade(sol + "<|eot_id|>9999", sol, puzzle) == (True, 1.0)  # cut at the end of turn
  assert sudoku4_grade(" ".join(sol), sol, puzzle) == (True, 1.0)  # separators do not count
  assert sudoku4_grade(puzzle, sol, puzzle) == (False, 0.0)  # the givens copied, no blank filled
  wrong = list(sol)
  wrong[blanks[0]] = "4" if sol[blanks[0]] != "4" else "3"
  assert sudoku4_grade("".join(wrong), sol, puzzle) == (False, pytest.approx((len(blanks) - 1) / len(blanks)))
  assert sudoku4_grade("", sol, puzzle) == (False, 0.0)
  with pytest.raises(ValueError, match="64 digits"):
    sudoku4_grade(sol, sol[:16], puzzle)


def test_grade_through_the_registry(examples):
  ex = examples[1]
  extra = json.loads(ex["extra_json"])
  g = rewards.grade("sudoku4", ex["ground_truth"], ex["ground_truth"], extra)
  assert g.correct and g.reward == 1.0 and g.score == 1.0
  g = rewards.grade("sudoku4", extra["puzzle"], ex["ground_truth"], extra)
  assert not g.correct and g.reward == 0.0
  with pytest.raises(ValueError, match="extra\\['puzzle'\\]"):
    rewards.grade("sudoku4", ex["ground_truth"], ex["ground_truth"], {})


def test_row_check_and_registry(examples):
  assert "sudoku4" in registry.names("demo") and "sudoku4" in registry.names("sft")
  assert "sudoku4" not in registry.names("train")  # generated only: no task.name=sudoku4
  ex = examples[2]
  extra = json.loads(ex["extra_json"])
  assert _check_sudoku4(ex["ground_truth"], dict(extra)) == extra
  with pytest.raises(records.BadRow, match="contradicts"):
    _check_sudoku4(ex["ground_truth"], {"puzzle": "1" * 64})
  with pytest.raises(records.BadRow, match="64 digits 1-4"):
    _check_sudoku4("5" * 64, extra)
