"""The code-reward verdict: tests run in the grading process, the solution in the sandbox.

`judge(solution, test)` starts the solution in a sandbox (rewards.sandbox) under a small call
server, then runs the TrustedTest (rewards.code_tests) here. Each call the test makes to a
solution name goes over a pipe: the arguments travel as plain data, the sandbox calls the
function and answers with the result as plain data. The test's comparisons, its expected
values and its helpers stay in this process, which never runs candidate code, so the program
cannot compute or influence the verdict: patching builtins, walking frames, tracing, reading its
own files or returning an object whose `__eq__` is always True change nothing here.

Plain data: None, bool, int, float, complex, str, bytes, bytearray, and list / tuple / dict /
set / frozenset of plain data, nested at most `MAX_DEPTH` deep. The answer is decoded here into
fresh builtin objects from a tagged JSON line: whatever the program writes, only such data can
come out (an instance of a subclass, e.g. a namedtuple or a Counter, arrives as its base type's
data: its own `__eq__` never runs here). A result that is not plain data stays
in the sandbox as a handle: the test may pass it back into calls or read its attributes there
(MBPP's `Pair(5, 24)` objects), but comparing, hashing or iterating it fails the test.

Fails closed: an answer that is not a well-formed message, a sandbox that dies, times out or
floods its output, a test that makes no call, or an argument the test passes that is not plain
data (counted as `unrewritable`) fails the row. Exceptions the solution raises come back as a
fresh exception of their nearest builtin class (a short list; anything else is
`CandidateError`), never StopIteration, which would end the test's own loops early.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import marshal
import os
import selectors
import subprocess
import sys
import threading
import time

from bgpo_jax.rewards import code_tests
from bgpo_jax.rewards import sandbox as _sandbox
from bgpo_jax.rewards.sandbox import SandboxResult, SandboxRun

MAX_DEPTH = 64
MAX_MESSAGE_BYTES = 4 << 20  # one answer: more is an output flood
INT_TAG_BITS = 53  # ints beyond float precision travel as hex (no decimal digit limit)
HUGE_INT = 2 ** 61  # from here on, ints can be made to collide in hash (see _huge)
MAX_HUGE_INTS = 1000

# Exceptions the solution may raise that the test may catch by class.
_PASSED_EXCEPTIONS = frozenset({
    "ValueError", "TypeError", "KeyError", "IndexError", "ZeroDivisionError", "AttributeError",
    "ArithmeticError", "OverflowError", "LookupError", "NotImplementedError", "RuntimeError",
    "RecursionError", "NameError", "UnboundLocalError", "AssertionError", "Exception"})

# The sandbox side: `python -I -S -c CALL_SERVER prog.py MARKER_FD BASIC REQUEST_FD ANSWER_FD`.
# Runs prog.py as module `__solution__`, says "ready" (or the exception it raised), then answers
# one request at a time. Requests come as marshal (4-byte length, then the tagged value: the
# grading side writes them, so the sandbox may trust them); answers go back as one tagged JSON
# line, written without the json module (its import costs more than a short program's run).
# The encoder is only a courtesy to honest programs: the grading side trusts nothing it sends.
CALL_SERVER = r"""
import marshal, os, sys
os.close(int(sys.argv[2]))
_req, _ans = int(sys.argv[4]), int(sys.argv[5])
if sys.argv[3] == "1":
  import socket
  def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
  for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(socket, _n, _no_network)
try:
  from _json import encode_basestring_ascii as _qs
except ImportError:
  from json import dumps as _qs
with open(sys.argv[1], "rb") as _f:
  _src = _f.read()
sys.argv = ["prog.py"]
_mod = type(sys)("__solution__")
_mod.__file__ = "prog.py"
sys.modules["__solution__"] = _mod
def _send(text):
  data = (text + "\n").encode()
  while data:
    data = data[os.write(_ans, data):]
class _NotPlain(Exception):
  pass
_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
def _seq(xs, d):
  return ",".join([_enc(v, d + 1) for v in xs])
