"""Runs untrusted Python programs (model-written code) in a sandboxed child process.

`run_program(source)` executes `source` in a fresh interpreter and reports whether it ran to the
end: a small runner executes `source` as `__main__` and, only when it returns normally, writes a
random per-run marker; `passed` needs exit status 0 *and* that marker, so `sys.exit(0)` /
`os._exit(0)` fail. That is a fact about the process, not a verdict on hostile code (a program
can dig the marker out of its own memory once the runner has read it): code rewards never use
it. They use `rewards.judge`, which keeps the tests in the grading process and talks to the
program over two pipes (`SandboxRun` with `boot`, `boot_args`, `pass_fds`).

`SandboxPool` runs a self-test (a trivial passing and a trivial failing program, and the judge's
right / wrong pair) before its first program and raises `SandboxError` with the status,
isolation level and exec error when the sandbox cannot run code, so a broken setup is never a
silent 0.

Isolation ("namespace" mode, used when the process runs as root, e.g. in CI):
- new PID, mount, network, IPC and UTS namespaces (see `_launcher.py`). The network namespace
  has only a loopback device that is down: no connection to anything, 127.0.0.1 included. The
  PID namespace hides every other process (/proc is remounted) and is torn down as a whole by
  the kernel when its init exits or is killed, so fork bombs and daemons cannot outlive a run.
- its own root filesystem (pivot_root): the system directories (/usr, /etc, the /lib* and /bin
  links), the interpreter's installation directories wherever they live (`_expose_paths`: a
  venv under /tmp, a conda env under /root) and a few device nodes, all bound read-only; fresh
  size-limited tmpfs mounts for /tmp, /var/tmp and /dev/shm. Nothing else of the host exists
  inside: not the dataset, the checkpoint or this source tree (no expected values to read off
  the disk), not /run (no host UNIX socket to connect to), not the interpreter's site-packages
  unless `site_packages=True` (an installed package may ship test data).
- a seccomp filter with no_new_privs (`_launcher._seccomp_program`, x86_64 and aarch64):
  no new user namespaces (whose capabilities would reopen mounting), no setns, no UNIX
  sockets (socketpair stays), no io_uring (its requests bypass seccomp), no ptrace /
  process_vm_*, bpf, perf, keyrings, mounting or modules. "namespace" isolation requires it;
  elsewhere `seccomp="auto"` installs it where the machine has a filter.
- the program runs under its own unprivileged uid (one per concurrent run, from
  `SANDBOX_UID_BASE`), with no supplementary groups, so RLIMIT_NPROC binds, it cannot signal
  the caller, and it can write only to its scratch tmpfs mounts; the working directory is an
  empty tmpfs directory that vanishes with the namespace.
- rlimits: CPU seconds, address space (`memory_mb`), file size, open files, core 0, NPROC;
  oom_score_adj 1000 so the kernel OOM killer picks sandboxed code first.
- scrubbed environment, stdin = /dev/null, `python -I` (isolated mode; `-S` too unless
  `site_packages=True`), its own session / process group, wall-clock kill of that group,
  stdout + stderr read with a byte cap (the run is killed when exceeded).
What remains possible inside: reading the world-readable system files (/usr, /etc) and using
CPU and memory up to the limits.

Without root, "userns" mode uses an unprivileged user namespace for the same namespaces, root
filesystem and filter, but keeps the caller's uid (only one uid can be mapped). Where
namespaces are unavailable ("basic" mode) only the rlimits, the filter, the process-group
kill, a best-effort cgroup cleanup and a Python-level socket block apply: NOT safe for hostile
code. `isolation="namespace"` refuses to run (status "error") unless full isolation is available.

Per-run cgroups (memory + pids, cgroup v1 or a delegated v2 subtree, root only; skipped where
not writable) cap the run as a whole, since rlimits are per process. Kill-on-timeout uses the
process group plus the PID namespace (or, in basic mode, the cgroup's member list).

`SandboxPool` runs many programs in parallel (a thread per running child), so a batch with
some infinite loops costs about one timeout per worker rather than per program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

_LAUNCHER = str(Path(__file__).with_name("_launcher.py"))

# Per-run uids (namespace mode). Far above regular and systemd-dynamic uids.
SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SLOTS = 4096

STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "signal", "error")

# The program's runner (`python -I [-S] -c BOOT prog.py MARKER_FD BASIC`): reads the pass marker
# from its pipe and closes it, runs prog.py as __main__, and writes the marker to fd 1 only when
# the program returned normally (an exception, sys.exit or os._exit never reach that line).
# Basic mode only (no network namespace): socket creation is refused from Python code.
_BOOT = """
import os, sys
_fd, _basic = int(sys.argv[2]), sys.argv[3] == "1"
_m = b""
while True:
  _c = os.read(_fd, 4096)
  if not _c:
    break
  _m += _c
