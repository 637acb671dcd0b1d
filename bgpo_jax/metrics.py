"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import numpy as np


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricsWriter:
  """Appends `{"step": s, key: value, ...}` lines; mirrors scalars to TensorBoard when available.

  Only process 0 writes. On resume, lines with a step after the resumed checkpoint's step are
  dropped first (they were written after that checkpoint was saved and will be written again), so
  the file never holds the same step twice.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate(resume_step)
    try:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except Exception as e:  # TensorBoard is a convenience; metrics.jsonl is the record.
      logging.warning("TensorBoard disabled (%s); metrics.jsonl is still written", e)

  def _truncate(self, resume_step: int) -> None:
    with open(self.path) as f:
      lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(lines)

  def write(self, step: int, metrics: Mapping[str, float]) -> dict:
    row = {"step": int(step)}
    for k, v in metrics.items():
      try:
        x = _scalar(v)
      except (TypeError, ValueError):
        continue
      row[k] = x if math.isfinite(x) else str(x)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in row.items():
          if k != "step" and isinstance(v, float):
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a run?")
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