def _enc(x, d=0):
  t = type(x)
  if d > %(depth)d:
    raise _NotPlain
  if x is None:
    return "null"
  if t is bool:
    return "true" if x else "false"
  if t is str:
    return _qs(x)
  if t is int:
    return str(x) if -(2 ** %(int_bits)d) < x < 2 ** %(int_bits)d else '{"i":"%%x"}' %% x
  if t is float:
    r = repr(x)
    return _FLOATS.get(r, r)
  if t is list:
    return "[" + _seq(x, d) + "]"
  if t is tuple:
    return '{"t":[' + _seq(x, d) + "]}"
  if t is dict:
    return '{"d":[' + ",".join(["[" + _enc(k, d + 1) + "," + _enc(v, d + 1) + "]" for k, v in x.items()]) + "]}"
  if t is set or t is frozenset:
    return '{"' + ("s" if t is set else "f") + '":[' + _seq(x, d) + "]}"
  if t is bytes or t is bytearray:
    return '{"' + ("b" if t is bytes else "ba") + '":"' + x.hex() + '"}'
  if t is complex:
    return '{"c":[' + _enc(x.real) + "," + _enc(x.imag) + "]}"
  for base, plain in _BASES:  # subclasses (namedtuple, Counter, OrderedDict...): their data
    if isinstance(x, base):
      return _enc(plain(x), d)
  raise _NotPlain
_BASES = ((bool, bool), (int, int.__index__), (float, float.__float__), (str, str.__str__),
          (tuple, tuple), (list, list), (dict, dict), (frozenset, frozenset), (set, set),
          (bytes, bytes), (complex, complex))
_handles = []
def _dec(x):
  if type(x) is list:
    return [_dec(v) for v in x]
  if type(x) is not dict:
    return x
  (k, v), = x.items()
  if k == "h":
    return _handles[v]
  if k == "i":
    return int(v, 16)
  if k == "t":
    return tuple([_dec(e) for e in v])
  if k == "d":
    return {_dec(a): _dec(b) for a, b in v}
  if k in ("s", "f"):
    return (set if k == "s" else frozenset)([_dec(e) for e in v])
  if k in ("b", "ba"):
    return (bytes if k == "b" else bytearray).fromhex(v)
  if k == "c":
    return complex(v[0], v[1])
  raise ValueError(k)
def _ref(r):
  return _handles[r["h"]] if "h" in r else _mod.__dict__[r["n"]]
def _read(n):
  b = b""
  while len(b) < n:
    c = os.read(_req, n - len(b))
    if not c:
      sys.stdout.flush()
      os._exit(0)
    b += c
  return b
try:
  exec(compile(_src, "solution.py", "exec"), _mod.__dict__)
except BaseException as e:
  _send('{"load":' + _qs(type(e).__name__) + "}")
  os._exit(0)
_send('{"ready":1}')
while True:
  _msg = marshal.loads(_read(int.from_bytes(_read(4), "little")))
  try:
    if _msg["op"] == "getattr":
      _r = getattr(_ref(_msg["o"]), _msg["n"])
    else:
      try:
        _f = _ref(_msg["f"])
      except KeyError:
        raise NameError("name %%r is not defined" %% _msg["f"].get("n")) from None
      _r = _f(*[_dec(a) for a in _msg["a"]], **{k: _dec(v) for k, v in _msg["k"]})
    try:
      _out = '{"v":' + _enc(_r) + "}"
    except (_NotPlain, RecursionError):
      _handles.append(_r)
      _out = '{"h":%%d}' %% (len(_handles) - 1)
  except BaseException as e:
    _cls = next(c for c in type(e).__mro__ if c.__module__ == "builtins")
    _out = '{"e":' + _qs(_cls.__name__) + "}"
  sys.stdout.flush()
  _send(_out)
