"""Updates skipped for a NaN/Inf loss or gradient norm: counted, and a stop after too many in a row.

The train step itself leaves the state untouched on such an update (train/update_skipped); this
counts them on the host across the run (a metric kept across resumes) and in a row.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bgpo_jax import checkpoint as ckpt_lib


class NonFiniteError(ckpt_lib.RunError):
  """optim.max_nonfinite_steps updates in a row had a NaN/Inf loss or gradient norm."""


class NonFiniteCounter:
  """limit: optim.max_nonfinite_steps (0 = never stop); workdir: named in the stop message."""

  def __init__(self, limit: int, workdir: str):
    self.limit, self.workdir = limit, workdir
    self.total, self.in_a_row, self.stop = 0, 0, None

  def count(self, step: int, updates: list[dict], latest_checkpoint: Callable[[], int | None]) -> None:
    """Counts the skipped updates among `updates` (each update's metrics, on host), sets
    train/nonfinite_steps (skipped updates since the run started) on the last one and notes a
    stop (`self.stop`, the message) after `limit` skipped in a row."""
    for u in updates:
      if float(u.pop("train/update_skipped", 0.0)) <= 0:
        self.in_a_row = 0
        continue
      self.total += 1
      self.in_a_row += 1
      if self.limit and self.in_a_row >= self.limit and self.stop is None:
        loss = float(u["train/loss"])
        which, value = ("loss", loss) if not np.isfinite(loss) else ("grad_norm", float(u["train/grad_norm"]))
        self.stop = (
            f"stopped at step {step}: train/{which} is {value}; {self.in_a_row} updates in a row were "
            f"skipped for a NaN/Inf loss or gradient norm (optim.max_nonfinite_steps={self.limit}). The params are "
            f"those of the last finite update (latest checkpoint: step {latest_checkpoint()}); look for bad "
            f"data, rewards or weights, and to retry with other settings start a new --workdir with "
            f"--config.init.checkpoint={self.workdir}")
    updates[-1]["train/nonfinite_steps"] = float(self.total)

  def raise_if_stopped(self) -> None:
    if self.stop:
      raise NonFiniteError(self.stop)
