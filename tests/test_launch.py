"""launch/tpu_pod.sh and launch/gpu_slurm.sh: --dry-run output, errors, and the pieces that run on
the hosts (exercised locally with fake gcloud / sbatch / srun / scontrol / python3 on the PATH).

Nothing here needs gcloud or SLURM: fakes record every call, so a dry run is checked to run none.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sh"

# A command-line recorder: one line per call, arguments separated by \x1f.
_FAKE = """#!/usr/bin/env bash
printf '%s\\x1f' "$(basename "$0")" "$@" >> "$FAKE_LOG"
printf '\\n' >> "$FAKE_LOG"
"""
_FAKE_TOOLS = {
    "gcloud": _FAKE + 'case "$*" in *"tail -n"*) if [ -n "${FAKE_BLOCK:-}" ]; then sleep 20; fi; echo "step 1/1";; esac\n',
    "sbatch": _FAKE + "echo 555\n",
    "scontrol": _FAKE + "printf 'node01\\nnode02\\n'\n",
    "srun": _FAKE + 'echo "COORD=$JAX_COORDINATOR_ADDRESS LOCAL=$JAX_LOCAL_DEVICE_IDS MEM=$XLA_PYTHON_CLIENT_MEM_FRACTION" >> "$FAKE_LOG"\n',
}


@pytest.fixture()
def fakes(tmp_path):
  """(env, log path): PATH starts with fake gcloud/sbatch/scontrol/srun; no BGPO_/SLURM_ variables."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in _FAKE_TOOLS.items():
    p = bin_dir / name
    p.write_text(body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "calls.log"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("BGPO_", "SLURM_", "CLOUDSDK_"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path), USER="tester")
  return env, log


def _calls(log: Path) -> list[list[str]]:
  if not log.exists():
    return []
  return [line.split("\x1f")[:-1] for line in log.read_text().splitlines() if "\x1f" in line]


