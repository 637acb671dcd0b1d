"""Faults in a real (tiny) run: NaN/Inf updates, non-finite states and imported weights, damaged
checkpoints, a full disk during an async save, a resume with another config, a deleted
metrics.jsonl, a workdir that is a file. Each test damages a run and checks the one-line message
and that no earlier checkpoint or metric row is lost."""

import errno
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax import objectives
from bgpo_jax.train import loop as loop_lib
from bgpo_jax.train import rng as rng_lib
from bgpo_jax.train.nonfinite import NonFiniteError
from bgpo_jax.train.run import build_run
from bgpo_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

STEPS = 4  # the shared run: SFT steps 1..4, a checkpoint after each


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def tiny_sft(cache_dir, total=STEPS):
  """The demo shrunk to a ~2 s SFT run: every step logged and checkpointed, all checkpoints kept."""
  c = demo.get_config()
  c.mode = "sft"
  c.total_steps = total
  c.model.n_layers = 2
  c.task.demo_train_size = 200
  c.task.demo_test_size = 16
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0
  c.eval_every = 0
  c.eval.at_start = False
  c.plot_at_end = False
  c.log_every = 1
  c.checkpoint_every = 1
  c.keep_checkpoints = 10
  c.compilation_cache_dir = cache_dir
  return c


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _record_states(monkeypatch):
  """Host copies of the train state after each step (the step donates the device buffers)."""
  states = {}
  orig = loop_lib.sft_step

  def sft_step(run, step):
    m = orig(run, step)
    states[step + 1] = _host(run.state)
    return m

  monkeypatch.setattr(loop_lib, "sft_step", sft_step)
  return states


def _steps(workdir, folder="checkpoints"):
  d = Path(workdir) / folder
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, cache_dir):
  """One clean run shared by the damage tests (each works on a copy): workdir, rows, states."""
  workdir = str(tmp_path_factory.mktemp("clean") / "run")
  mp = pytest.MonkeyPatch()
  try:
    states = _record_states(mp)
    loop_lib.train(build_run(tiny_sft(cache_dir), workdir))
  finally:
    mp.undo()
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and _steps(workdir) == [1, 2, 3, 4]
  return workdir, rows, states


