"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard event files.

Paths go through `etils.epath` (local, gs://, s3://, ... the filesystems Orbax uses), never
`open` / `os.path`: with a remote workdir the files land in the bucket, not in a local
`./gs:/...` folder. Object stores cannot append, so on a remote workdir metrics.jsonl is
rewritten whole at each write (it is small: one line per logged step) and TensorBoard event
files are uploaded whole at each flush.
"""

from __future__ import annotations

import json
import logging
import math
import io
from typing import Mapping

import numpy as np
from etils import epath


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricsWriter:
  """Appends `{"step": s, key: value, ...}` lines; mirrors scalars to TensorBoard when available.

  Only process 0 writes. On resume, lines with a step after the resumed checkpoint's step are
  dropped first (they were written after that checkpoint was saved and will be written again), so
  the file never holds the same step twice. The rows are also kept in memory (one short line per
  logged step): a metrics.jsonl deleted during the run is rewritten whole, with a warning.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.remote = is_remote(workdir)
    self._lines: list[str] = []  # every row; a remote workdir rewrites the whole file at each write
    self._tb = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      lines = [l + "\n" for l in self.path.read_text().splitlines() if l.strip()]
      if resume_step is not None:
        lines = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
        self.path.write_text("".join(lines))
      self._lines = lines
    try:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      tb_dir = str(epath.Path(workdir) / "tensorboard")
      if self.remote:
        _register_tensorboard_scheme(tb_dir)
      self._tb = SummaryWriter(tb_dir)
    except Exception as e:  # TensorBoard is a convenience; metrics.jsonl is the record.
      logging.warning("TensorBoard disabled (%s); metrics.jsonl is still written", e)

  def write(self, step: int, metrics: Mapping[str, float]) -> dict:
    row = {"step": int(step)}
    for k, v in metrics.items():
      try:
        x = _scalar(v)
      except (TypeError, ValueError):
        continue
      row[k] = x if math.isfinite(x) else str(x)
    if self.enabled:
      line = json.dumps(row) + "\n"
      if self.remote:
        self._lines.append(line)
        self.path.write_text("".join(self._lines))
      else:
        if self._lines and not self.path.exists():
          logging.warning("%s was deleted during the run; rewrote it with its %d earlier rows", self.path,
                          len(self._lines))
          self.path.parent.mkdir(parents=True, exist_ok=True)
          self.path.write_text("".join(self._lines))
        with self.path.open("a") as f:
          f.write(line)
        self._lines.append(line)
      if self._tb is not None:
        for k, v in row.items():
          if k != "step" and isinstance(v, float):
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None  # idempotent


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a run?")
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def is_remote(path) -> bool:
  """True for a URI path (gs://, s3://, ...): written through epath, no appends, no local os calls."""
  return "://" in str(path)


class _EpathEventFile:
  """A TensorBoard event file on an object store: bytes buffered, the object rewritten on flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFactory:
  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_scheme(path: str) -> None:
  """tensorboardX picks a writer by the path's scheme; ours (epath) serves every URI scheme, so
  TensorBoard needs no cloud SDK of its own."""
  from tensorboardX import record_writer
  record_writer.register_writer_factory(path.split("://", 1)[0], _EpathEventFactory())