""" % {"depth": MAX_DEPTH, "int_bits": INT_TAG_BITS}


class CandidateError(Exception):
  """The solution raised an exception the test cannot catch by class."""


class _Abort(BaseException):
  """Ends the test at once (a BaseException, so the test's own `except Exception` cannot
  swallow it): the sandbox died, timed out, broke the protocol, or the test is unrewritable."""


class _NotSendable(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Verdict:
  """passed: the test ran to its end here, having called the solution at least once.
  status: passed | failed (an assert or exception in the test, or the solution raised at import)
    | unrewritable | timeout | memory | output_limit | signal | error (the sandbox's).
  detail: one line saying why. sandbox: the run's SandboxResult (stdout / stderr tails)."""
  passed: bool
  status: str
  detail: str
  sandbox: SandboxResult | None = None


def _encode(x, depth: int = 0):
  """Plain data -> tagged JSON value (the grading side's arguments); _NotSendable otherwise."""
  t = type(x)
  if depth > MAX_DEPTH:
    raise _NotSendable("nested too deep")
  if x is None or t in (bool, str, float):
    return x
  if t is int:
    return x if abs(x) < 2 ** INT_TAG_BITS else {"i": format(x, "x")}
  if t is list:
    return [_encode(v, depth + 1) for v in x]
  if t is tuple:
    return {"t": [_encode(v, depth + 1) for v in x]}
  if t is dict:
    return {"d": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in x.items()]}
  if t in (set, frozenset):
    return {"s" if t is set else "f": [_encode(v, depth + 1) for v in x]}
  if t in (bytes, bytearray):
    return {"b" if t is bytes else "ba": x.hex()}
  if t is complex:
    return {"c": [x.real, x.imag]}
  if t is RemoteHandle:
    return {"h": x._id}
  raise _NotSendable(f"an argument of type {t.__name__} cannot be sent to the sandbox")


def decode(x):
  """Tagged JSON value from the sandbox -> fresh builtin objects; ValueError when malformed."""
  return _decode(x, 0, [MAX_HUGE_INTS])


def _huge(n: int, budget: list) -> int:
  # Ints of 2**61 and beyond can share a hash (hash(n) is n mod 2**61 - 1): many of them in a
  # set, or in a list the test makes a set of, would cost the grading process quadratic time.
  if not -HUGE_INT < n < HUGE_INT:
    budget[0] -= 1
    if budget[0] < 0:
      raise ValueError(f"more than {MAX_HUGE_INTS} ints of 2**61 or more")
  return n


def _decode(x, depth: int, budget: list):
  if depth > MAX_DEPTH:
    raise ValueError("nested too deep")
  t = type(x)
  if x is None or t in (bool, str, float):
    return x
  if t is int:
    return _huge(x, budget)
  if t is list:
    return [_decode(v, depth + 1, budget) for v in x]
  if t is not dict or len(x) != 1:
    raise ValueError(f"malformed value of type {t.__name__}")
  (k, v), = x.items()
  if k == "i" and type(v) is str:
    return _huge(int(v, 16), budget)
  if k in ("t", "s", "f") and type(v) is list:
    items = [_decode(e, depth + 1, budget) for e in v]
    return tuple(items) if k == "t" else set(items) if k == "s" else frozenset(items)
  if k == "d" and type(v) is list:
    out = {}
    for pair in v:
      if type(pair) is not list or len(pair) != 2:
        raise ValueError("malformed dict item")
      out[_decode(pair[0], depth + 1, budget)] = _decode(pair[1], depth + 1, budget)
    return out
  if k in ("b", "ba") and type(v) is str:
    return (bytes if k == "b" else bytearray).fromhex(v)
  if k == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
    return complex(v[0], v[1])
  raise ValueError(f"malformed tag {k!r}")


