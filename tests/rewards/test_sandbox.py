"""Sandbox: correct programs pass, hostile ones fail and leave this process and machine intact.

All hostile programs run once, concurrently, through one SandboxPool (module fixture) with
short limits, so the whole file takes a few seconds.
"""

import ast
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from bgpo_jax.rewards import sandbox
from bgpo_jax.rewards.sandbox import SandboxPool, run_program

TIMEOUT_S = 1.5
SECRET = "bgpo-test-secret-" + secrets.token_hex(8)
MARK = secrets.token_hex(6)
REPO_FILE = Path(__file__).resolve().parent / f"pwned-{MARK}"
REAL_TMP_FILE = Path("/tmp") / f"pwned-{MARK}"


def _isolation() -> str:
  return run_program("pass", timeout_s=20).isolation


ISOLATION = _isolation()
needs_namespace = pytest.mark.skipif(
    ISOLATION != "namespace",
    reason=f"privilege separation needs root + namespaces (this run: {ISOLATION!r})")


def _hostile(port: int) -> dict[str, str]:
  return {
      "infinite_loop": "while True:\n  pass\n",
      "sleep_forever": "import time\ntime.sleep(1000)\n",
      # Bounded by RLIMIT_NPROC (per-run uid) / the pids cgroup; reaped with the namespace.
      # It first re-executes itself with MARK in its command line, so leftovers are findable.
      "fork_bomb": (
          "import os, sys\n"
          f"if sys.argv[-1] != {MARK!r}:\n"
          f"  os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', open(__file__).read(), {MARK!r}])\n"
          "while True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n"),
      "alloc_10gb": "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n",
      "write_repo": f"open({str(REPO_FILE)!r}, 'w').write('x')\n",
      "read_env": (
          "import os, glob\n"
          "print(dict(os.environ))\n"
          "for p in glob.glob('/proc/*/environ'):\n"
          "  try:\n    print(open(p, 'rb').read())\n  except OSError:\n    pass\n"
          "raise SystemExit(1)\n"),
      "connect_localhost": (
          "import socket\n"
          f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
          "s.sendall(b'hello')\n"),
      "os_exit_before_asserts": "import os\nos._exit(0)\nassert False\n",
      "sys_exit_before_asserts": "import sys\nsys.exit(0)\nassert False\n",
      "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
      "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
      "deep_recursion": "def f(n):\n  return f(n + 1)\nf(0)\n",
      # Comparing two deeply nested lists recurses in C: a segfault once the limit is lifted.
      "c_stack_overflow": (
          "import sys\nsys.setrecursionlimit(10 ** 8)\nx, y = [], []\n"
          "for _ in range(400_000):\n  x, y = [x], [y]\nprint(x == y)\n"),
      "output_flood": "while True:\n  print('x' * 10000)\n",
      "stderr_flood": "import sys\nwhile True:\n  sys.stderr.write('y' * 10000)\n",
      "daemon_then_fail": (
          "import os, sys\n"
          "if os.fork() == 0:\n  os.setsid()\n"
          f"  os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', 'import time; time.sleep(1000)', {MARK!r}])\n"
          "assert False\n"),
  }


