"""Multi-host runs: the trainer on two jax.distributed processes (4 CPU devices each) against one
process on 8 devices; a workdir on a non-local filesystem; the row-splitting helpers.

One subprocess trio per module: two processes of `multihost_trainer_worker.py multi` and one
`single`, started together.
"""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

from bgpo_jax import distributed as dist

WORKER = Path(__file__).with_name("multihost_trainer_worker.py")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "train"))
import multihost_trainer_worker as worker  # noqa: E402

VOLATILE = ("time/", "perf/", "mem/")


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    env.pop(k, None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(stdout: str, stderr: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, (stdout[-2000:], stderr[-4000:])
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one process on 8 devices, [process 0, process 1] of a 2 x 4-device run), their workdirs."""
  single_dir = str(tmp_path_factory.mktemp("single"))
  multi_dir = str(tmp_path_factory.mktemp("multi"))  # shared by both processes, as a real bucket
  port = str(_free_port())
  cmds = [([sys.executable, str(WORKER), "single", single_dir], 8)]
  cmds += [([sys.executable, str(WORKER), "multi", str(i), "2", port, multi_dir], 4) for i in range(2)]
  procs = [subprocess.Popen(c, env=_env(d), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c, d in cmds]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=900)
      assert p.returncode == 0, err[-4000:]
      outs.append(_result(out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs[0], outs[1:], single_dir, multi_dir


def _stable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.slow  # three trainer subprocesses (the shared fixture)
def test_two_processes_reproduce_the_one_process_run(runs):
  single, (p0, p1), _, _ = runs
  assert (single["process_count"], single["local_devices"]) == (1, 8)
  assert (p0["process_count"], p0["local_devices"], p1["local_devices"]) == (2, 4, 4)
  assert p0["resumed_at"] == p1["resumed_at"] == single["resumed_at"] == 3  # stopped, saved, resumed
  want, got = _stable(single["metrics"]), _stable(p0["metrics"])
  assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]  # each step once
  for w, g in zip(want, got):
    assert sorted(w) == sorted(g), (w["step"], set(w) ^ set(g))
    for k in w:
      # SFT loss at step 1 (MC masks), rewards (global rows), loss and gradient norm (the update),
      # and the evaluation all agree: nothing depends on the process layout.
      np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-7, err_msg=f"step {w['step']} {k}")
  assert p1["metrics"] is None  # (read by process 0; only process 0 writes metrics.jsonl)


@pytest.mark.slow  # three trainer subprocesses (the shared fixture)
def test_evaluation_is_split_between_the_processes(runs):
  single, (p0, p1), single_dir, multi_dir = runs
  # 16 eval examples: one generate call of 16 rows on one process, 8 rows on each of two (at the
  # SFT->RL boundary and at the end, before and after the resume).
  assert single["eval_rows"] == [16, 16]
  assert p0["eval_rows"] == p1["eval_rows"] == [8, 8]
  # Every process returns the same (gathered) numbers; one JSONL, equal to the one-process run's.
  assert p0["run_eval_accuracy"] == p1["run_eval_accuracy"] == single["run_eval_accuracy"]
  assert p0["summary_accuracy"] == p1["summary_accuracy"] == single["summary_accuracy"]
  multi_lines = Path(multi_dir, "eval.jsonl").read_text().splitlines()
  assert len(multi_lines) == 16
  assert multi_lines == Path(single_dir, "eval.jsonl").read_text().splitlines()


@pytest.mark.slow  # three trainer subprocesses (the shared fixture)
def test_group_skipping_on_two_processes_keeps_the_same_rows(runs):
  single, (p0, _), _, _ = runs
  # The worker's rewards make groups 2 and 3 (process 1's prompts) the only live ones: both
  # topologies keep those 2 groups = 8 of 16 rows, process 0 training rows process 1 generated,
  # and the update (loss, gradient norm, next step's ELBO) is the one-process update.
  for w, g in zip(single["metrics"], p0["metrics"]):
    if "train/reward_mean" in w:
      assert w["train/rows_trained"] == g["train/rows_trained"] == 8.0
      assert w["train/zero_adv_groups"] == g["train/zero_adv_groups"] == 0.5
      np.testing.assert_allclose(g["train/grad_norm"], w["train/grad_norm"], rtol=2e-5)
      assert g["train/grad_norm"] > 0


@pytest.mark.slow  # three trainer subprocesses (the shared fixture)
def test_checkpoints_are_written_once_per_step_by_both_processes(runs):
  _, _, _, multi_dir = runs
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(multi_dir, "checkpoints")) if d.isdigit())
  assert ckpts == [2, 3, 4]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(multi_dir, "tensorboard")))


# ---------------------------------------------------------------------------- a remote workdir


@pytest.fixture
def memory_bucket(monkeypatch, tmp_path):
  """s3:// paths served by fsspec's in-memory filesystem through etils.epath (offline): the
  trainer sees a URI workdir exactly as it would a bucket. The cwd is an empty folder, so any
  file written with a local `open` on the URI would show up there."""
  import fsspec
  from etils.epath import backend, gpath

  fs = fsspec.filesystem("memory")

  class MemoryBackend(backend._FileSystemSpecBackend):  # pylint: disable=protected-access
    def fs(self, path):
      return fs

  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "s3", MemoryBackend())  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # Writers the test leaves open (a run built and not trained) flush at interpreter exit, when
  # the s3 backend is unpatched again: close them while it is still there.
  from bgpo_jax import metrics
  opened = []
  init = metrics.MetricsWriter.__init__

  def tracked_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    opened.append(self)

  monkeypatch.setattr(metrics.MetricsWriter, "__init__", tracked_init)
  root = f"s3://bgpo-test-{uuid.uuid4().hex[:8]}/run"
  yield root, fs, cwd
  for w in opened:
    w.close()
  fs.rm(root.split("/run")[0], recursive=True)


@pytest.mark.slow  # train, resume and evaluate end to end
def test_remote_workdir_metrics_checkpoint_resume_plot_eval(memory_bucket):
  from etils import epath

  from bgpo_jax import checkpoint as ckpt_lib
  from bgpo_jax.evaluate import run_eval
  from bgpo_jax.metrics import read_metrics
  from bgpo_jax.train.loop import train
  from bgpo_jax.train.run import build_run

  root, fs, cwd = memory_bucket
  c = worker.config()
  c.plot_at_end = True
  train(build_run(c, root), stop_at=3)
  ckpt_dir = epath.Path(root) / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 3]
  assert all((ckpt_dir / s / ckpt_lib.STAGED_MARKER).exists() for s in ("2", "3"))
  resumed = build_run(c, root)
  assert resumed.start_step == 3  # found and restored through epath
  with resumed.writer.path.open() as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3]
  summary = train(resumed)
  assert [r["step"] for r in read_metrics(root)] == [1, 2, 3, 4]
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 3, 4]
  png = epath.Path(summary["plot"])
  assert str(png) == f"{root}/curves.png" and png.read_bytes()[:4] == b"\x89PNG"
  events = [p for p in (epath.Path(root) / "tensorboard").iterdir() if p.name.startswith("events")]
  assert events and all(p.stat().length > 0 for p in events)
  out = f"{root}/eval.jsonl"
  result = run_eval(worker.config(), root, out, progress=False)  # init from the remote checkpoint
  lines = epath.Path(out).read_text().splitlines()
  assert len(lines) == 16 and result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
  assert list(cwd.iterdir()) == []  # nothing landed in a local "s3:" folder
  assert fs.exists(f"{root}/metrics.jsonl")


@pytest.mark.slow  # train and resume end to end
def test_kl_reference_is_staged_to_a_remote_workdir_and_restored_on_resume(memory_bucket):
  """rl.kl_beta > 0 after an SFT warm-up: the frozen reference saved at the hand-over goes through
  the staging folder (marker last) and a resume restores exactly it."""
  import chex
  from etils import epath

  from bgpo_jax import checkpoint as ckpt_lib
  from bgpo_jax.train.loop import train
  from bgpo_jax.train.run import build_run

  root, fs, cwd = memory_bucket
  c = worker.config()
  c.rl.kl_beta = 0.04
  c.rl.skip_zero_advantage = False
  c.eval_every = 0
  first = build_run(c, root)
  train(first, stop_at=3)  # SFT steps 1-2, RL step 3: the reference is the step-2 policy
  ref_dir = epath.Path(root) / "reference"
  assert (ref_dir / ckpt_lib.STAGED_MARKER).exists()
  resumed = build_run(c, root)
  assert resumed.start_step == 3 and resumed.reference.params is not None
  chex.assert_trees_all_equal(jax.device_get(resumed.reference.params), jax.device_get(first.reference.params))
  (ref_dir / ckpt_lib.STAGED_MARKER).unlink()  # a half-copied reference is refused, not read
  with pytest.raises(FileNotFoundError, match="reference"):
    build_run(c, root)
  assert list(cwd.iterdir()) == []


def test_hf_checkpoint_save_and_load_through_a_remote_path(memory_bucket):
  import dataclasses

  import chex
  import jax
  from etils import epath

  from bgpo_jax.models import hf, llada

  root, _, cwd = memory_bucket
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1, param_dtype="float32")
  params = llada.init_params(cfg, jax.random.key(0))
  files = hf.save(cfg, params, f"{root}/hf")
  assert (epath.Path(root) / "hf" / files[0]).exists() and (epath.Path(root) / "hf" / "config.json").exists()
  cfg2, loaded = hf.load(f"{root}/hf", dtype=None)
  assert cfg2.n_layers == 1
  chex.assert_trees_all_close(loaded, params)
  assert list(cwd.iterdir()) == []


def test_task_data_and_tfds_build_from_a_remote_folder(memory_bucket, tmp_path):
  import io

  import pyarrow as pa
  import pyarrow.parquet as pq
  from etils import epath

  from bgpo_jax.data import records, tfds_builder

  root, _, cwd = memory_bucket
  row = lambda q, a: {"data_source": "gsm8k", "prompt": [{"role": "user", "content": q}],
                      "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"split": "train"}}
  src = epath.Path(root) / "datasets"
  src.mkdir(parents=True)
  (src / "train_gsm8k.jsonl").write_text("".join(json.dumps(row(f"{i} + 1?", str(i + 1))) + "\n" for i in range(5)))
  buf = io.BytesIO()
  pq.write_table(pa.Table.from_pylist([row(f"{i} * 2?", str(2 * i)) for i in range(3)]), buf)
  (src / "test_gsm8k.parquet").write_bytes(buf.getvalue())
  train, _ = records.load_examples("gsm8k", "train", source_dir=str(src))
  test, _ = records.load_examples("gsm8k", "test", source_dir=str(src))
  assert [e["ground_truth"] for e in train] == ["1", "2", "3", "4", "5"] and len(test) == 3
  source, _ = tfds_builder.tfds_source("gsm8k", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  assert [source[i] for i in range(5)] == train
  assert list(cwd.iterdir()) == []


def test_tokenizer_from_a_remote_folder(memory_bucket, tmp_path):
  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.checkpoint import copy_tree
  from bgpo_jax.config import base_config
  from bgpo_jax.tokenizer import load_tokenizer
  from tests.data.test_tokenizer import _write_tokenizer

  root, _, cwd = memory_bucket
  _write_tokenizer(tmp_path / "tok")
  copy_tree(tmp_path / "tok", f"{root}/tok")
  c = base_config()
  c.tokenizer.path = f"{root}/tok"
  remote, local = tasks_lib.build_tokenizer(c), load_tokenizer(tmp_path / "tok")
  assert remote.encode("What is 2 + 2?") == local.encode("What is 2 + 2?") and remote.eos_id == local.eos_id
  assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------- row helpers


def test_split_rows_pads_every_process_to_the_same_count():
  # 10 rows over 2 processes and 4 batch shards: 12 padded rows, 6 each, padding at the end.
  parts = [dist.split_rows(10, 4, process_index=p, process_count=2) for p in range(2)]
  idx = np.concatenate([i for i, _ in parts])
  valid = np.concatenate([v for _, v in parts])
  assert [len(i) for i, _ in parts] == [6, 6]
  np.testing.assert_array_equal(idx[valid], np.arange(10))
  assert valid.sum() == 10 and not valid[10:].any()
  # One process: the whole batch, padded only to the shards.
  i, v = dist.split_rows(10, 4)
  assert len(i) == 12 and v.sum() == 10
  assert dist.host_slice(12, process_index=2, process_count=3) == slice(8, 12)
  with pytest.raises(ValueError, match="do not split over 3 processes"):
    dist.host_slice(10, process_index=0, process_count=3)


def test_gathers_on_one_process_return_the_input():
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(dist.allgather_rows(x), x)
  assert dist.allgather_strings(["a", "ü"]) == ["a", "ü"]
  np.testing.assert_array_equal(dist.gather_valid(np.arange(4), np.array([1, 1, 0, 0], bool)), [0, 1])
  np.testing.assert_array_equal(dist.global_row_ids(3), [0, 1, 2])