def _run(script: Path, *args: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def _commands(stdout: str) -> list[list[str]]:
  """The '+ ' lines as argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _option(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


TPU_ARGS = ("--zone=us-east5-a", "--project=my-proj", "--name=bgpo-test", "--workdir=gs://bkt/runs/r1",
            "--extra=--config.total_steps=10 --config.rl.num_mc_samples=8")


def _start_command(cmds: list[list[str]]) -> str:
  starts = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "ssh"
            and "bgpo_jax.main" in _option(c, "--command")]
  assert len(starts) == 1, cmds
  assert _option(starts[0], "--worker") == "all"  # every host starts its process
  return _option(starts[0], "--command")


def _trainer_argv(remote: str) -> list[str]:
  """The trainer's argv inside the remote start command (`... bash -c '<inner>' ...`)."""
  words = shlex.split(remote)
  inner = words[words.index("-c") + 1]  # "echo $$ > pid; <trainer command>; echo $? > rc"
  return shlex.split(inner[inner.index(";") + 1:inner.rindex("; echo $? >")])


# ---------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_syntax_and_shellcheck(script):
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
  assert os.access(script, os.X_OK), f"{script} is not executable"
  if shutil.which("shellcheck"):
    p = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_help(script, fakes):
  env, log = fakes
  p = _run(script, "--help", env=env)
  assert p.returncode == 0, p.stderr
  for flag in ("--workdir", "--config", "--extra", "--dry-run"):
    assert flag in p.stdout
  assert _calls(log) == []


@pytest.mark.parametrize("script,args", [(TPU, ("--zone=z",)), (SLURM, ())], ids=["tpu", "slurm"])
def test_missing_workdir_is_a_clear_error(script, args, fakes):
  env, log = fakes
  p = _run(script, *args, "--dry-run", env=env)
  assert p.returncode != 0
  assert "--workdir is required" in p.stderr and "e.g. --workdir=" in p.stderr, p.stderr
  assert _calls(log) == []


@pytest.mark.parametrize("script,args", [(TPU, ("--zone=z",)), (SLURM, ())], ids=["tpu", "slurm"])
def test_unknown_option_and_bad_config(script, args, fakes):
  env, _ = fakes
  p = _run(script, *args, "--workdir=gs://b/r", "--bogus", env=env)
  assert p.returncode != 0 and "unknown option --bogus" in p.stderr
  p = _run(script, *args, "--workdir=gs://b/r", "--config=configs/nope.py", "--dry-run", env=env)
  assert p.returncode != 0 and "configs/nope.py" in p.stderr and "configs/math.py" in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------- TPU


def test_tpu_dry_run_prints_the_whole_lifecycle(fakes):
  env, log = fakes
  p = _run(TPU, *TPU_ARGS, "--spot", "--env=LIBTPU_INIT_ARGS=--xla_tpu_flag=1", "--dry-run", "--",
           "--config.mesh.shape=(1,-1,1)", "--config.task.instruction=it's; a test", env=env)
  assert p.returncode == 0, p.stderr
  cmds = _commands(p.stdout)
  assert _calls(log) == [], "a dry run must not run gcloud"
  create = cmds[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bgpo-test"]
  assert _option(create, "--accelerator-type") == "v5p-64"
  assert _option(create, "--version") == "v2-alpha-tpuv5"
  assert _option(create, "--zone") == "us-east5-a" and _option(create, "--project") == "my-proj"
  assert "--spot" in create
  install = [c for c in cmds if "--command" in " ".join(c) and "pip install" in " ".join(c)]
  assert install and "'.[tpu]'" in _option(install[0], "--command") and _option(install[0], "--worker") == "all"
  assert any(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "scp" for c in cmds)
  argv = _trainer_argv(_start_command(cmds))
  i = argv.index("-m")
  assert argv[i + 1] == "bgpo_jax.main"
  assert "--config=configs/math.py" in argv and "--workdir=gs://bkt/runs/r1" in argv
  assert "--config.distributed=on" in argv  # Cloud TPU VMs are not detected by maybe_initialize_distributed
  assert "--config.task.tfds_dir=/tmp/bgpo_tfds" in argv  # host-local: hosts never race on one TFDS build
  for a in ("--config.total_steps=10", "--config.rl.num_mc_samples=8", "--config.mesh.shape=(1,-1,1)",
            "--config.task.instruction=it's; a test", "LIBTPU_INIT_ARGS=--xla_tpu_flag=1"):
    assert a in argv, (a, argv)
  assert cmds[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bgpo-test", "--zone=us-east5-a",
                      "--project=my-proj", "--quiet"]


def test_tpu_keep_teardown_only_and_runtime_defaults(fakes):
  env, log = fakes
  p = _run(TPU, *TPU_ARGS, "--keep", "--dry-run", env=env)
  assert p.returncode == 0 and not any("delete" in c for c in _commands(p.stdout))
  p = _run(TPU, "--zone=z", "--name=bgpo-test", "--teardown-only", "--dry-run", env=env)
  assert p.returncode == 0, p.stderr
  assert _commands(p.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "bgpo-test", "--zone=z", "--quiet"]]
  p = _run(TPU, *TPU_ARGS, "--accelerator-type=v5litepod-32", "--dry-run", env=env)
  assert _option(_commands(p.stdout)[0], "--version") == "v2-alpha-tpuv5-lite"
  p = _run(TPU, *TPU_ARGS, "--accelerator-type=v9x-8", "--dry-run", env=env)
  assert p.returncode != 0 and "--runtime-version" in p.stderr
  env2 = dict(env, BGPO_TPU_ZONE="europe-west4-b", BGPO_WORKDIR="gs://b/r", BGPO_TPU_TYPE="v4-32")
  p = _run(TPU, "--dry-run", env=env2)
  create = _commands(p.stdout)[0]
  assert _option(create, "--zone") == "europe-west4-b" and _option(create, "--version") == "tpu-ubuntu2204-base"
  assert create[5] == "bgpo-tester"  # default name from $USER
  assert _calls(log) == []


def test_tpu_rejects_local_workdir_and_missing_zone(fakes):
  env, _ = fakes
  p = _run(TPU, "--zone=z", "--workdir=/tmp/run", "--dry-run", env=env)
  assert p.returncode != 0 and "must be a gs:// path" in p.stderr
  p = _run(TPU, "--workdir=gs://b/r", "--dry-run", env=env)
  assert p.returncode != 0 and "--zone is required" in p.stderr


def test_tpu_full_run_with_fake_gcloud(fakes, tmp_path):
  env, log = fakes
  p = _run(TPU, *TPU_ARGS, env=env)
  assert p.returncode == 0, p.stderr
  calls = _calls(log)
  verbs = [c[4] for c in calls]  # gcloud compute tpus tpu-vm VERB
  assert verbs[:3] == ["create", "scp", "ssh"] and verbs[-1] == "delete", verbs
  assert "step 1/1" in p.stdout  # the streamed log
  with tarfile.open(tmp_path / "bgpo_jax_bgpo-test.tgz") as tf:
    names = tf.getnames()
  assert "./configs/math.py" in names and "./bgpo_jax/main.py" in names
  assert not any(n.startswith(("./.venv", "./.git/")) or "__pycache__" in n for n in names)


def test_tpu_ctrl_c_without_a_terminal_leaves_the_slice_up(fakes):
  env, log = fakes
  proc = subprocess.Popen(["bash", str(TPU), *TPU_ARGS, "--skip-create", "--skip-install"],
                          env=dict(env, FAKE_BLOCK="1"), cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          # A terminal's shell starts with Ctrl-C's default action; a test runner's
                          # worker (pytest-xdist) may ignore SIGINT, which bash would then inherit
                          # and could not trap.
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.time() + 15
    while not any("tail -n" in " ".join(c) for c in _calls(log)):
      assert time.time() < deadline, "the launcher never reached the log stream"
      time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=15)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 130
  assert "tear down:" in err and "--teardown-only" in err
  assert not any("delete" in c for c in _calls(log))


def _remote_env(tmp_path: Path, python_body: str) -> dict:
  """A fake TPU host: HOME with ~/bgpo_jax, and a python3 that runs `python_body`."""
  home = tmp_path / "home"
  (home / "bgpo_jax").mkdir(parents=True)
  bin_dir = tmp_path / "hostbin"
  bin_dir.mkdir(parents=True)
  py = bin_dir / "python3"
  py.write_text("#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > \"$HOME/argv\"\n" + python_body)
  py.chmod(0o755)
  return {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.skipif(not shutil.which("setsid"), reason="setsid (util-linux) is not installed")
def test_tpu_host_side_start_stream_stop(fakes, tmp_path):
  """The remote commands, run locally on a fake host: start detaches the trainer with its exact
  argv, the stream ends with the trainer's exit code, a busy host refuses a second start, and
  --stop-only's SIGTERM reaches the trainer."""
  env, _ = fakes
  cmds = _commands(_run(TPU, *TPU_ARGS, "--dry-run", "--", "--config.task.instruction=it's; a test", env=env).stdout)
  stop_cmds = _commands(_run(TPU, *TPU_ARGS, "--stop-only", "--dry-run", env=env).stdout)
  start = _start_command(cmds)
  stream = [_option(c, "--command") for c in cmds if "tail -n" in " ".join(c)][0]
  assert _option(stop_cmds[0], "--worker") == "all"
  stop = _option(stop_cmds[0], "--command")

  host = _remote_env(tmp_path / "a", "echo training-on-host; exit 3\n")
  subprocess.run(["bash", "-c", start], env=host, check=True, timeout=10)
  s = subprocess.run(["bash", "-c", stream], env=host, capture_output=True, text=True, timeout=20)
  assert s.returncode == 3 and "training-on-host" in s.stdout, (s.stdout, s.stderr)
  argv = (Path(host["HOME"]) / "argv").read_text().split("\0")[:-1]
  assert argv[:2] == ["-m", "bgpo_jax.main"] and "--config.task.instruction=it's; a test" in argv
  assert "--workdir=gs://bkt/runs/r1" in argv and "--config.distributed=on" in argv

  host = _remote_env(tmp_path / "b", "trap 'echo saved-on-term; exit 0' TERM\necho started\n"
                                     "while true; do sleep 0.05; done\n")
  subprocess.run(["bash", "-c", start], env=host, check=True, timeout=10)
  log = Path(host["HOME"]) / "bgpo_run" / "train.log"
  deadline = time.time() + 10
  while not (log.exists() and "started" in log.read_text()):
    assert time.time() < deadline, "the fake trainer did not start"
    time.sleep(0.05)
  again = subprocess.run(["bash", "-c", start], env=host, capture_output=True, text=True, timeout=10)
  assert again.returncode != 0 and "already running" in again.stderr
  subprocess.run(["bash", "-c", stop], env=host, check=True, timeout=10)
  s = subprocess.run(["bash", "-c", stream], env=host, capture_output=True, text=True, timeout=20)
  assert s.returncode == 0 and "saved-on-term" in s.stdout, (s.stdout, s.stderr)


# ---------------------------------------------------------------------------------------- SLURM


SLURM_ARGS = ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=48:00:00", "--job-name=exp1",
              "--config=configs/math.py", "--extra=--config.total_steps=10")


def _sbatch_script(stdout: str) -> str:
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("# --- sbatch script"))
  end = next(i for i, l in enumerate(lines) if l.startswith("# --- end of sbatch script"))
  return "\n".join(lines[start + 1:end]) + "\n"


