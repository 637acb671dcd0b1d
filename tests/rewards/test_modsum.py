"""modsum, the generated long-response task: its puzzles, its reward and its place in the registry."""

import json

import pytest

from bgpo_jax import rewards
from bgpo_jax.data import dataset, procedural, records
from bgpo_jax.rewards.modsum import modsum_grade
from bgpo_jax.tasks import registry
from bgpo_jax.tasks.builtin import _check_modsum
from bgpo_jax.tokenizer import CharTokenizer


def test_steps_are_adjacent_pair_sums():
  assert procedural.modsum_steps("739") == ["0", "2"]
  assert procedural.modsum_steps("1928") == ["0", "1", "0"]
  with pytest.raises(ValueError, match="at least 2 decimal digits"):
    procedural.modsum_steps("7")


def test_generator_is_deterministic_unique_and_split():
  train = procedural.demo_examples("modsum", "train", n=200, seed=1)
  again = procedural.demo_examples("modsum", "train", n=200, seed=1)
  test = procedural.demo_examples("modsum", "test", n=50, seed=1)
  assert train == again
  digits = [json.loads(e["extra_json"])["digits"] for e in train]
  test_digits = {json.loads(e["extra_json"])["digits"] for e in test}
  assert len(set(digits)) == 200 and not set(digits) & test_digits
  for e, d in zip(train[:20], digits):
    assert len(d) == 33 and e["ground_truth"].split() == procedural.modsum_steps(d)
    assert len(e["ground_truth"]) == 63  # + the end-of-turn token: the 64-token canvas
  with pytest.raises(ValueError, match="num_digits 1"):
    procedural.generate_modsum(2, num_digits=1)


def test_demo_prompt_fits_the_sweep_bucket():
  """The n sweep pads prompts to 96 tokens (n_sweep.TASK_OVERRIDES): every demo prompt fits."""
  tok = CharTokenizer()
  ex = procedural.demo_examples("modsum", "test", n=5, seed=0)
  lengths = {len(dataset.encode_prompt(tok, json.loads(e["prompt_json"]))) for e in ex}
  assert lengths == {95}


@pytest.mark.parametrize("completion, correct, score", [
    ("0 2", True, 1.0),
    ("0 2<|eot_id|>junk", True, 1.0),  # cut at the end of turn
    ("0 3", False, 0.5),
    ("2", False, 0.0),  # a skipped sum shifts every later one
    ("0", False, 0.5),
    ("0 2 5", False, 1.0),  # every sum right, but more written than asked
    ("", False, 0.0),
])
def test_grade(completion, correct, score):
  assert modsum_grade(completion, "739") == (correct, score)


def test_grade_through_the_registry():
  ex = procedural.demo_examples("modsum", "train", n=1, seed=0)[0]
  extra = json.loads(ex["extra_json"])
  right = rewards.grade("modsum", ex["ground_truth"], ex["ground_truth"], extra)
  assert right.correct and right.reward == 1.0 and right.score == 1.0
  wrong = ex["ground_truth"].split()
  wrong[0] = str((int(wrong[0]) + 1) % 10)
  g = rewards.grade("modsum", " ".join(wrong), ex["ground_truth"], extra)
  assert not g.correct and g.reward == pytest.approx(31 / 32)
  with pytest.raises(ValueError, match="extra\\['digits'\\]"):
    rewards.grade("modsum", "0 2", "0 2", {})


def test_row_check_and_registry():
  assert "modsum" in registry.names("demo") and "modsum" in registry.names("sft")
  assert "modsum" not in registry.names("train")  # generated only: no task.name=modsum
  assert _check_modsum("0 2", {"digits": "739"}) == {"digits": "739"}
  with pytest.raises(records.BadRow, match="not the pair sums"):
    _check_modsum("0 3", {"digits": "739"})
  with pytest.raises(records.BadRow, match="digits"):
    _check_modsum("0 2", {"digits": "7a9"})