class _Channel:
  """The grading side of the pipes to the call server."""

  def __init__(self, run: SandboxRun, request_fd: int, answer_fd: int):
    self.run, self.w, self.r = run, request_fd, answer_fd
    self.buf = bytearray()
    self.failure: tuple[str, str] | None = None  # (status, detail) once the channel is dead
    self.calls = 0

  def fail(self, status: str, detail: str) -> _Abort:
    if self.failure is None:
      self.failure = (status, detail)
    return _Abort(detail)

  def receive(self) -> dict:
    while b"\n" not in self.buf:
      if len(self.buf) > MAX_MESSAGE_BYTES:
        raise self.fail("output_limit", f"an answer longer than {MAX_MESSAGE_BYTES} bytes")
      if not self.run.pump(until_fd=self.r):
        raise self.fail(self.run.reason or "failed", "the program ended before answering")
      chunk = os.read(self.r, 1 << 16)
      if not chunk:
        raise self.fail("failed", "the program closed its answer pipe (it exited)")
      self.buf += chunk
    line, _, rest = bytes(self.buf).partition(b"\n")
    self.buf = bytearray(rest)
    try:
      msg = json.loads(line)
    except (ValueError, RecursionError) as e:
      raise self.fail("failed", f"a malformed answer ({type(e).__name__})") from None
    if type(msg) is not dict or len(msg) != 1:
      raise self.fail("failed", "a malformed answer")
    return msg

  def request(self, msg: dict) -> dict:
    if self.failure is not None:
      raise _Abort(self.failure[1])
    payload = marshal.dumps(msg)
    data = memoryview(len(payload).to_bytes(4, "little") + payload)
    while data:
      if not self.run.pump(until_fd=self.w, write=True):
        raise self.fail(self.run.reason or "failed", "the program ended before reading a call")
      try:
        data = data[os.write(self.w, data):]
      except BrokenPipeError:
        raise self.fail("failed", "the program closed its request pipe") from None
      except BlockingIOError:
        continue
    self.calls += 1
    return self.receive()

  def answer(self, msg: dict):
    (key, value), = msg.items()
    if key == "v":
      try:
        return decode(value)
      except (ValueError, TypeError, RecursionError, MemoryError) as e:
        raise self.fail("failed", f"a result that is not plain data ({e})") from None
    if key == "h" and type(value) is int:
      return RemoteHandle(self, value)
    if key == "e" and type(value) is str:
      if value in _PASSED_EXCEPTIONS:
        raise getattr(builtins, value)(f"raised by the solution")
      raise CandidateError(f"the solution raised {value[:80]}")
    raise self.fail("failed", "a malformed answer")

  def send_args(self, args, kwargs) -> tuple[list, list]:
    try:
      return [_encode(a) for a in args], [[k, _encode(v)] for k, v in kwargs.items()]
    except _NotSendable as e:
      raise self.fail("unrewritable", str(e)) from None


class RemoteFunction:
  """A solution name in the grading process: calling it calls the solution in the sandbox."""

  def __init__(self, channel: _Channel, name: str):
    self._channel, self._name = channel, name

  def __call__(self, *args, **kwargs):
    a, k = self._channel.send_args(args, kwargs)
    msg = self._channel.request({"op": "call", "f": {"n": self._name}, "a": a, "k": k})
    return self._channel.answer(msg)

  def __repr__(self) -> str:
    return f"<solution function {self._name!r} in the sandbox>"


class RemoteHandle:
  """A result that is not plain data: it stays in the sandbox. Usable as an argument of further
  calls, callable, and its attributes readable (each a call into the sandbox); comparing,
  hashing, iterating or testing it fails."""
  __slots__ = ("_channel", "_id")
  __hash__ = None

  def __init__(self, channel: _Channel, handle: int):
    self._channel, self._id = channel, handle

  def __call__(self, *args, **kwargs):
    a, k = self._channel.send_args(args, kwargs)
    return self._channel.answer(
        self._channel.request({"op": "call", "f": {"h": self._id}, "a": a, "k": k}))

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return self._channel.answer(
        self._channel.request({"op": "getattr", "o": {"h": self._id}, "n": name}))

  def _refuse(self, *args):
    raise TypeError("the solution returned an object that is not plain data "
                    "(it cannot be compared or inspected outside the sandbox)")

  __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
  __bool__ = __len__ = __iter__ = __contains__ = __getitem__ = _refuse
  __float__ = __int__ = __index__ = __str__ = __format__ = __abs__ = __round__ = _refuse
  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __neg__ = _refuse

  def __repr__(self) -> str:
    return "<solution object in the sandbox>"


