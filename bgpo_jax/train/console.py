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


def duration(seconds: float) -> str:
  """42s, 6m05s, 2h03m: an ETA reads at a glance."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s // 60 % 60:02d}m"


def _num(v) -> float | None:
  try:
    x = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return x if np.isfinite(x) else None


class Progress:
  """The progress line: where the run is, what it learns and when each phase ends.

  `update` is called after every step (its timing feeds the ETA) and prints a line on logged steps:
  during SFT the loss, during RL the reward, accuracy, response length and the step's rollout /
  reward / train seconds (the RL objective's loss is ~0 by construction and says nothing). On a
  terminal the line is rewritten in place; otherwise (a log file, a pipe) each is a plain line.

  The ETA of a phase comes from that phase's own step times (an RL step costs tens of SFT steps in the
  demo), leaving out each phase's first step (it compiles) and the evaluations' time, which is
  added per evaluation still due. During SFT, RL's time is added once an RL step has been timed.
  """

  def __init__(self, total: int, start: int, label: str, sft_end: int = 0, eval_every: tuple[int, int] = (0, 0),
               stream=None, clock=time.monotonic):
    """sft_end: the step where an SFT warm-up hands over to RL (0 = none); eval_every: the SFT and
    the RL phases' evaluation interval in steps (0 = no evaluation); their last steps evaluate too.
    stream: where lines go (default: stderr on a terminal, else stdout)."""
    self.total, self.start, self.label, self.sft_end = total, start, label, sft_end
    self.eval_every = dict(zip(("sft", "rl"), eval_every))
    if stream is None:
      stream = sys.stderr if sys.stderr.isatty() else sys.stdout
    self.stream, self.clock = stream, clock
    self.tty = bool(getattr(stream, "isatty", lambda: False)())
    self.t0 = self.last_t = clock()
    self.step_times: dict[str, list[float]] = {"sft": [], "rl": []}
    self.seen: set[str] = set()  # phases whose first (compiling) step is done
    self.eval_times: list[float] = []
    self.last_eval: tuple[int, float] | None = None  # (step, eval/accuracy)

  def update(self, step: int, phase: str, metrics: dict, show: bool = True) -> None:
    """After step `step` (counted from 1) of `phase` ("sft" / "rl"), with its metrics."""
    now = self.clock()
    dt, self.last_t = now - self.last_t, now
    eval_s = _num(metrics.get("time/eval_s"))
    if eval_s is not None:
      self.eval_times.append(eval_s)
      dt -= eval_s
    if phase in self.seen:
      self.step_times[phase].append(max(dt, 0.0))
    self.seen.add(phase)
    acc = _num(metrics.get("eval/accuracy"))
    if acc is not None:
      self.last_eval = (step, acc)
    if show:
      self._write(self.line(step, phase, metrics), last=step >= self.total)

  # --------------------------------------------------------------------------- the line
  def line(self, step: int, phase: str, metrics: dict) -> str:
    frac = min(step / max(self.total, 1), 1.0)
    bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
    parts = [f"{self.label} [{bar}] {step}/{self.total} {phase}", self.eta(step, phase)]
    get = lambda k: _num(metrics.get(k))
    if phase == "sft":
      shown = [("loss", get("train/loss"), ".4g")]
    else:  # "acc": the share of fully correct rollouts in this step's batch
      shown = [("reward", get("train/reward_mean"), ".3f"), ("acc", get("train/accuracy"), ".3f"),
               ("len", get("train/response_len"), ".1f")]
    values = [f"{name}={v:{fmt}}" for name, v, fmt in shown if v is not None]
    if self.last_eval is not None:  # the latest held-out accuracy and the step it was measured at
      values.append(f"eval_acc={self.last_eval[1]:.3f}@{self.last_eval[0]}")
    parts.append(" ".join(values))
    if phase != "sft":
      times = [(name, get(f"time/{name}_s")) for name in ("rollout", "reward", "train")]
      if any(t is not None for _, t in times):
        parts.append("time " + " ".join(f"{name} {t:.2f}s" for name, t in times if t is not None))
    return " | ".join(p for p in parts if p)

  def _write(self, line: str, last: bool = False) -> None:
    if self.tty:
      import shutil
      width = max(shutil.get_terminal_size().columns - 1, 40)  # a wrapped line would not be rewritten
      self.stream.write("\r" + line[:width].ljust(width) + ("\n" if last else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  # --------------------------------------------------------------------------- the ETA
  def _phase_end(self, phase: str) -> int:
    return self.sft_end if phase == "sft" and 0 < self.sft_end < self.total else self.total

  def evals_due(self, step: int, phase: str) -> int:
    """Evaluations after `step` up to the end of `phase`: every eval_every steps and at its end."""
    every, end = self.eval_every.get(phase, 0), self._phase_end(phase)
    if not every or end <= step:
      return 0
    return end // every - step // every + (1 if end % every else 0)

  def eval_time(self) -> float | None:
    """Seconds per evaluation; the first one compiles the sampler, so it counts only while alone."""
    if not self.eval_times:
      return None
    times = self.eval_times[1:] or self.eval_times
    return sum(times) / len(times)

  def phase_eta(self, step: int, phase: str) -> tuple[str, float | None]:
    """(text, seconds) of what is left of `phase` after `step`; seconds None while not yet timed."""
    name, times = phase.upper(), self.step_times[phase]
    start = self.sft_end if phase == "rl" else 0
    left = self._phase_end(phase) - max(step, start)
    if left <= 0:
      return f"{name} done", 0.0
    if not times:
      return f"{name}: not yet timed", None
    rate = sum(times) / len(times)
    secs, extra = rate * left, ""
    evals = self.evals_due(max(step, start), phase)
    if evals:
      per_eval = self.eval_time()
      if per_eval is None:
        extra = f" + {evals} evals"
      else:
        secs += evals * per_eval
    return f"{name} {duration(secs)} left{extra} ({rate:.3g} s/step)", secs

  def eta(self, step: int, phase: str) -> str:
    if step >= self.total:
      return f"done in {duration(self.last_t - self.t0)}"
    text, secs = self.phase_eta(step, phase)
    if phase == "sft" and 0 < self.sft_end < self.total:
      rl_text, rl_secs = self.phase_eta(step, "rl")
      text += f", {rl_text}"
      if secs is not None and rl_secs is not None:
        text += f", all {duration(secs + rl_secs)}"
    return "eta " + text