os.close(_fd)
sys.argv = sys.argv[1:2]
if _basic:
  import socket
  def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
  for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(socket, _n, _no_network)
with open(sys.argv[0], "rb") as _f:
  _code = compile(_f.read(), sys.argv[0], "exec")
_main = type(sys)("__main__")  # a fresh module (no runpy import: start-up time matters)
_main.__file__ = sys.argv[0]
sys.modules["__main__"] = _main
exec(_code, _main.__dict__)
sys.stdout.flush()
os.write(1, _m)
"""


class SandboxError(RuntimeError):
  """The sandbox cannot run code here (its self-test failed): no code reward would be right."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one sandboxed run.

  status: passed | failed (ran but exit != 0 or no marker) | timeout (wall clock or CPU limit)
    | memory (MemoryError) | output_limit | signal (killed by another signal, e.g. SIGSEGV)
    | error (the sandbox itself could not run the program).
  returncode: the program's exit code, -signal when killed by a signal, None if unknown.
  stdout / stderr: the last `tail_bytes` of each stream (marker line removed from stdout).
  """

  passed: bool
  status: str
  returncode: int | None
  stdout: str
  stderr: str
  wall_s: float
  isolation: str  # namespace | userns | basic | "" (unknown: launcher failed)
  seccomp: bool = False  # the program ran under the system-call filter


class _UidSlots:
  """Hands out distinct uids to concurrent runs: RLIMIT_NPROC counts per uid, so a fork bomb
  in one run must not starve the process budget of another."""

  def __init__(self, base: int, slots: int):
    self._base, self._slots = base, slots
    self._used: set[int] = set()
    self._lock = threading.Lock()

  def acquire(self) -> int:
    with self._lock:
      for i in range(self._slots):
        if i not in self._used:
          self._used.add(i)
          return self._base + i
    raise RuntimeError(f"all {self._slots} sandbox uid slots are busy; lower the concurrency")

  def release(self, uid: int) -> None:
    with self._lock:
      self._used.discard(uid - self._base)


_UIDS = _UidSlots(SANDBOX_UID_BASE, SANDBOX_UID_SLOTS)


def _expose_paths(python: str | None = None) -> list[str]:
  """Installation directories of the interpreter `python` (default: this one) that the program
  must see: the launcher mounts each back read-only where a private tmpfs (a venv under /tmp)
  or another uid's missing permissions (a conda env under /root) would hide it."""
  if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
    python = sys.executable
    cands = [sys.base_prefix, sys.prefix]
  else:
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    cands = [prefix]
    try:  # a venv: pyvenv.cfg names the base interpreter's bin directory ("home")
      with open(os.path.join(prefix, "pyvenv.cfg")) as f:
        for line in f:
          key, _, val = line.partition("=")
          if key.strip() == "home" and val.strip():
            cands.append(os.path.dirname(val.strip()))
    except OSError:
      pass
  real = os.path.realpath(python)
  cands += [os.path.dirname(os.path.abspath(python)), os.path.dirname(real),
            os.path.dirname(os.path.dirname(real))]
  paths: list[str] = []
  for p in cands:
    p = os.path.realpath(p) if os.path.exists(p) else os.path.abspath(p)
    if p == "/" or not os.path.isdir(p):
      continue
    if not any(p == q or p.startswith(q + os.sep) for q in paths):
      paths = [q for q in paths if not q.startswith(p + os.sep)] + [p]
  return paths