def judge(solution: str, test: code_tests.TrustedTest, timeout_s: float = 5.0,
          memory_mb: int = 1024, **sandbox_kwargs) -> Verdict:
  """Runs `solution` in a sandbox and `test` here against it (module docstring).

  timeout_s bounds the whole run: start-up, the solution's import and every call.
  sandbox_kwargs: rewards.sandbox.run_program's other limits (max_output_bytes, nproc, ...).
  """
  req_r, req_w = os.pipe()
  ans_r, ans_w = os.pipe()
  run = SandboxRun(solution, timeout_s, memory_mb, boot=CALL_SERVER, boot_args=(req_r, ans_w),
                   pass_fds=(req_r, ans_w), **sandbox_kwargs)
  try:
    started = run.start()
  finally:
    os.close(req_r)
    os.close(ans_w)
  os.set_blocking(req_w, False)
  channel = _Channel(run, req_w, ans_r)
  status, detail = "failed", ""
  try:
    if started:
      status, detail = _run_test(channel, test)
  finally:
    os.close(req_w)
    result = run.finish()
    os.close(ans_r)
  if not started:
    return Verdict(False, "error", result.stderr.strip()[-300:], result)
  if status == "failed" and result.status in ("memory", "signal", "error") and channel.failure:
    status = result.status  # the sandbox's own account of why the program ended
  return Verdict(status == "passed", status, detail, result)


def _run_test(channel: _Channel, test: code_tests.TrustedTest) -> tuple[str, str]:
  """(status, detail) of running `test` against the sandbox behind `channel`."""
  try:
    hello = channel.receive()
    if "load" in hello:
      return "failed", f"the solution raised {str(hello['load'])[:80]} when loaded"
    if "ready" not in hello:
      return "failed", "a malformed first message"
    ns = {"__name__": "__bgpo_tests__", "__builtins__": builtins}
    for line in test.imports:
      exec(line, ns)  # noqa: S102 - a standard-library import from the trusted test
    for name in test.remote:
      ns[name] = RemoteFunction(channel, name)
    exec(test.code, ns)  # noqa: S102 - the dataset's test code, in the grading process
    for name in test.remote:  # over the prompt's stub of the entry point (HumanEval)
      ns[name] = RemoteFunction(channel, name)
    if test.check:
      ns[test.check](RemoteFunction(channel, test.entry))
  except _Abort:
    pass
  except AssertionError as e:
    return channel.failure or ("failed", f"assertion failed {str(e)[:120]}".strip())
  except Exception as e:  # noqa: BLE001 - the test failed, whatever it raised
    return channel.failure or ("failed", f"{type(e).__name__}: {str(e)[:120]}")
  if channel.failure:
    return channel.failure
  if channel.calls == 0:
    return "unrewritable", "the tests never called the solution"
  return "passed", ""


# Grading workers' sandbox uids: above the slots the grading process's own runs use.
_WORKER_UIDS = _sandbox._UidSlots(_sandbox.SANDBOX_UID_BASE + _sandbox.SANDBOX_UID_SLOTS,
                                  _sandbox.SANDBOX_UID_SLOTS)
_LOCAL = threading.local()
WORKER_START_S = 120.0  # a worker's start-up (imports) on a loaded machine


def _grace_s(timeout_s: float) -> float:
  """How long the test may run in the worker beyond the sandbox's own wall-clock limit."""
  return max(1.0, 0.5 * timeout_s)


