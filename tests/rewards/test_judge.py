"""The code judge: tests rewritten to run in the grading process, plain data across the pipe,
and a sandbox whose filesystem and system calls keep the program away from the host."""

import json
import os
import sys
import socket
import tempfile
import time
from pathlib import Path

import pytest

from bgpo_jax import rewards
from bgpo_jax.rewards import code_tests, judge
from bgpo_jax.rewards.code_tests import Unrewritable
from bgpo_jax.rewards.sandbox import run_program

REPO = Path(__file__).resolve().parents[2]


def _judge(solution, asserts, **kw):
  return judge.judge(solution, code_tests.mbpp_test(tuple(asserts)), timeout_s=10, **kw)


@pytest.mark.parametrize("value", [
    None, True, 0, -3, 2 ** 200, -(2 ** 70), 1.5, float("inf"), "text\n\u00e9\ud800", b"\x00\xff",
    bytearray(b"ab"), 1 + 2j, [1, [2, (3, 4)]], (), {"a": {1: (2, 3)}}, {1, (2, 3)},
    frozenset({"x"}), [[[]]]])
def test_plain_values_round_trip_exactly(value):
  got = judge.decode(json.loads(json.dumps(judge._encode(value))))
  assert got == value and type(got) is type(value)


def test_plain_values_round_trip_through_the_sandbox():
  values = ["None", "True", "0", "-3", "2 ** 200", "-(2 ** 70)", "1.5", "-0.0", "1e300", "float('inf')",
            "'text\\n\\u00e9\\ud800\"'", "b'\\x00\\xff'", "bytearray(b'ab')", "1 + 2j",
            "[1, [2, (3, 4)]]", "()", "{'a': {1: (2, 3)}}", "{1, (2, 3)}", "frozenset({'x'})", "[[[]]]"]
  asserts = [f"v = {v}\nr = echo(v)\nassert r == v and type(r) is type(v), (r, v)" for v in values]
  asserts.append("import math\nassert math.isnan(echo(float('nan')))")
  assert _judge("def echo(x):\n  return x\n", asserts).passed


@pytest.mark.parametrize("bad", [{"x": 1}, {"t": 1}, {"d": [[1]]}, {"a": 1, "b": 2}, {"c": ["1", 2]},
                                 {"s": [[1]]}])
def test_malformed_values_are_refused(bad):
  with pytest.raises((ValueError, TypeError)):
    judge.decode(bad)


def test_hash_colliding_ints_cannot_stall_the_grader():
  # n * (2**61 - 1) all hash alike: a set of 50k of them would take the grader minutes. The
  # program writes that answer itself, past its own encoder.
  sol = ("import sys, time\n"
         "def f():\n"
         "  items = ','.join('{\"i\":\"%x\"}' % (i * (2 ** 61 - 1)) for i in range(1, 50000))\n"
         "  sys.modules['__main__']._send('{\"v\":{\"s\":[' + items + ']}}')\n"
         "  time.sleep(100)\n")
  t0 = time.monotonic()
  r = _judge(sol, ["assert f() == set()"])
  assert not r.passed and "2**61" in r.detail and time.monotonic() - t0 < 5, r
  assert _judge("def f():\n  return [2 ** 70] * 999\n", ["assert len(set(f())) == 1"]).passed


def test_values_from_the_program_are_fresh_builtins():
  # A str subclass arrives as its characters: its __eq__ never runs here.
  r = _judge("class S(str):\n  def __eq__(s, o): return True\n  __hash__ = str.__hash__\n"
             "def f():\n  return [S('a')]\n", ["assert f() == ['b']"])
  assert not r.passed and "assertion" in r.detail, r
  ok = _judge("def f():\n  return {'k': (1, 2.0, None)}\n", ["assert f() == {'k': (1, 2.0, None)}"])
  assert ok.passed, ok


def test_objects_stay_in_the_sandbox_as_handles():
  sol = ("class Pair:\n  def __init__(self, a, b):\n    self.a, self.b = a, b\n"
         "def longest(pairs):\n  return max(p.b - p.a for p in pairs)\n")
  assert _judge(sol, ["assert longest([Pair(1, 5), Pair(2, 3)]) == 4"]).passed
  wrong = sol.replace("max(", "min(")
  assert not _judge(wrong, ["assert longest([Pair(1, 5), Pair(2, 3)]) == 4"]).passed
  # A handle cannot be compared here, whatever its class says about equality.
  r = _judge("class T:\n  def __eq__(s, o): return True\ndef f():\n  return T()\n", ["assert f() == 3"])
  assert not r.passed and r.status == "failed", r


