"""Fixtures shared by the test modules."""

import pytest


def _record_rl_batches(mp: pytest.MonkeyPatch) -> list[dict]:
  """Patches the training loop so that each RL step's batch is kept, in order: dicts with "batch"
  (host arrays: tokens after the stop-token fill, attention_mask, advantages) and "updates" (the
  global batch of each inner update, the objective's fields and old / reference terms included)."""
  from bgpo_jax.train import loop
  seen: list[dict] = []
  orig = loop.rl_updates

  def rl_updates(run, step, batch, lengths):
    updates = orig(run, step, batch, lengths)
    seen.append({"batch": batch, "updates": updates})
    return updates

  mp.setattr(loop, "rl_updates", rl_updates)
  return seen


@pytest.fixture(scope="session")
def record_rl_batches():
  """`record_rl_batches(monkeypatch) -> list`: see `_record_rl_batches`."""
  return _record_rl_batches