def _sandbox_processes() -> list[str]:
  """Processes left by this module's runs: anything carrying MARK in its command line (the
  fork bomb and the daemon exec themselves with it), or a launcher we spawned."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
      ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    if MARK in cmd or (ppid == os.getpid() and "_launcher.py" in cmd):
      found.append(f"{pid} {cmd[:80]}")
  return found


@pytest.fixture(scope="module")
def hostile_results():
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  listener.setblocking(False)
  port = listener.getsockname()[1]
  old = os.environ.get("BGPO_TEST_SECRET")
  os.environ["BGPO_TEST_SECRET"] = SECRET
  try:
    progs = _hostile(port)
    t0 = time.monotonic()
    with SandboxPool(max_workers=len(progs)) as pool:
      futures = {k: pool.submit(v, timeout_s=TIMEOUT_S, memory_mb=512, nproc=16,
                                max_output_bytes=256 * 1024) for k, v in progs.items()}
      results = {k: f.result() for k, f in futures.items()}
    wall = time.monotonic() - t0
    try:
      conn, _ = listener.accept()
      conn.close()
      connected = True
    except BlockingIOError:
      connected = False
  finally:
    listener.close()
    if old is None:
      os.environ.pop("BGPO_TEST_SECRET", None)
    else:
      os.environ["BGPO_TEST_SECRET"] = old
  yield {"results": results, "wall": wall, "connected": connected}
  for p in (REPO_FILE, REAL_TMP_FILE):
    if p.exists():
      p.unlink()


def test_correct_program_passes():
  r = run_program("def add(a, b):\n  return a + b\nassert add(2, 3) == 5\nprint('ok', add(1, 1))\n",
                  timeout_s=20)
  assert r.passed and r.status == "passed", r
  assert r.stdout.strip() == "ok 2"  # the marker line is removed from the tail


@pytest.mark.parametrize("source,status", [
    ("assert 1 + 1 == 3\n", "failed"),
    ("def f(:\n", "failed"),
    ("raise ValueError('boom')\n", "failed"),
    ("import os\nos.kill(os.getpid(), 11)\n", "signal"),
])
def test_failing_programs_fail(source, status):
  r = run_program(source, timeout_s=20)
  assert not r.passed
  assert r.status == status, r


def test_unterminated_source_cannot_skip_to_marker():
  # An open string literal would swallow an appended marker: it must be a syntax error.
  r = run_program("x = '''\nassert False\n", timeout_s=20)
  assert not r.passed and "SyntaxError" in r.stderr


@pytest.mark.parametrize("name", sorted(_hostile(0)))
def test_hostile_program_does_not_pass(hostile_results, name):
  if name == "write_repo" and ISOLATION != "namespace":
    pytest.skip(f"without a private uid ({ISOLATION!r} mode) the caller's files are writable")
  r = hostile_results["results"][name]
  assert not r.passed, (name, r)
  assert r.wall_s < TIMEOUT_S + 10.0, (name, r.wall_s)


def test_hostile_statuses(hostile_results):
  res = hostile_results["results"]
  for name in ("infinite_loop", "sleep_forever", "fork_bomb"):
    assert res[name].status == "timeout", (name, res[name])
  assert res["alloc_10gb"].status == "memory", res["alloc_10gb"]
  assert res["output_flood"].status == "output_limit", res["output_flood"]
  assert res["stderr_flood"].status == "output_limit", res["stderr_flood"]
  assert len(res["output_flood"].stdout) <= 4096
  for name in ("os_exit_before_asserts", "sys_exit_before_asserts"):
    assert res[name].status == "failed" and res[name].returncode == 0, (name, res[name])
  assert res["deep_recursion"].status == "failed" and "RecursionError" in res["deep_recursion"].stderr
  assert res["c_stack_overflow"].status in ("signal", "timeout"), res["c_stack_overflow"]
  assert "Network is unreachable" in res["connect_localhost"].stderr or \
      "PermissionError" in res["connect_localhost"].stderr, res["connect_localhost"]


def test_timeouts_run_in_parallel():
  # Six infinite loops with a 1 s limit in six workers: about one timeout, not six.
  t0 = time.monotonic()
  with SandboxPool(max_workers=6) as pool:
    rs = pool.map(["while True:\n  pass\n"] * 6, timeout_s=1.0)
  wall = time.monotonic() - t0
  assert [r.status for r in rs] == ["timeout"] * 6
  assert wall < 4.0, wall  # one after another would take >= 6 s


def test_no_connection_reaches_localhost(hostile_results):
  assert not hostile_results["connected"]


def test_parent_survives_and_nothing_is_left(hostile_results):
  assert hostile_results["results"]  # the fixture ran everything, and we are still alive
  deadline = time.monotonic() + 5.0
  while _sandbox_processes() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _sandbox_processes() == []


@pytest.mark.skipif(ISOLATION == "basic", reason="basic mode has no PID namespace: /proc shows us")
def test_environment_is_scrubbed(hostile_results):
  r = hostile_results["results"]["read_env"]
  assert SECRET not in r.stdout and SECRET not in r.stderr
  assert "PATH" in r.stdout  # the program did print its (scrubbed) environment


@needs_namespace
def test_cannot_write_outside_sandbox(hostile_results):
  r = hostile_results["results"]["write_repo"]
  # A checkout under /tmp is hidden behind the run's private /tmp (no such directory there);
  # elsewhere the sandbox uid may not write to it, or a read-only mount refuses it.
  assert any(e in r.stderr for e in ("PermissionError", "FileNotFoundError", "Read-only")), r
  assert not r.passed and not REPO_FILE.exists()


@needs_namespace
def test_private_tmp_and_uid():
  src = (f"import os\nopen({str(REAL_TMP_FILE)!r}, 'w').write('x')\n"
         "print(os.getuid(), os.getcwd(), os.listdir('.'), sorted(os.listdir('/tmp')))\n")
  r = run_program(src, timeout_s=20)
  assert r.passed, r
  uid, cwd, *_ = r.stdout.split(" ", 2)
  assert sandbox.SANDBOX_UID_BASE <= int(uid) < sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SLOTS
  assert cwd != os.getcwd()
  assert not REAL_TMP_FILE.exists()  # written to the run's private /tmp only


@needs_namespace
def test_other_processes_are_invisible():
  r = run_program("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n",
                  timeout_s=20)
  assert r.passed, r
  pids = ast.literal_eval(r.stdout.strip())
  assert set(pids) <= {1, 2}, pids  # init (1) and the program itself (2): nothing else


def test_pool_map_preserves_order():
  with SandboxPool(max_workers=2) as pool:
    rs = pool.map([f"print({i})" for i in range(4)], timeout_s=20)
  assert [r.stdout.strip() for r in rs] == ["0", "1", "2", "3"]
  assert all(r.passed for r in rs)


def test_bad_arguments():
  with pytest.raises(ValueError, match="isolation"):
    run_program("pass", isolation="docker")
  with pytest.raises(ValueError, match="timeout_s"):
    run_program("pass", timeout_s=0)


def test_survives_sigkill_of_self_group():
  # The sandbox runs in its own session: killing its process group cannot reach us.
  r = run_program("import os, signal\nos.killpg(0, signal.SIGKILL)\n", timeout_s=20)
  assert not r.passed