def test_exceptions_cross_as_builtin_classes_but_never_stop_iteration():
  sol = "def f(x):\n  if x < 0:\n    raise ValueError('neg')\n  return x\n"
  assert _judge(sol, ["try:\n  f(-1)\n  assert False\nexcept ValueError:\n  pass"]).passed
  # StopIteration would end the test's own map() early and make all() true.
  r = _judge("def f(x):\n  raise StopIteration\n",
             ["assert all(map(lambda x: f(x) == x, [1, 2, 3]))"])
  assert not r.passed, r


def test_arguments_that_are_not_plain_data_make_the_test_unrewritable():
  r = _judge("def f(g):\n  return g(1)\n", ["assert f(lambda x: x + 1) == 2"])
  assert r.status == "unrewritable" and not r.passed, r


def test_tests_that_check_nothing_fail_closed():
  with pytest.raises(Unrewritable):
    code_tests.mbpp_test(())
  with pytest.raises(Unrewritable):
    code_tests.mbpp_test(("x = 1",))
  with pytest.raises(Unrewritable, match="parse"):
    code_tests.mbpp_test(("assert f(1) ==",))
  with pytest.raises(Unrewritable, match="globals"):
    code_tests.mbpp_test(("assert globals()['f'](1) == 2",))
  with pytest.raises(Unrewritable, match="check"):
    code_tests.humaneval_test("def f(x):\n  pass\n", "def helper(c):\n  assert c(1)\n", "f")
  # check() that never calls its candidate verifies nothing.
  with pytest.raises(Unrewritable, match="never calls"):
    code_tests.humaneval_test("def f(x):\n  pass\n", "def check(candidate):\n  assert True\n", "f")


def test_remote_names_come_from_the_test_never_from_the_solution():
  t = code_tests.mbpp_test(("assert abs(area(2) - 12.56) < 0.01",))
  assert t.remote == ("area",)  # a solution defining `abs` cannot take over the test's abs
  r = _judge("def abs(x):\n  return 0\ndef area(r):\n  return 0\n", ["assert abs(area(2) - 12.56) < 0.01"])
  assert not r.passed
  # A task whose function is named like a builtin (MBPP has `sum`) still tests that function.
  t = code_tests.mbpp_test(("assert sum(10, 15) == 6", "assert sum(4, 6) == 3"))
  assert t.remote == ("sum",)
  sol = "def sum(a, b):\n  return __builtins__['sum'](d for d in range(1, min(a, b) + 1) if a % d == 0 == b % d)\n"
  assert _judge(sol.replace("__builtins__['sum']", "__import__('builtins').sum"),
                ["assert sum(10, 15) == 6", "assert sum(4, 6) == 3"]).passed


def test_standard_library_modules_the_tests_lean_on_are_imported_here():
  t = code_tests.mbpp_test(("assert math.isclose(area(2), 12.566, rel_tol=0.001)",))
  assert t.imports == ("import math",) and t.remote == ("area",)
  sol = "import math\ndef area(r):\n  return math.pi * r * r\n"
  assert _judge(sol, ["assert math.isclose(area(2), 12.566, rel_tol=0.001)"]).passed
  # Patching math in the sandbox patches the sandbox's math, not the test's.
  forged = "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n  return 0.0\n"
  assert not _judge(forged, ["assert math.isclose(area(2), 12.566, rel_tol=0.001)"]).passed


def test_humaneval_helpers_are_the_prompts_not_the_solutions():
  prompt = "def poly(xs, x):\n  return sum(c * x ** i for i, c in enumerate(xs))\n\ndef find_zero(xs):\n  '''root'''\n"
  check = "def check(candidate):\n  for xs in ([-2, 1], [3, -1]):\n    assert abs(poly(xs, candidate(xs))) < 1e-6\n"
  test = code_tests.humaneval_test(prompt, check, "find_zero")
  right = prompt + "  return -xs[0] / xs[1]\n"
  assert judge.judge(right, test, timeout_s=10).passed
  forged = right + "\ndef poly(xs, x):\n  return 0\ndef find_zero(xs):\n  return 0.0\n"
  assert not judge.judge(forged, test, timeout_s=10).passed