def _killpg(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _kill(pid: int) -> None:
  try:
    os.kill(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(buf: bytes | bytearray, n: int) -> str:
  return bytes(buf[-n:]).decode("utf-8", errors="replace")


def _hidden_site_dirs(expose: Sequence[str]) -> list[str]:
  """The site-packages / dist-packages directories inside the exposed interpreter trees (and
  the system's): mounted over with an empty tmpfs unless the program may import them, so the
  program cannot read installed packages' files (a package may ship test data)."""
  found = []
  for p in list(expose) + ["/usr", "/usr/local"]:
    for pat in ("lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages",
                "local/lib/python3*/dist-packages", "local/lib/python3*/site-packages"):
      found += [os.path.realpath(d) for d in glob.glob(os.path.join(p, pat)) if os.path.isdir(d)]
  return sorted(set(found))


class SandboxRun:
  """One sandboxed interpreter: started by `start`, its stdout / stderr drained by `pump`, ended
  by `finish` (which returns the SandboxResult). `run_program` is start + pump + finish; the
  code-reward judge (rewards.judge) also talks to the program over a pair of pipes between
  pumps. Arguments: those of `run_program`, plus boot (the runner source, `python -c BOOT prog.py
  MARKER_FD BASIC *boot_args`), boot_args and pass_fds (descriptors the program inherits)."""

  def __init__(self, source: str, timeout_s: float = 5.0, memory_mb: int = 1024, *,
               max_output_bytes: int = 1 << 20, nproc: int = 32, fsize_mb: int = 16,
               tmpfs_mb: int = 64, site_packages: bool = False, isolation: str = "auto",
               seccomp: str = "auto", tail_bytes: int = 4096, python: str | None = None,
               boot: str = _BOOT, boot_args: Sequence = (), pass_fds: Sequence[int] = ()):
    if isolation not in ("auto", "namespace", "basic"):
      raise ValueError(f"isolation {isolation!r} is not one of 'auto', 'namespace', 'basic'")
    if seccomp not in ("auto", "on", "off"):
      raise ValueError(f"seccomp {seccomp!r} is not one of 'auto', 'on', 'off'")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s {timeout_s} must be positive")
    self.t0 = time.monotonic()
    self.deadline = self.t0 + timeout_s
    self.max_output, self.tail_bytes = max_output_bytes, tail_bytes
    self.marker = "BGPO-SANDBOX-OK-" + secrets.token_hex(16)
    self.python = python or sys.executable
    expose = _expose_paths(self.python)
    self.cfg = {
        "parent_pid": os.getpid(), "python": self.python, "site_packages": site_packages,
        "isolation": isolation, "seccomp": "on" if isolation == "namespace" else seccomp,
        "cpu_s": math.ceil(timeout_s) + 1, "memory_mb": int(memory_mb),
        "fsize_mb": int(fsize_mb), "tmpfs_mb": int(tmpfs_mb), "nproc": int(nproc),
        "cgroup_mb": int(memory_mb) + int(tmpfs_mb) + 64, "expose": expose,
        "hide": [] if site_packages else _hidden_site_dirs(expose),
        "boot": boot, "boot_args": [str(a) for a in boot_args],
    }
    self.source, self.pass_fds = source, tuple(pass_fds)
    self.proc: subprocess.Popen | None = None
    self.error: str | None = None
    self.reason: str | None = None  # timeout | output_limit, once pumping stopped for it
    self.exited = False

  def start(self) -> bool:
    """Starts the launcher; False (and `finish` reports status "error") when it cannot."""
    self.uid = _UIDS.acquire()
    self.tmpdir = tempfile.mkdtemp(prefix="bgpo-sandbox-")
    self.status_r, status_w = os.pipe()
    marker_r, marker_w = os.pipe()
    with open(os.path.join(self.tmpdir, "prog.py"), "w", encoding="utf-8") as f:
      f.write(self.source)  # the marker is NOT in the program's source
    os.write(marker_w, (self.marker + "\n").encode())
    os.close(marker_w)
    cfg = {**self.cfg, "dir": self.tmpdir, "status_fd": status_w, "marker_fd": marker_r,
           "uid": self.uid}
    try:
      self.proc = subprocess.Popen(
          [sys.executable, "-I", "-S", _LAUNCHER, marshal.dumps(cfg).hex()],
          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd=self.tmpdir,
          start_new_session=True, pass_fds=(status_w, marker_r, *self.pass_fds), close_fds=True)
    except OSError as e:
      self.error = f"could not start the sandbox: {e!r}"
      return False
    finally:
      os.close(status_w)
      os.close(marker_r)
    self.bufs = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
    self.open_fds, self.total, self.grace_end = set(self.bufs), 0, None
    self.sel = selectors.DefaultSelector()
    for fd in self.bufs:
      self.sel.register(fd, selectors.EVENT_READ)
    try:
      self.pidfd = os.pidfd_open(self.proc.pid)
      self.sel.register(self.pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
      self.pidfd = None  # old kernel: poll the exit status instead
    return True

  def pump(self, until_fd: int | None = None, write: bool = False) -> bool:
    """Reads stdout / stderr until `until_fd` is readable (writable with `write`) (True), or the
    launcher has exited and
    both pipes closed, the deadline passed (reason "timeout") or the output cap was exceeded
    (reason "output_limit") (False). With until_fd None it runs to the end of the program."""
    keep = max(self.tail_bytes, 256) * 2
    if until_fd is not None:
      self.sel.register(until_fd, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
    try:
      while self.reason is None and (self.open_fds or not self.exited):
        now = time.monotonic()
        if now >= self.deadline:
          self.reason = "timeout"
          break
        if self.exited and now >= self.grace_end:
          break  # a leftover process holds the pipes open (basic mode); it gets killed
        wait = self.deadline - now
        if self.exited:
          wait = min(wait, self.grace_end - now)
        if self.pidfd is None and not self.exited:
          wait = min(wait, 0.01)
        for key, _ in self.sel.select(wait):
          fd = key.fd
          if fd == until_fd:
            return True
          if fd == self.pidfd:
            self.sel.unregister(fd)
            self.exited, self.grace_end = True, time.monotonic() + 0.5
            continue
          data = os.read(fd, 65536)
          if not data:
            self.sel.unregister(fd)
            self.open_fds.discard(fd)
            continue
          self.total += len(data)
          buf = self.bufs[fd]
          buf += data
          if len(buf) > 4 * keep:
            del buf[:-keep]
        if self.total > self.max_output:
          self.reason = "output_limit"
          break
        if self.pidfd is None and not self.exited and self.proc.poll() is not None:
          self.exited, self.grace_end = True, time.monotonic() + 0.5
      return False
    finally:
      if until_fd is not None:
        self.sel.unregister(until_fd)

  def finish(self) -> SandboxResult:
    """Kills what is left of the run, cleans up, and classifies it."""
    try:
      if self.proc is None:
        return SandboxResult(False, "error", None, "", self.error or "not started",
                             time.monotonic() - self.t0, "")
      # The launcher is the group leader and is not reaped yet, so its pgid cannot have been
      # reused: killing the group here is safe and removes any straggler (basic mode).
      _killpg(self.proc.pid)
      self.proc.wait()
      status_text = _read_all(self.status_r)
      _remove_cgroups(status_text)
      out, err = self.bufs[self.proc.stdout.fileno()], self.bufs[self.proc.stderr.fileno()]
      return _classify(status_text, out, err, self.reason, self.marker, self.tail_bytes,
                       time.monotonic() - self.t0)
    finally:
      self.close()

  def close(self) -> None:
    """Releases everything (idempotent); kills the run if it is still going."""
    if getattr(self, "_closed", False) or not hasattr(self, "uid"):
      return
    self._closed = True
    if self.proc is not None:
      if self.proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt)
        _killpg(self.proc.pid)
        self.proc.wait()
      self.sel.close()
      if self.pidfd is not None:
        os.close(self.pidfd)
      for s in (self.proc.stdout, self.proc.stderr):
        if s is not None:
          s.close()
    os.close(self.status_r)
    shutil.rmtree(self.tmpdir, ignore_errors=True)
    _UIDS.release(self.uid)


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 1024, **kwargs) -> SandboxResult:
  """Runs `source` as `__main__` of a fresh sandboxed Python interpreter.

  `passed` means the program ran to its end and exited 0 (the runner's marker): a process-level
  fact, not a verdict on hostile code (a program that digs the marker out of its own memory can
  fake it); code rewards use rewards.judge, whose verdict never depends on the program.

  Args:
    source: program text, run as `__main__` (file `prog.py`) by the marker-writing runner.
    timeout_s: wall-clock limit (interpreter start-up included); CPU limit is ceil(timeout)+1 s.
    memory_mb: RLIMIT_AS of the program process.
    max_output_bytes: cap on stdout + stderr; the run is killed when it is exceeded.
    nproc: RLIMIT_NPROC (tasks, threads included) of the run's private uid.
    fsize_mb: largest file the program may write; tmpfs_mb: size of each private tmpfs.
    site_packages: let the program import (and see) the interpreter's site-packages (default:
      stdlib only, site-packages hidden).
    isolation: "auto" (root namespaces, else a user namespace, else basic), "namespace"
      (require root namespaces + private uid + seccomp; status "error" otherwise) or "basic".
    seccomp: "auto" (the system-call filter where the machine has one), "on" (required), "off".
    tail_bytes: how much of the end of stdout / stderr to keep in the result.
    python: the interpreter that runs the program (default: this one, sys.executable).
  Thread-safe; blocks the calling thread for at most about timeout_s.
  """
  run = SandboxRun(source, timeout_s, memory_mb, **kwargs)
  try:
    if run.start():
      run.pump()
    return run.finish()
  finally:
    run.close()


def _remove_cgroups(status_text: str) -> None:
  """Removes the run's cgroups when the launcher was killed before it could (timeouts)."""
  dirs = [l[6:] for l in status_text.splitlines() if l.startswith("cgdir ")]
  for d in dirs:
    if not d.rsplit("/", 1)[-1].startswith("bgpo-sandbox-"):
      continue  # only ever remove what the launcher created
    for _ in range(200):  # the run's last tasks may take a moment to exit
      try:
        with open(os.path.join(d, "cgroup.procs")) as f:
          pids = [int(p) for p in f.read().split()]
      except FileNotFoundError:
        break
      except (OSError, ValueError):
        pids = []
      for p in pids:  # only run members are listed: a daemon that escaped the group kill
        _kill(p)
      try:
        os.rmdir(d)
        break
      except FileNotFoundError:
        break
      except OSError:
        time.sleep(0.01)


def _read_all(fd: int) -> str:
  os.set_blocking(fd, False)
  chunks = []
  while True:
    try:
      b = os.read(fd, 65536)
    except BlockingIOError:
      break
    if not b:
      break
    chunks.append(b)
  return b"".join(chunks).decode("utf-8", errors="replace")


def _classify(status_text: str, out: bytearray, err: bytearray, reason: str | None, marker: str,
              tail_bytes: int, wall_s: float) -> SandboxResult:
  mode, code, sig, error, oom, filtered = "", None, None, None, False, False
  for line in status_text.splitlines():
    key, _, val = line.partition(" ")
    if key == "mode":
      mode = val
    elif key == "exit":
      code = int(val)
    elif key == "signal":
      sig = int(val)
    elif key == "error":
      error = val
    elif key == "oom":
      oom = True
    elif key == "seccomp":
      filtered = val == "on"
  stdout = _tail(out, tail_bytes * 2)
  found = marker in stdout
  stdout = stdout.replace(marker + "\n", "").replace(marker, "")[-tail_bytes:]
  stderr = _tail(err, tail_bytes)
  rc = -sig if sig is not None else code
  if reason is not None:
    status = reason
  elif error is not None:
    status, stderr = "error", (stderr + f"\nbgpo-sandbox: {error}")[-tail_bytes:]
  elif code == 0 and found:
    status = "passed"  # even if some child it forked was OOM-killed: the tests ran through
  elif oom:
    status = "memory"  # the run's cgroup hit its memory cap
  elif sig is not None:
    status = "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) else "signal"
  elif code is None:
    status = "error"
  elif "MemoryError" in stderr:
    status = "memory"
  else:
    status = "failed"
  return SandboxResult(status == "passed", status, rc, stdout, stderr, wall_s, mode, filtered)


_PASSING = "print('bgpo sandbox self-test')\n"
_FAILING = "raise SystemExit(3)\n"


def self_test(**run_kwargs) -> None:
  """Runs a trivial passing and a trivial failing program with `run_kwargs` (run_program's
  keywords); raises SandboxError saying why when the first does not pass or the second does."""
  kw = {"timeout_s": 60.0, **run_kwargs}  # start-up can be slow on a loaded machine
  good = run_program(_PASSING, **kw)
  python = kw.get("python") or sys.executable
  if not good.passed:
    err = good.stderr.strip()[-1500:] or "(nothing on stderr)"
    raise SandboxError(
        f"the code sandbox cannot run a trivial program, so every code reward would be 0: "
        f"status {good.status!r}, isolation {good.isolation or 'unknown (the launcher failed)'!r}, "
        f"interpreter {python}, return code {good.returncode}; the program's stderr: {err}\n"
        "Fix: make that interpreter executable for other users (its installation dirs and their "
        "parents need o+rx), or run as root for namespace isolation / set isolation='basic' "
        "where namespaces are unavailable (see bgpo_jax.rewards.sandbox).")
  bad = run_program(_FAILING, **kw)
  if bad.passed or bad.returncode != 3:
    raise SandboxError(
        f"the code sandbox misreports a failing program (SystemExit(3)): passed={bad.passed}, "
        f"status {bad.status!r}, return code {bad.returncode}, isolation {bad.isolation!r}")
  from bgpo_jax.rewards import judge  # the code rewards' verdict path (it imports this module)
  judge.self_test(**kw)


class SandboxPool:
  """Runs sandboxed programs concurrently: a thread per in-flight program, each waiting on
  its own child process (the heavy lifting happens in the children, not in the threads).

  `submit` returns a `concurrent.futures.Future[SandboxResult]`, so callers (e.g. the trainer's
  reward thread) can queue a batch and collect results later. Before its first program the pool
  runs `self_test` with its defaults and raises SandboxError if the sandbox cannot run code
  here (instead of scoring every program 0 in silence). Thread-safe.
  """

  def __init__(self, max_workers: int | None = None, *, check: bool = True, **defaults):
    """max_workers: concurrent programs (default: 2 * os.cpu_count(), at most 32: much of a
    short run is process / namespace set-up latency, so more runs than cores still pay off).
    check: run the self-test before the first program (False: for tests of broken setups).
    defaults: keyword arguments of `run_program` applied to every run unless overridden."""
    if max_workers is not None and max_workers < 1:
      raise ValueError(f"max_workers {max_workers} must be >= 1 (or None for the default)")
    self.max_workers = max_workers or min(32, 2 * (os.cpu_count() or 1))
    self._defaults = defaults
    self._check = check
    self._checked: BaseException | bool = False
    self._check_lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=self.max_workers, thread_name_prefix="bgpo-sandbox")

  def self_test(self) -> None:
    """Runs the self-test once (later calls re-raise its error or return at once)."""
    with self._check_lock:
      if self._checked is False:
        try:
          self_test(**self._defaults)
          self._checked = True
        except SandboxError as e:
          self._checked = e
      if isinstance(self._checked, BaseException):
        raise self._checked

  def submit(self, source: str, timeout_s: float = 5.0, memory_mb: int = 1024,
             **kwargs) -> concurrent.futures.Future:
    """run_program(source, ...) in the pool; a Future of its SandboxResult."""
    return self.submit_fn(run_program, source, timeout_s, memory_mb, **kwargs)

  def submit_fn(self, fn, *args, **kwargs) -> concurrent.futures.Future:
    """fn(*args, **defaults, **kwargs) in the pool, after the self-test: for a function that
    runs one sandboxed program with run_program's keywords (e.g. rewards.judge.judge)."""
    if self._check:
      self.self_test()
    return self._pool.submit(fn, *args, **{**self._defaults, **kwargs})

  def map(self, sources: Iterable[str], timeout_s: float = 5.0, memory_mb: int = 1024,
          **kwargs) -> list[SandboxResult]:
    futures = [self.submit(s, timeout_s, memory_mb, **kwargs) for s in sources]
    return [f.result() for f in futures]

  def close(self, wait: bool = True) -> None:
    self._pool.shutdown(wait=wait, cancel_futures=not wait)

  def __enter__(self) -> "SandboxPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