class _Worker:
  """One grading worker process (rewards.judge_worker) and the pipes to it."""

  def __init__(self):
    from bgpo_jax.rewards import judge_worker
    self.frames = judge_worker
    self.uids = _WORKER_UIDS  # kept: __del__ may run after module teardown
    self.uid = self.uids.acquire()
    self.closed = False
    req_r, self.w = os.pipe()
    self.r, ans_w = os.pipe()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p))
    try:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "bgpo_jax.rewards.judge_worker", str(req_r), str(ans_w),
           str(self.uid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
          pass_fds=(req_r, ans_w), start_new_session=True)
    finally:
      os.close(req_r)
      os.close(ans_w)
    if self._answer(time.monotonic() + WORKER_START_S) != "ready":
      self.close()
      raise _sandbox.SandboxError(f"the grading worker did not start ({sys.executable} -m "
                                  "bgpo_jax.rewards.judge_worker); see its stderr above")

  def _answer(self, deadline: float):
    """The next answer frame, or None when the worker is late, died or wrote garbage."""
    buf = b""
    with selectors.DefaultSelector() as sel:
      sel.register(self.r, selectors.EVENT_READ)
      while True:
        need = 4 if len(buf) < 4 else 4 + int.from_bytes(buf[:4], "little")
        if len(buf) >= need and len(buf) > 4:
          try:
            return marshal.loads(buf[4:need])
          except (EOFError, ValueError, TypeError):
            return None
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
          return None
        chunk = os.read(self.r, 1 << 16)
        if not chunk:
          return None
        buf += chunk

  def judge(self, solution: str, test: code_tests.TrustedTest, timeout_s: float,
            memory_mb: int, kwargs: dict):
    fields = tuple(getattr(test, f.name) for f in dataclasses.fields(test))
    try:
      self.frames.write_frame(self.w, marshal.dumps((solution, fields, timeout_s, memory_mb, kwargs)))
    except OSError:
      return None
    return self._answer(time.monotonic() + timeout_s + _grace_s(timeout_s))

  def close(self) -> None:
    """Kills the worker (and so its sandbox) and releases its pipes and uid; idempotent."""
    if getattr(self, "closed", True):
      return
    self.closed = True
    try:
      os.killpg(self.proc.pid, 9)
    except (ProcessLookupError, PermissionError, AttributeError):
      pass
    if hasattr(self, "proc"):
      self.proc.wait()
    for fd in (self.w, self.r):
      try:
        os.close(fd)
      except OSError:
        pass
    self.uids.release(self.uid)

  __del__ = close  # a grading thread's worker ends with the thread


def judge_isolated(solution: str, test: code_tests.TrustedTest, timeout_s: float = 5.0,
                   memory_mb: int = 1024, **sandbox_kwargs) -> Verdict:
  """`judge` in this thread's grading worker process (rewards.judge_worker): the verdict, or
  "timeout" when it is not back within timeout_s plus a grace for the test's own work (then the
  worker is killed, taking its sandbox with it, and the next row starts a new one)."""
  worker = getattr(_LOCAL, "worker", None)
  if worker is None or worker.proc.poll() is not None:
    worker = _LOCAL.worker = _Worker()
  got = worker.judge(solution, test, timeout_s, memory_mb, sandbox_kwargs)
  if got is None:
    worker.close()
    _LOCAL.worker = None
    return Verdict(False, "timeout", f"no verdict within {timeout_s + _grace_s(timeout_s):.1f} s: "
                   "the grading worker was stopped")
  passed, status, detail, box = got
  return Verdict(passed, status, detail, SandboxResult(*box) if box is not None else None)


def self_test(**judge_kwargs) -> None:
  """A right and a wrong solution of a tiny test, judged with `judge_kwargs`; raises
  SandboxError saying why when the verdicts are not pass / fail."""
  from bgpo_jax.rewards.sandbox import SandboxError
  test = code_tests.mbpp_test(("assert add(2, 3) == 5",))
  kw = {"timeout_s": 60.0, **judge_kwargs}
  good = judge_isolated("def add(a, b):\n  return a + b\n", test, **kw)
  bad = judge_isolated("def add(a, b):\n  return a - b\n", test, **kw)
  if not good.passed or bad.passed:
    tail = (good.sandbox.stderr.strip()[-800:] if good.sandbox else "") or "(nothing on stderr)"
    raise SandboxError(
        f"the code judge misgrades a trivial test (right: {good.status} {good.detail!r}, wrong: "
        f"{bad.status}), so every code reward would be wrong; the program's stderr: {tail}")