def test_grade_batch_counts_unrewritable_and_non_string_rows():
  grades = rewards.grade_batch(["mbpp", "mbpp", "gsm8k", "mbpp"],
                               ["def f():\n  return 1", None, 7, "def f():\n  return 1"],
                               ['["assert f() == 1"]', '["assert f() == 1"]', "7", "[]"])
  assert [g.reward for g in grades] == [1.0, 0.0, 0.0, 0.0]
  assert [g.flag for g in grades] == ["", "non_string", "non_string", "unrewritable"]
  assert rewards.flag_counts(grades) == {"rewards/unrewritable": 1.0, "rewards/non_string": 2.0}


def test_a_timeout_and_a_crash_fail_with_their_status():
  assert _judge("def f():\n  while True:\n    pass\n", ["assert f() == 1"], ).status == "timeout"
  r = judge.judge("def f():\n  import os\n  os.kill(os.getpid(), 11)\n",
                  code_tests.mbpp_test(("assert f() == 1",)), timeout_s=10)
  assert not r.passed and r.status in ("signal", "failed"), r


# ---------------------------------------------------------------------- the sandbox's world

needs_namespace = pytest.mark.skipif(
    run_program("pass", timeout_s=30).isolation != "namespace",
    reason="the private root and seccomp are checked in root namespace mode")


@needs_namespace
def test_the_program_sees_only_system_dirs_and_its_interpreter():
  r = run_program(
      "import os, sys\nprint(sorted(os.listdir('/')))\n"
      f"print(os.path.exists({str(REPO)!r}), os.path.exists('/run'), os.path.exists('/home'))\n"
      "print(sys.executable)\nprint(sys.base_prefix)\n", timeout_s=30)
  assert r.passed, r
  top, flags, exe, base = r.stdout.strip().splitlines()
  # The interpreter's own directories are exposed wherever they live (a checkout under /check,
  # a conda under /scratch); nothing else outside the system directories may appear.
  interpreter_tops = {Path(p).parts[1] for p in (exe, base, os.path.realpath(sys.executable))}
  assert set(eval(top)) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev",
                            "proc", "tmp", "var"} | interpreter_tops, (top, exe, base)
  assert flags == "False False False" or REPO.is_relative_to(Path(exe).parents[2]), flags
  assert r.seccomp


@needs_namespace
def test_no_host_unix_socket_and_no_user_namespace():
  d = tempfile.mkdtemp(prefix="bgpo-sock-", dir="/run" if os.access("/run", os.W_OK) else None)
  path = os.path.join(d, "s")
  srv = socket.socket(socket.AF_UNIX)
  srv.bind(path)
  os.chmod(d, 0o755)
  os.chmod(path, 0o777)
  srv.listen(1)
  srv.setblocking(False)
  try:
    r = run_program(
        "import ctypes, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"
        "try:\n"
        "  s = socket.socket(socket.AF_UNIX)\n"
        f"  s.connect({path!r})\n"
        "  print('connected')\n"
        "except OSError as e:\n"
        "  print('refused', e.errno)\n"
        "a, b = socket.socketpair()\n"
        "a.send(b'x')\nprint('pair', b.recv(1))\n", timeout_s=30)
    assert r.passed, r
    assert "unshare -1 1" in r.stdout and "refused 1" in r.stdout and "pair b'x'" in r.stdout, r
    with pytest.raises(BlockingIOError):
      srv.accept()
  finally:
    srv.close()
    os.unlink(path)
    os.rmdir(d)


def test_a_stalled_test_stops_its_worker_and_the_next_row_gets_a_new_one():
  # The test's own work (here a loop; in an attack, hashing values the program chose) runs in
  # the grading worker, which is stopped when the verdict is late.
  stall = code_tests.mbpp_test(("x = f()\nfor _ in range(10 ** 10):\n  pass\nassert x == 1",))
  t0 = time.monotonic()
  v = judge.judge_isolated("def f():\n  return 1\n", stall, timeout_s=2.0)
  assert v.status == "timeout" and not v.passed, v
  assert time.monotonic() - t0 < 2.0 + judge._grace_s(2.0) + 3.0
  ok = judge.judge_isolated("def f():\n  return 1\n", code_tests.mbpp_test(("assert f() == 1",)),
                            timeout_s=10)
  assert ok.passed, ok