def _copy(sft_run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(sft_run[0], dst, ignore=shutil.ignore_patterns("jax_cache"))
  return dst


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- non-finite updates


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(cache_dir, tmp_path, monkeypatch):
  """NaN MC weights (the SFT loss's 1/t) at steps 3 and 5-7: each update is skipped (params,
  moments and the update count unchanged), train/nonfinite_steps counts them, and the third in a
  row stops the run with one line naming the step and the metric."""
  c = tiny_sft(cache_dir, total=8)
  c.checkpoint_every = 2
  c.optim.max_nonfinite_steps = 3
  poisoned = {2, 4, 5, 6}  # 0-based: the updates logged as steps 3, 5, 6, 7
  orig_masks = rng_lib.mc_masks

  def masks(streams, step, rows, n, estimator, gen_length):
    m, w = orig_masks(streams, step, rows, n, estimator, gen_length)
    return m, (np.full_like(w, np.nan) if step in poisoned else w)

  monkeypatch.setattr(rng_lib, "mc_masks", masks)
  states = _record_states(monkeypatch)
  workdir = str(tmp_path / "run")
  with pytest.raises(NonFiniteError) as e:
    loop_lib.train(build_run(c, workdir))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("stopped at step 7: train/loss is nan; 3 updates in a row were skipped"), msg
  assert "optim.max_nonfinite_steps=3" in msg
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, 8))
  assert [r["train/nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 2, 3, 4]
  # A skipped update leaves the whole state as it was, bit for bit; the next finite one moves it.
  _assert_tree_equal(states[3], states[2])
  _assert_tree_equal(states[7], states[4])
  assert int(states[3].step) == 2 and int(states[4].step) == 3
  assert not np.array_equal(states[4].params["wte"], states[3].params["wte"])
  # The checkpoints before the stop are all there and finite; resuming continues from step 6 with
  # its rows intact (step 7's is dropped: written after the checkpoint) and the count restored.
  assert _steps(workdir) == [2, 4, 6]
  monkeypatch.setattr(rng_lib, "mc_masks", orig_masks)
  resumed = build_run(c, workdir)
  assert resumed.start_step == 6 and resumed.nonfinite.total == 3
  _assert_tree_equal(_host(resumed.state), states[6])
  assert read_metrics(workdir) == rows[:6]
  resumed.ckpt.close()


def test_nonfinite_rl_updates_stop_the_run(cache_dir, tmp_path, monkeypatch):
  """The RL phase: NaN advantages make every update non-finite; K=2 stops at the second step."""
  c = tiny_sft(cache_dir, total=3)
  c.mode = "rl"
  c.sft.steps = 0
  c.rl.prompts_per_step = 2
  c.rl.group_size = 4
  c.rl.num_mc_samples = 2
  c.rl.micro_batch_per_device = 0
  c.optim.max_nonfinite_steps = 2
  monkeypatch.setattr(objectives, "group_advantages", lambda r, **kw: r * np.nan)
  workdir = str(tmp_path / "rl")
  trainer = build_run(c, workdir)
  before = _host(trainer.state)
  with pytest.raises(NonFiniteError, match=r"^stopped at step 2: train/loss is nan; 2 updates in a row"):
    loop_lib.train(trainer)
  rows = read_metrics(workdir)
  assert [(r["step"], r["train/nonfinite_steps"]) for r in rows] == [(1, 1.0), (2, 2.0)]
  _assert_tree_equal(_host(trainer.state), before)
  assert _steps(workdir) == [1]  # step 1's checkpoint (the initial params, finite) was written


def test_a_nonfinite_state_is_never_checkpointed(sft_run, cache_dir, tmp_path, caplog):
  """Params that hold NaN (e.g. a corrupted buffer) are not saved, so the good checkpoints never
  rotate out, even with keep_checkpoints=2."""
  workdir = _copy(sft_run, tmp_path)
  c = tiny_sft(cache_dir, total=STEPS + 2)
  c.keep_checkpoints = 2
  trainer = build_run(c, workdir)
  assert trainer.start_step == STEPS
  params = dict(trainer.state.params, wte=trainer.state.params["wte"].at[0, 0].set(np.nan))
  trainer.state = trainer.state.replace(params=params)
  with caplog.at_level(logging.WARNING):
    loop_lib.train(trainer)
  warned = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
  assert len(warned) == 2 and "step 5 not saved: the array params/wte holds NaN/Inf" in warned[0], warned
  assert "last good checkpoint (step 4)" in warned[0]
  assert _steps(workdir) == [1, 2, 3, 4]  # nothing new, nothing rotated out
  rows = read_metrics(workdir)
  assert rows[:STEPS] == sft_run[1] and [r["train/nonfinite_steps"] for r in rows[STEPS:]] == [1, 2]
  resumed = build_run(c, workdir)
  assert resumed.start_step == STEPS
  _assert_tree_equal(_host(resumed.state), sft_run[2][STEPS])
  resumed.ckpt.close()


def test_imported_weights_with_nan_are_refused(tmp_path):
  """A Hugging Face checkpoint with one NaN in one tensor: the trainer's import names the tensor."""
  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.models import hf
  from bgpo_jax.tools import tiny_checkpoint
  from bgpo_jax.train import mesh as mesh_lib
  path = tmp_path / "hf"
  tiny_checkpoint.write(path, n_layers=1, d_model=32, mlp_hidden_size=64)
  name = "model.transformer.blocks.0.q_proj.weight"
  shard = path / json.loads((path / hf.INDEX_FILE).read_text())["weight_map"][name]
  raw = bytearray(shard.read_bytes())
  (n,) = struct.unpack("<Q", raw[:8])
  entry = json.loads(raw[8:8 + n])[name]
  assert entry["dtype"] == "BF16"
  at = 8 + n + entry["data_offsets"][0] + 2 * 5  # the 6th value
  raw[at:at + 2] = struct.pack("<H", 0x7FC0)  # bfloat16 NaN
  shard.write_bytes(bytes(raw))
  c = config_lib.base_config()
  c.init.checkpoint = str(path)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tok = tasks_lib.build_tokenizer(c)
  with pytest.raises(hf.CheckpointError) as e:
    tasks_lib.build_model(c, tok, mesh)
  assert f"checkpoint {path}: {name} holds NaN/Inf (1 of 1024 values); refusing to import it" in str(e.value)
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- damaged checkpoints


def test_the_fingerprint_sees_one_flipped_bit_in_any_dtype():
  """What catches flipped bytes that still decompress: one bit anywhere changes a leaf's print."""
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  tree = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
          "i32": np.arange(4, dtype=np.int32), "step": np.int32(3)}
  prints, finite = jax.device_get(ckpt_lib._state_summary(tree))
  assert finite.all() and ckpt_lib._leaf_names(tree) == ["bf16", "f32", "i32", "step"]
  flipped = dict(tree, f32=tree["f32"].copy())
  flipped["f32"].view(np.uint32)[2, 4] ^= 1 << 31  # the sign bit of the last value
  swapped = dict(tree, i32=tree["i32"][::-1].copy())  # same values, other places
  for other, leaf in ((flipped, 1), (swapped, 2)):
    changed = np.asarray(jax.device_get(ckpt_lib._state_summary(other))[0]) != prints
    np.testing.assert_array_equal(changed, np.arange(4) == leaf)
  _, finite = jax.device_get(ckpt_lib._state_summary(dict(tree, f32=np.full((2,), np.inf, np.float32))))
  np.testing.assert_array_equal(finite, [True, False, True, True])


def _data_files(step_dir):
  return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
                key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _data_files(step_dir)[-1]
  with open(f, "r+b") as fh:
    fh.truncate(f.stat().st_size // 2)


def _delete(step_dir):
  _data_files(step_dir)[-1].unlink()


def _flip(step_dir):
  """One bit in the middle of the largest array file: it still decompresses, to other values."""
  f = _data_files(step_dir)[-1]
  raw = bytearray(f.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  f.write_bytes(bytes(raw))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip, _empty],
                         ids=["truncated", "deleted", "flipped", "empty"])
def test_a_damaged_latest_checkpoint_is_moved_aside(sft_run, cache_dir, tmp_path, caplog, damage):
  workdir = _copy(sft_run, tmp_path)
  damage(Path(workdir) / "checkpoints" / str(STEPS))
  with caplog.at_level(logging.WARNING):
    trainer = build_run(tiny_sft(cache_dir), workdir)
  assert trainer.start_step == STEPS - 1
  _assert_tree_equal(_host(trainer.state), sft_run[2][STEPS - 1])
  warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warned) == 1
  assert warned[0].startswith(f"checkpoint step {STEPS} in {workdir}/checkpoints does not restore: ")
  assert (f"Moved it to {workdir}/{ckpt_lib.DAMAGED_DIR}/{STEPS} (nothing was deleted); resuming from step 3"
          in warned[0])
  assert "\n" not in warned[0] and "tensorstore_spec" not in warned[0] and len(warned[0]) < 700
  assert _steps(workdir) == [1, 2, 3] and _steps(workdir, ckpt_lib.DAMAGED_DIR) == [STEPS]
  assert read_metrics(workdir) == sft_run[1][:STEPS - 1]
  trainer.ckpt.close()


