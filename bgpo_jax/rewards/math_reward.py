"""GSM8K (numeric) and MATH / MATH-500 (LaTeX, via math-verify) rewards.

Both cut the completion at its first end-of-turn token first (see `extract.end_of_response`).

gsm8k: the answer text is the last `\\boxed{...}` holding a number inside the last
`<answer>...</answer>`, else that tag's content if it holds a number, else the last `\\boxed{...}`
anywhere. As in d1's evaluation, a completion with neither a box nor an answer tag has no answer
(a number merely mentioned in the reasoning is not one). The answer's last number must equal the
ground truth numerically ("1,234", "$18", "-3", "5.0" == 5, trailing units / text are ignored;
d1 reads "1,234" as 1 or 234, one of the cases BENCHMARKS.md counts).

math / math500: the answer is the last `\\boxed{...}` anywhere in the completion (several boxed
answers: the last wins), else the last answer tag's content. It must be mathematically
equivalent to the ground truth according to math-verify (`\\boxed{\\frac{1}{2}}` == 0.5).
math-verify's own timeouts use signal.alarm, which fails outside the main thread (and would
cancel other SIGALRM users such as pytest-timeout), so comparisons run in persistent worker
processes (`_math_worker.py`): the worker uses math-verify's timeouts in its own main thread
and the caller enforces a hard wall-clock limit, killing and restarting a stuck worker.
Answers that are equal as plain numbers or as normalized strings are accepted without a
worker round trip. If no worker can be started (math-verify missing), only those two checks
apply (a warning is logged once).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import re
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

from bgpo_jax.rewards._process_wide import process_wide
from bgpo_jax.rewards.extract import answer_tag, boxed_all, end_of_response, last_boxed

log = logging.getLogger(__name__)

_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]])[-\u2212])?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+")


def parse_number(text: str) -> float | None:
  """Float value of a number string: "1,234" -> 1234, "$-5" / "-$5" -> -5, "5.0" -> 5."""
  t = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
  t = t.replace("\\!", "").replace("\\,", "")
  try:
    v = float(t)
  except ValueError:
    return None
  return v if math.isfinite(v) else None


def last_number(text: str) -> float | None:
  """The last number in `text` (thousands separators, sign and "$" allowed)."""
  text = text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
  found = _NUMBER_RE.findall(text)
  for cand in reversed(found):
    v = parse_number(cand)
    if v is not None:
      return v
  return None


def numbers_equal(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def gsm8k_answer_text(completion: str) -> str | None:
  """The answer text of a gsm8k completion (module docstring), or None."""
  completion = end_of_response(completion)
  has_digit = lambda t: t is not None and re.search(r"\d", t) is not None
  tag = answer_tag(completion)
  if tag is not None:
    boxes = [b for b in boxed_all(tag) if has_digit(b)]
    if boxes:
      return boxes[-1]
    if has_digit(tag):
      return tag
  boxes = [b for b in boxed_all(completion) if has_digit(b)]
  return boxes[-1] if boxes else None


def gsm8k_reward(completion: str, ground_truth: str) -> float:
  gt = parse_number(str(ground_truth))
  if gt is None:
    gt = last_number(str(ground_truth))
  if gt is None:
    raise ValueError(f"gsm8k ground truth {ground_truth!r} is not a number")
  text = gsm8k_answer_text(completion)
  pred = last_number(text) if text is not None else None
  return float(pred is not None and numbers_equal(pred, gt))


def math_answer_text(completion: str) -> str | None:
  """The last \\boxed{...} anywhere, else the last answer tag's content (without an inner
  box), else None."""
  completion = end_of_response(completion)
  boxed = last_boxed(completion)
  if boxed is not None:
    return boxed
  tag = answer_tag(completion)
  if tag:
    return tag.strip().strip("$").strip()
  return None


def _normalize(s: str) -> str:
  s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\s+", "", s)
  s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
  s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
  return s.rstrip(".").strip("$")


class MathVerifier:
  """Thread-safe pool of math-verify worker processes with a hard per-call time limit."""

  def __init__(self, num_workers: int = 1, timeout_s: float = 5.0, memory_mb: int = 4096,
               worker_script: str | None = None):
    """num_workers: concurrent comparisons (worker processes, started lazily). timeout_s:
    per-comparison limit. memory_mb: RLIMIT_AS of each worker. worker_script: for tests."""
    self.timeout_s = timeout_s
    self.memory_mb = memory_mb
    self._script = worker_script or str(Path(__file__).with_name("_math_worker.py"))
    self._idle: queue.Queue = queue.Queue()
    for _ in range(max(1, num_workers)):
      self._idle.put(None)  # a slot; the process starts lazily
    self._all: list[subprocess.Popen] = []
    self._lock = threading.Lock()
    self._broken = False
    self._closed = False

  def _start(self) -> subprocess.Popen | None:
    if self._broken:
      return None
    worker = self._script
    p = None
    try:
      p = subprocess.Popen(
          [sys.executable, "-I", worker, str(self.memory_mb)], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
      # Imports (sympy, antlr) take ~1-2 s on a small CPU; allow generously.
      line = _readline(p.stdout, time.monotonic() + 120.0)
      if line is None or not json.loads(line).get("ready"):
        raise RuntimeError("math-verify worker did not start (is math-verify installed?)")
    except Exception as e:  # noqa: BLE001
      log.warning("math-verify unavailable (%s); MATH answers are compared as numbers or "
                  "normalized strings only", e)
      self._broken = True
      if p is not None:
        p.kill()
        p.wait()
      return None
    with self._lock:
      self._all.append(p)
    return p

  def _kill(self, p: subprocess.Popen) -> None:
    try:
      p.kill()
      p.wait(timeout=5)
    except Exception:  # noqa: BLE001
      pass
    with self._lock:
      if p in self._all:
        self._all.remove(p)

  def equivalent(self, gold: str, pred: str, timeout_s: float | None = None) -> bool | None:
    """math-verify equivalence of two LaTeX answers (content of a box, no `$`); None when no
    worker is available. A timeout counts as "not equivalent"."""
    if self._closed:
      raise RuntimeError("MathVerifier is closed")
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    p = self._idle.get()
    try:
      if p is None or p.poll() is not None:
        p = self._start()
      if p is None:
        return None
      req = {"gold": f"\\boxed{{{gold}}}", "pred": f"\\boxed{{{pred}}}",
             "timeout": max(1, math.ceil(timeout_s))}
      try:
        p.stdin.write((json.dumps(req) + "\n").encode())
        p.stdin.flush()
      except OSError:
        self._kill(p)
        p = None
        return False
      # One extra second over the worker's own limit before the hard kill.
      line = _readline(p.stdout, time.monotonic() + timeout_s * 2 + 1.0)
      if line is None:
        self._kill(p)
        p = None
        return False
      return bool(json.loads(line).get("ok"))
    finally:
      self._idle.put(p)

  def warmup(self) -> None:
    """Starts every worker now (imports take a second or two) instead of on first use."""
    slots = [self._idle.get() for _ in range(self._idle.qsize())]
    try:
      slots = [p if (p is not None and p.poll() is None) else self._start() for p in slots]
    finally:
      for p in slots:
        self._idle.put(p)

  def close(self) -> None:
    self._closed = True
    with self._lock:
      procs = list(self._all)
    for p in procs:
      self._kill(p)


def _readline(stream, deadline: float) -> str | None:
  """One line from a worker's stdout, or None on EOF / deadline. Reads the raw fd (no Python
  buffering), so each call consumes exactly one answer line."""
  fd = stream.fileno()
  buf = b""
  with selectors.DefaultSelector() as sel:
    sel.register(fd, selectors.EVENT_READ)
    while not buf.endswith(b"\n"):
      left = deadline - time.monotonic()
      if left <= 0 or not sel.select(left):
        return None
      chunk = os.read(fd, 1)  # answers are tiny: byte reads keep line boundaries exact
      if not chunk:
        return None
      buf += chunk
  return buf.decode()


@process_wide
def default_verifier() -> MathVerifier:
  """The process-wide verifier (its worker process is closed at exit)."""
  verifier = MathVerifier()
  atexit.register(verifier.close)
  return verifier


def math_reward(completion: str, ground_truth: str, verifier: MathVerifier | None = None,
                timeout_s: float | None = None) -> float:
  pred = math_answer_text(completion)
  if pred is None or not pred.strip():
    return 0.0
  gold = str(ground_truth).strip()
  a, b = parse_number(pred), parse_number(gold)
  if a is not None and b is not None:
    return float(numbers_equal(a, b))
  if _normalize(pred) == _normalize(gold):
    return 1.0
  ok = (verifier or default_verifier()).equivalent(gold, pred, timeout_s)
  return float(bool(ok))
