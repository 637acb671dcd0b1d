"""The sandbox wherever the interpreter lives, its self-test, and the unforgeable pass marker."""

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bgpo_jax import rewards
from bgpo_jax.rewards.sandbox import SandboxError, SandboxPool, run_program

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tmp_venv():
  """A venv under /tmp in a 0700 directory (what tempfile gives): both hide it from the sandbox
  unless its installation is mounted back in."""
  d = tempfile.mkdtemp(prefix="bgpo-venv-", dir="/tmp")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{d}/venv"], check=True,
                 capture_output=True, timeout=120)
  # The venv sees this interpreter's packages (pytest, jax...) and this checkout via PYTHONPATH.
  pkgs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *pkgs])}
  yield f"{d}/venv/bin/python", env
  subprocess.run(["rm", "-rf", d], check=False)


def test_runs_with_an_interpreter_from_a_venv_under_tmp(tmp_venv):
  python, env = tmp_venv
  code = ("from bgpo_jax.rewards.sandbox import run_program\n"
          "r = run_program('import sys; print(sys.executable)', timeout_s=30)\n"
          "print(r.status, r.isolation, r.stdout.strip(), r.stderr[-300:])\n")
  out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  status, isolation, exe = out.stdout.split()[:3]
  assert status == "passed", out.stdout
  assert exe == python  # the program really ran on the venv's interpreter


def test_sandbox_suite_in_a_venv_under_tmp(tmp_venv):
  python, env = tmp_venv
  out = subprocess.run(
      [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", str(REPO / "tests" / "rewards" / "test_sandbox.py")],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert " passed" in out.stdout and "failed" not in out.stdout


def test_self_test_says_why_the_interpreter_cannot_run(tmp_path):
  broken = tmp_path / "python"
  broken.write_text("#!/bin/sh\nexit 0\n")
  broken.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)  # not executable
  for python in (str(broken), str(tmp_path / "missing" / "python")):
    pool = SandboxPool(max_workers=2, python=python)
    with pytest.raises(SandboxError, match=r"cannot run a trivial program.*isolation '\w+'.*"
                                           r"exec failed: (PermissionError|FileNotFoundError)"):
      pool.submit("print(1)")
    # Graded code rows raise the same error instead of scoring 0, every time.
    with pytest.raises(SandboxError, match="every code reward would be 0"):
      rewards.grade_batch("mbpp", ["```python\ndef f():\n  return 1\n```"],
                          ['["assert f() == 1"]'], pool=pool)
    pool.close()


def test_self_test_passes_and_runs_once():
  pool = SandboxPool(max_workers=1)
  pool.self_test()
  assert pool._checked is True
  assert pool.submit("assert 1 + 1 == 2").result().passed
  assert not pool.submit("assert 1 + 1 == 3").result().passed
  pool.close()


# A program that hunts for the pass marker everywhere it could leak (its own source, argv,
# environment, /proc/self/{cmdline,environ,maps-free files}, every open fd, the parent's
# cmdline), prints every candidate, then leaves before its assert.
FORGER = r'''
import glob, os, re, sys
pat = re.compile(rb"BGPO-SANDBOX-OK-[0-9a-f]{32}")
blobs = [open(__file__, "rb").read(), " ".join(sys.argv).encode(), repr(os.environ).encode()]
for p in ["/proc/self/cmdline", "/proc/self/environ", f"/proc/{os.getppid()}/cmdline",
          *glob.glob("/proc/self/fd/*"), *glob.glob("/proc/*/cmdline")]:
  try:
    with open(p, "rb") as f:
      blobs.append(f.read(1 << 20))
  except OSError:
    pass
for fd in range(3, 64):
  try:
    blobs.append(os.read(fd, 1 << 16))
  except OSError:
    pass
found = {m.group(0) for b in blobs for m in pat.finditer(b)}
sys.stdout.write("".join(m.decode() + "\n" for m in found))
sys.stdout.flush()
os._exit(0)
assert False, "never reached"
'''


def test_marker_cannot_be_forged():
  r = run_program(FORGER, timeout_s=30)
  assert r.returncode == 0 and r.status == "failed" and not r.passed, r
  assert "BGPO-SANDBOX-OK" not in r.stdout
  # The same hunt at the end of a program that does finish normally still passes.
  ok = run_program(FORGER.replace("os._exit(0)\nassert False, \"never reached\"", "pass"), timeout_s=30)
  assert ok.passed, ok