def test_no_checkpoint_restores_fails_in_one_line_and_moves_nothing(sft_run, cache_dir, tmp_path):
  workdir = _copy(sft_run, tmp_path)
  for step in _steps(workdir):
    _empty(Path(workdir) / "checkpoints" / str(step))
  with pytest.raises(ckpt_lib.RunError) as e:
    build_run(tiny_sft(cache_dir), workdir)
  msg = str(e.value)
  assert msg.startswith(f"no checkpoint in {workdir}/checkpoints restores (steps 4, 3, 2, 1; step 4: "), msg
  assert "\n" not in msg and "they were left in place" in msg
  assert _steps(workdir) == [1, 2, 3, 4] and not (Path(workdir) / ckpt_lib.DAMAGED_DIR).exists()
  assert read_metrics(workdir) == sft_run[1]


# ----------------------------------------------------------------------------- a full disk


def test_disk_full_during_an_async_save(cache_dir, tmp_path, monkeypatch, caplog):
  """ENOSPC in the background write of step 3: one line naming the step and path, the partial
  folder removed, no Orbax traceback logged, steps 1-2 restore."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
  orig = jh.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    if x.get("step") == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await orig(self, x, directory)

  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save_fn)
  states = _record_states(monkeypatch)
  workdir = str(tmp_path / "run")
  c = tiny_sft(cache_dir, total=5)
  with caplog.at_level(logging.INFO), pytest.raises(ckpt_lib.CheckpointWriteError) as e:
    loop_lib.train(build_run(c, workdir))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"checkpoint: saving step 3 to {workdir}/checkpoints/3 failed: "
                        "[Errno 28] No space left on device"), msg
  assert "removed the partial" in msg and "3.orbax-checkpoint-tmp" in msg
  assert "the earlier checkpoints are intact (latest: step 2)" in msg
  assert not [r for r in caplog.records if r.exc_info], "Orbax's tracebacks reached the log"
  assert sorted(os.listdir(Path(workdir) / "checkpoints")) == ["1", "2"]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows][:3] == [1, 2, 3]
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", orig)
  resumed = build_run(c, workdir)
  assert resumed.start_step == 2
  _assert_tree_equal(_host(resumed.state), states[2])
  assert read_metrics(workdir) == rows[:2]
  resumed.ckpt.close()


# ----------------------------------------------------------------------------- resume with another config


def test_changed_keys_is_pure_and_ignores_the_free_keys():
  old = {"seed": 0, "total_steps": 10, "optim": {"learning_rate": 1e-3, "b1": 0.9}, "mesh": {"shape": [-1, 1, 1]},
         "rewards": {"code_workers": 0}, "gone": 1}
  new = {"seed": 1, "total_steps": 20, "optim": {"learning_rate": 2e-3, "b1": 0.9}, "mesh": {"shape": (1, -1, 1)},
         "rewards": {"code_workers": 8}, "added": 2}
  before = json.dumps(old, sort_keys=True), repr(new)
  assert ckpt_lib.changed_keys(old, new) == ["optim.learning_rate", "seed"]
  assert (json.dumps(old, sort_keys=True), repr(new)) == before  # inputs untouched
  assert ckpt_lib.changed_keys(old, old) == []
  assert ckpt_lib.changed_keys({"a": [1, 2]}, {"a": (1, 2)}) == []  # JSON lists are tuples
  assert {"total_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "eval.num_examples",
          "eval.batch_size", "sft.eval_every", "plot_at_end", "compilation_cache_dir", "distributed",
          "rewards.code_workers"} <= ckpt_lib.RESUME_FREE_KEYS


def test_a_resume_with_another_config_is_refused(sft_run, cache_dir, tmp_path):
  workdir = _copy(sft_run, tmp_path)
  recorded = (Path(workdir) / ckpt_lib.RUN_CONFIG).read_text()
  c = tiny_sft(cache_dir)
  c.seed = 1
  c.sft.learning_rate = 1e-3
  with pytest.raises(config_lib.ConfigError) as e:
    build_run(c, workdir)
  msg = str(e.value)
  assert "\n" not in msg
  assert "seed 0 -> 1" in msg and "sft.learning_rate 0.003 -> 0.001" in msg
  assert "new --workdir" in msg and msg.endswith("--config.seed=0 --config.sft.learning_rate=0.003")
  assert (Path(workdir) / ckpt_lib.RUN_CONFIG).read_text() == recorded
  assert _steps(workdir) == [1, 2, 3, 4] and read_metrics(workdir) == sft_run[1]


def test_a_resume_may_change_the_free_keys_and_survives_a_deleted_metrics_file(sft_run, cache_dir, tmp_path, caplog,
                                                                                 monkeypatch):
  """More steps, other logging / checkpoint cadence: resumes. metrics.jsonl deleted during the
  resumed run: one warning, and the file is rewritten with every row."""
  workdir = _copy(sft_run, tmp_path)
  c = tiny_sft(cache_dir, total=STEPS + 2)
  c.checkpoint_every = 2
  c.keep_checkpoints = 5
  trainer = build_run(c, workdir)
  assert trainer.start_step == STEPS
  orig = loop_lib.sft_step

  def sft_step(run, step):
    if step == STEPS:
      os.remove(os.path.join(workdir, "metrics.jsonl"))
    return orig(run, step)

  monkeypatch.setattr(loop_lib, "sft_step", sft_step)
  with caplog.at_level(logging.WARNING):
    loop_lib.train(trainer)
  warned = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
  assert warned == [f"{workdir}/metrics.jsonl was deleted during the run; rewrote it with its 4 earlier rows"]
  rows = read_metrics(workdir)
  assert rows[:STEPS] == sft_run[1] and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert json.loads((Path(workdir) / ckpt_lib.RUN_CONFIG).read_text())["total_steps"] == STEPS + 2


# ----------------------------------------------------------------------------- workdir


@pytest.mark.slow  # a trainer subprocess
def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("not a run\n")
  with pytest.raises(ckpt_lib.RunError, match=f"^--workdir {f} is an existing file, not a folder"):
    ckpt_lib.ensure_workdir(str(f))
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.main", "--config=configs/demo.py", f"--workdir={f}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1] == (f"bgpo_jax.main: --workdir {f} is an existing file, not a folder; "
                                               "pass a folder path (it is created when missing)")
  assert f.read_text() == "not a run\n"
