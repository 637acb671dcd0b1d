"""What the loop shows and hears on the host: a progress line, and SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import time

import jax
import numpy as np


class Preemption:
  """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits 0."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    logging.warning("signal %d: finishing this step, saving a checkpoint, then exiting", signum)
    self.requested = True

  def agreed(self) -> bool:
    """True on every host when any host was signalled (a signal may reach hosts at different
    steps; all must save at the same step, or they would wait on each other forever)."""
    if jax.process_count() == 1:
      return bool(self.requested)
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


class Progress:
  """A one-line console progress bar with ETA (plain log lines when not a terminal)."""

  def __init__(self, total: int, start: int, label: str, sft_end: int = 0):
    """sft_end: the step where an SFT warm-up hands over to RL (0 = no warm-up). Until then the
    ETA covers the warm-up only: RL steps cost far more, and their rate is not known yet."""
    self.total, self.start, self.label, self.sft_end = total, start, label, sft_end
    self.tty = sys.stderr.isatty()
    # The rate is measured within the current phase (an RL step costs ~25 SFT steps in the demo).
    self.phase, self.phase_step, self.phase_t0 = None, start, time.time()
    self.last_step, self.last_t = start, self.phase_t0

  def update(self, step: int, info: str, phase: str | None = None) -> None:
    now = time.time()
    if phase != self.phase:
      self.phase, self.phase_step, self.phase_t0 = phase, self.last_step, self.last_t
    self.last_step, self.last_t = step, now
    rate = (now - self.phase_t0) / max(step - self.phase_step, 1)
    if phase == "sft" and step < self.sft_end < self.total:
      eta = f"sft eta {rate * (self.sft_end - step):5.0f}s, then {self.total - self.sft_end} rl steps"
    else:
      eta = f"eta {rate * (self.total - step):5.0f}s"
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    line = f"{self.label} [{bar}] {step}/{self.total} {eta} {info}"
    if self.tty:
      sys.stderr.write("\r" + line[:200].ljust(200))
      sys.stderr.flush()
      if step >= self.total:
        sys.stderr.write("\n")
    else:
      print(line, flush=True)