def test_slurm_dry_run_prints_sbatch_script(fakes, tmp_path):
  env, log = fakes
  workdir = tmp_path / "run"
  p = _run(SLURM, *SLURM_ARGS, f"--workdir={workdir}", "--requeue", "--sbatch-arg=--qos=high", "--dry-run",
           "--", "--config.mesh.shape=(1,-1,1)", env=env)
  assert p.returncode == 0, p.stderr
  assert _calls(log) == [] and not workdir.exists(), "a dry run must not run or create anything"
  script = _sbatch_script(p.stdout)
  for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                    "--time=48:00:00", "--job-name=exp1", "--signal=TERM@600", "--requeue", "--qos=high",
                    "--exclusive", f"--output={workdir}/slurm/%x-%j.out"):
    assert f"#SBATCH {directive}\n" in script, directive
  assert 'scontrol show hostnames "${SLURM_JOB_NODELIST}"' in script
  assert "export JAX_COORDINATOR_ADDRESS=" in script and "export JAX_LOCAL_DEVICE_IDS" in script
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in script and "# export NCCL_" in script
  srun = script[script.index("\nsrun "):]
  assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
  argv = shlex.split(srun.splitlines()[-1])
  assert argv[:3] == ["python3", "-m", "bgpo_jax.main"]
  assert f"--workdir={workdir}" in argv and "--config=configs/math.py" in argv
  assert "--config.total_steps=10" in argv and "--config.mesh.shape=(1,-1,1)" in argv
  assert "--config.task.tfds_dir=/tmp/bgpo_tfds" in argv
  assert p.stdout.splitlines()[-1].startswith(f"+ sbatch --parsable {workdir}/slurm/exp1-")
  subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=10)


