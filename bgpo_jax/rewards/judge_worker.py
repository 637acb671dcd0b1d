"""The grading worker: a long-lived process that runs `judge.judge` for the grading process.

The test's own code runs here, on data the program chose, so a program can still try to stall
it (a list of values that share a hash, which the test turns into a set, takes quadratic
time inside one C call no thread can interrupt). In a separate process that stall is bounded:
`judge.judge_isolated` kills the worker when a verdict is late, which also ends its sandbox
(the launcher dies with its parent), and starts a new one for the next row. Each grading
thread keeps its own worker, so a trainer's reward threads never wait on the GIL for tests.

    python -m bgpo_jax.rewards.judge_worker REQUEST_FD ANSWER_FD UID

Frames both ways: 4-byte little-endian length, then marshal data (the grading process writes
the requests; the answers come from judge.judge, whose Verdict holds plain data only).
"""

import ctypes
import dataclasses
import marshal
import os
import sys

from bgpo_jax.rewards import code_tests, judge, sandbox


def read_frame(fd: int) -> bytes | None:
  head = _read_exactly(fd, 4)
  return None if head is None else _read_exactly(fd, int.from_bytes(head, "little"))


def _read_exactly(fd: int, n: int) -> bytes | None:
  buf = b""
  while len(buf) < n:
    chunk = os.read(fd, n - len(buf))
    if not chunk:
      return None
    buf += chunk
  return buf


def write_frame(fd: int, payload: bytes) -> None:
  data = memoryview(len(payload).to_bytes(4, "little") + payload)
  while data:
    data = data[os.write(fd, data):]


def main(argv: list[str]) -> None:
  req, ans, uid = int(argv[1]), int(argv[2]), int(argv[3])
  try:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: die with the trainer
  except (OSError, AttributeError):
    pass
  sandbox._UIDS = sandbox._UidSlots(uid, 1)  # this worker's own sandbox uid (one run at a time)
  write_frame(ans, marshal.dumps("ready"))
  while True:
    frame = read_frame(req)
    if frame is None:
      return  # the grading process closed the pipe or exited
    solution, fields, timeout_s, memory_mb, kwargs = marshal.loads(frame)
    v = judge.judge(solution, code_tests.TrustedTest(*fields), timeout_s, memory_mb, **kwargs)
    box = dataclasses.astuple(v.sandbox) if v.sandbox is not None else None
    write_frame(ans, marshal.dumps((v.passed, v.status, v.detail, box)))


if __name__ == "__main__":
  main(sys.argv)