def test_slurm_inside_allocation_sets_coordinator_env(fakes, tmp_path):
  """With SLURM_JOB_ID set, the body runs here: fake scontrol gives the nodes, fake srun shows the env."""
  env, log = fakes
  env = dict(env, SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2",
             SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
  p = _run(SLURM, "--workdir=rel/run", "--extra=--config.seed=3", "--dry-run", env=env)
  assert p.returncode == 0 and "+ sbatch" not in p.stdout and "srun --nodes=" in p.stdout
  assert _calls(log) == []
  p = _run(SLURM, "--workdir=rel/run", "--extra=--config.seed=3", env=env)
  assert p.returncode == 0, p.stderr
  calls = _calls(log)
  assert calls[0][:4] == ["scontrol", "show", "hostnames", "node[01-02]"]
  srun = calls[1]
  assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--cpus-per-task=16" in srun
  i = srun.index("-m")
  assert srun[i + 1] == "bgpo_jax.main" and f"--workdir={ROOT}/rel/run" in srun and "--config.seed=3" in srun
  # Port from the job id (1234 % 4096 + 61440); all 4 GPUs of the node for the one process.
  assert "COORD=node01:62674 LOCAL=0,1,2,3 MEM=0.90" in log.read_text()


def test_slurm_submit_writes_script_and_calls_sbatch(fakes, tmp_path):
  env, log = fakes
  p = _run(SLURM, *SLURM_ARGS, f"--workdir={tmp_path / 'run'}", "--port=12345", env=env)
  assert p.returncode == 0, p.stderr
  assert "submitted job 555" in p.stdout and "scancel --signal=TERM 555" in p.stdout
  (call,) = _calls(log)
  assert call[:2] == ["sbatch", "--parsable"]
  text = Path(call[2]).read_text()
  assert text.startswith("#!/bin/bash\n#SBATCH --job-name=exp1\n")
  assert 'JAX_COORDINATOR_ADDRESS="${head_node}:12345"' in text


@pytest.mark.slow  # two jax.distributed subprocesses
def test_slurm_env_contract_initializes_jax_distributed(tmp_path):
  """What the job body exports + what srun sets per task is enough for the trainer's
  mesh.maybe_initialize_distributed(): two local processes join one jax.distributed cluster."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = ("import jax\nfrom bgpo_jax.train import mesh\nmesh.maybe_initialize_distributed('auto')\n"
          "print('RESULT', jax.process_index(), jax.process_count(), flush=True)\n")
  base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and "proxy" not in k.lower()}
  base.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_LOCAL_DEVICE_IDS="0",
              SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_LOCALID="0",
              PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(base, SLURM_PROCID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for pr in procs:
      out, err = pr.communicate(timeout=120)
      assert pr.returncode == 0, err[-3000:]
      outs.append(next(l for l in out.splitlines() if l.startswith("RESULT")))
  finally:
    for pr in procs:
      if pr.poll() is None:
        pr.kill()
  assert outs == ["RESULT 0 2", "RESULT 1 2"]
