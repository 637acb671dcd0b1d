"""Orbax checkpoints of a run: train state, host state (RNG, data position) and the config.

Layout: WORKDIR/checkpoints/<step>/{state, host}. Orbax writes each save into a temporary
directory and renames it only once complete, so a save killed half way leaves the earlier
checkpoints intact (and the half-written one is ignored on restore).
Kept: the last `keep` checkpoints plus the best one by `best_metric` (when evaluated).

Faults: a state holding NaN/Inf is never saved (so it cannot rotate good checkpoints out); each
save records a fingerprint of every array, checked on restore, so flipped bytes that still
decompress are caught; a step that does not restore is moved to WORKDIR/checkpoints_damaged/
and the next older one is used; a failed (e.g. disk full) save is raised as one line naming the
step and path, and its partial folder removed.

Paths: local, or any `etils.epath` URI. Orbax writes local paths and gs:// itself (TensorStore
has a GCS driver; its other array paths must be absolute local ones). For any other URI scheme
(s3://, az://, hf://, ...), one process stages: Orbax writes a local temporary folder, each
finished step is copied to WORKDIR/checkpoints/<step> through epath with a `_STAGED` marker
written last, and resume copies the newest marked step back first.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from bgpo_jax.config import ConfigError


class RunError(RuntimeError):
  """The run cannot go on; the message (one line) says why and what to do, no traceback needed."""


class CheckpointWriteError(RunError):
  """A checkpoint save failed (e.g. the disk is full); earlier checkpoints are intact."""


DAMAGED_DIR = "checkpoints_damaged"  # WORKDIR/checkpoints_damaged/<step>: moved aside, never deleted


class _OrbaxTracebacks(logging.Filter):
  """Orbax logs a failed background save as several ERROR tracebacks (hundreds of lines with
  TensorStore specs) before the error reaches the caller, and the concurrent reads of a damaged
  checkpoint leave asyncio tasks whose exceptions asyncio logs when they are collected. The
  Checkpointer reports each fault in one line instead, so these go to DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.exc_info and _from_orbax(record):
      logging.getLogger(__name__).debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
      return False
    return True


def _from_orbax(record: logging.LogRecord) -> bool:
  if "orbax" in record.pathname:
    return True
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _quiet_orbax_tracebacks() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_OrbaxTracebacks())


def _collect_orphans() -> None:
  """A failed save or restore leaves Orbax coroutines and tasks behind; collected now (while the
  interpreter can still close them quietly), not at exit, where each prints a traceback."""
  gc.collect()


class Checkpointer:
  """Saves asynchronously every `checkpoint_every` steps and resumes from the latest step."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str = "eval/accuracy",
               async_save: bool = True):
    _quiet_orbax_tracebacks()
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self.best_metric = best_metric
    self.staged = needs_staging(workdir)
    self._pending: int | None = None  # the step of a save that may still be running
    orbax_dir = self.directory
    if self.staged:
      if jax.process_count() > 1:
        raise ValueError(f"workdir {workdir!r}: Orbax cannot write this scheme itself, and staging it through a "
                         "local folder works on one process only; use gs:// or a shared filesystem on several hosts")
      self._local = epath.Path(tempfile.mkdtemp(prefix="bgpo_ckpt_"))
      orbax_dir = self._local
      latest = _latest_staged(self.directory)
      if latest is not None:  # resume: bring the newest finished step back first
        _copy_tree(self.directory / str(latest), orbax_dir / str(latest), skip=(STAGED_MARKER,))
      async_save = False  # each save is copied out as soon as it is written
    self._orbax_dir = orbax_dir
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(orbax_dir, options=options, item_names=("state", "host"))
    self._uploaded = set(self.manager.all_steps()) if self.staged else set()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, host: dict, *, metrics: dict | None = None) -> bool:
    """Starts a save (returns at once when asynchronous). `host` is JSON: rng, data position, config.

    A state holding NaN/Inf is not saved (a warning names the array): the good checkpoints stay.
    Raises CheckpointWriteError (one line) when this save, or the previous asynchronous one, failed.
    """
    self._finish_pending()
    names = _leaf_names(state)
    prints, finite = jax.device_get(_state_summary(state))
    if not np.all(finite):
      bad = [n for n, ok in zip(names, finite) if not ok]
      what = (f"the array {bad[0]} holds" if len(bad) == 1 else
              f"{len(bad)} arrays ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) hold")
      logging.warning("checkpoint: step %d not saved: %s NaN/Inf; the last good checkpoint (step %s) is kept",
                      step, what, self.latest_step())
      return False
    host = dict(host, fingerprint=dict(zip(names, (int(p) for p in prints))))
    m = None
    if metrics and self.best_metric in metrics:
      m = {self.best_metric: float(metrics[self.best_metric])}
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
          metrics=m,
          force=True,
      )
    except Exception as e:
      self._failed(step, e)
    if saved:
      self._pending = step
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
      if self.staged:
        self._upload(step)
    return saved

  def poll(self) -> None:
    """Raises CheckpointWriteError now if the running asynchronous save has failed (no waiting)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    """Waits for the previous save; its failure becomes one CheckpointWriteError, partial folder removed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed(step, e)

  def _failed(self, step: int | None, error: BaseException) -> NoReturn:
    _collect_orphans()
    removed = self._remove_partial(step) if step is not None else []
    self.manager.reload()  # the failed step is not a checkpoint
    where = self.directory / str(step) if step is not None else self.directory
    latest = self.latest_step()
    raise CheckpointWriteError(
        f"checkpoint: saving step {step} to {where} failed: {describe_error(error)}"
        + (f"; removed the partial {', '.join(removed)}" if removed else "")
        + (f"; the earlier checkpoints are intact (latest: step {latest}), free the space and run the "
           "same command to resume from it" if latest is not None else
           "; no earlier checkpoint exists, free the space and run the same command to start again")
    ) from None

  def _remove_partial(self, step: int) -> list[str]:
    """Deletes what a failed save of `step` left: Orbax's `<step>.orbax-checkpoint-tmp*` folder
    (local disks: written there, renamed when complete) or an unfinished `<step>` (object stores)."""
    removed = []
    if jax.process_index() != 0:
      return removed
    for d in (self._orbax_dir, self.directory) if self.staged else (self._orbax_dir,):
      if not d.exists():
        continue
      for child in d.iterdir():
        if child.name == str(step) or child.name.startswith(f"{step}.orbax-checkpoint-tmp"):
          if _remove_settled(child):
            removed.append(str(child))
          else:
            logging.warning("checkpoint: could not remove the partial %s (still being written); the next start "
                            "removes it", child)
    return removed

  def _upload(self, step: int) -> None:
    """Staging: copies the finished step out (marker last) and mirrors the manager's deletions."""
    self._finish_pending()
    _copy_tree(self._local / str(step), self.directory / str(step))
    (self.directory / str(step) / STAGED_MARKER).write_text("complete\n")
    kept = set(self.manager.all_steps())
    for old in sorted(self._uploaded - kept):
      if (self.directory / str(old)).exists():
        (self.directory / str(old)).rmtree()
    self._uploaded = (self._uploaded & kept) | {step}

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` onto the shardings/dtypes of `abstract_state` (ShapeDtypeStructs or arrays).

    Raises ValueError when the restored arrays differ from the fingerprint recorded at save
    (bytes changed on disk that still decompressed) or hold NaN/Inf."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
    host = dict(out.host)
    names = _leaf_names(out.state)
    prints, finite = jax.device_get(_state_summary(out.state))
    saved = host.get("fingerprint")  # absent in checkpoints written before fingerprints
    if saved is not None:
      differ = [n for n, p in zip(names, prints) if n in saved and int(saved[n]) != int(p)]
      if differ:
        raise ValueError(f"{len(differ)} of {len(names)} arrays differ from what was saved ({differ[0]}"
                         f"{', ...' if len(differ) > 1 else ''}): bytes changed on disk")
    if not np.all(finite):
      raise ValueError(f"{names[list(finite).index(False)]} holds NaN/Inf")
    return out.state, host

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, host) of the newest step that restores; None when there are no checkpoints.

    A newer step that does not restore (damaged: truncated, deleted or changed files, an empty
    folder) is moved to WORKDIR/checkpoints_damaged/ with a warning naming the step and the
    cause. When no step restores, nothing is moved (a config that no longer matches its
    checkpoints fails them all alike) and RunError says so in one line.
    """
    failed: list[tuple[int, str]] = []
    for step in self._steps_newest_first():
      restored = None
      try:
        restored = self.restore(step, abstract_state)
      except Exception as e:  # Orbax / TensorStore raise many types for a damaged folder
        failed.append((step, describe_error(e)))
      if restored is None:
        _collect_orphans()  # outside the except block: its traceback no longer holds them
        continue
      state, host = restored
      for bad, cause in failed:
        where = self._move_aside(bad)
        logging.warning("checkpoint step %d in %s does not restore: %s. Moved it to %s (nothing was deleted); "
                        "resuming from step %d instead.", bad, self.directory, cause, where, step)
      if failed:
        self.manager.reload()
      return state, host
    if failed:
      raise RunError(
          f"no checkpoint in {self.directory} restores (steps {', '.join(str(s) for s, _ in failed)}; "
          f"step {failed[0][0]}: {failed[0][1]}); they were left in place: if the config changed since they "
          f"were written, resume with the old one, otherwise start over with a new --workdir")
    return None

  def _steps_newest_first(self):
    """Steps to try, newest first; a staged run copies each one down before it is tried."""
    if not self.staged:
      yield from sorted(self.manager.all_steps(), reverse=True)
      return
    steps = sorted((int(d.name) for d in self.directory.iterdir() if d.name.isdigit()
                    and (d / STAGED_MARKER).exists()), reverse=True) if self.directory.exists() else []
    for step in steps:
      if not (self._local / str(step)).exists():
        _copy_tree(self.directory / str(step), self._local / str(step), skip=(STAGED_MARKER,))
        self.manager.reload()
      yield step

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step folder to WORKDIR/checkpoints_damaged/<step>[.N]; returns where."""
    dest_dir = self.workdir / DAMAGED_DIR
    dest = dest_dir / str(step)
    n = 1
    while dest.exists():
      dest, n = dest_dir / f"{step}.{n}", n + 1
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"bgpo_checkpoint_move_aside_{step}")  # nobody reads it now
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dest_dir.mkdir(parents=True, exist_ok=True)
      if is_local(str(src)):
        os.rename(str(src), str(dest))
      else:  # object stores have no directory rename
        _copy_tree(src, dest)
        src.rmtree()
      if self.staged and (self._local / str(step)).exists():
        (self._local / str(step)).rmtree()
    return str(dest)

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    """Waits for the last save (CheckpointWriteError if it failed) and closes the manager."""
    try:
      self._finish_pending()
    finally:
      try:
        self.manager.close()
      except Exception:  # the failure, if any, was raised above already
        pass
      if self.staged:  # every finished step is in the workdir already
        shutil.rmtree(str(self._local), ignore_errors=True)

  def close_after_error(self) -> None:
    """close() while another error is on its way up: a failed last save is a warning only."""
    try:
      self.close()
    except CheckpointWriteError as e:
      logging.warning("%s", e)


def _remove_settled(path: epath.Path, timeout_s: float = 30.0, settle_s: float = 0.3) -> bool:
  """Removes a folder that writes may still be landing in, until it stays gone for `settle_s`.

  Orbax reports a save's first failed item while TensorStore (its own threads, no handle to wait
  on) may still be writing the others into the same folder."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    try:
      path.rmtree() if path.is_dir() else path.unlink()
    except OSError:  # a file appeared or went away under rmtree
      pass
    time.sleep(settle_s)
    if not path.exists():
      return True
  return False


def _leaf_names(tree: Any) -> list[str]:
  """'params/blocks/q_proj'-style names of a pytree's leaves, in leaf order."""
  def part(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (an 8-byte dtype gives two per element)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


@jax.jit
def _state_summary(tree: Any) -> tuple[jax.Array, jax.Array]:
  """(uint32 fingerprint, all finite) per leaf, computed on device (one small transfer per save).

  fingerprint = sum_i w_i * word_i mod 2**32 with odd weights w_i = 2 i + 1: any single changed
  bit changes it (odd * 2**k is never 0 mod 2**32), swapped values almost surely do, and integer
  sums are exact in any order, so it is the same on any sharding or topology.
  """
  prints, finite = [], []
  for x in jax.tree.leaves(tree):
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
      index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
      stride *= w.shape[d]
    prints.append(jnp.sum(w * (2 * index + 1), dtype=jnp.uint32))
    finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
  return jnp.stack(prints), jnp.stack(finite)


def describe_error(error: BaseException, limit: int = 300) -> str:
  """One line for an exception from Orbax / TensorStore / the OS: the innermost cause's first
  line, without TensorStore's spec dumps (which run to hundreds of lines)."""
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:  # an OS error names the cause best (e.g. [Errno 28] No space left on device)
    if isinstance(e, OSError) and e.errno:
      text = f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
      return text + (f": {e.filename}" if e.filename else "")
  for e in reversed(chain):
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    for cut in (" [tensorstore_spec=", " See full TensorStore details", "tensorstore_spec"):
      text = text.split(cut)[0]
    if text:
      text = text if len(text) <= limit else text[:limit] + "..."
      return f"{type(e).__name__}: {text}" if isinstance(e, (KeyError, FileNotFoundError)) else text
  return type(error).__name__


def is_local(path: str) -> bool:
  return "://" not in str(path)


def restore_params(path: str, abstract_params: Any) -> Any:
  """Parameters only, from an Orbax checkpoint written by this trainer (the optimizer stays on disk).

  `path` is a run's workdir, its checkpoints/ folder, or one step folder in it; the latest step wins.
  `abstract_params` gives shapes, dtypes and (optionally) target shardings.
  """
  state_dir = _find_state_dir(path)
  if needs_staging(state_dir):  # Orbax reads this scheme only from a local copy
    local = epath.Path(tempfile.mkdtemp(prefix="bgpo_init_")) / "state"
    _copy_tree(state_dir, local)
    state_dir = local
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_params)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract)
  out = ocp.PyTreeCheckpointer().restore(
      state_dir,
      args=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": restore_args},
                                  partial_restore=True))
  return out["params"]


def save_tree(path: str, tree: Any) -> None:
  """Saves one pytree of arrays (e.g. the frozen KL reference) to `path`, blocking, replacing it.

  Local and gs:// paths are written by Orbax; any other URI scheme is staged like `Checkpointer`'s
  steps: Orbax writes a local temporary folder, which is copied to `path` with the `_STAGED`
  marker last, so `restore_tree` never reads a half-copied tree.
  """
  if not needs_staging(path):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(epath.Path(path), tree, force=True)
      ckptr.wait_until_finished()
    return
  if jax.process_count() > 1:
    raise ValueError(f"{path!r}: Orbax cannot write this scheme itself, and staging it through a local "
                     "folder works on one process only; use gs:// or a shared filesystem on several hosts")
  local = epath.Path(tempfile.mkdtemp(prefix="bgpo_tree_"))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(local / "tree", tree, force=True)
      ckptr.wait_until_finished()
    remote = epath.Path(path)
    if remote.exists():
      remote.rmtree()
    _copy_tree(local / "tree", remote)
    (remote / STAGED_MARKER).write_text("complete\n")
  finally:
    shutil.rmtree(str(local), ignore_errors=True)


def tree_exists(path: str) -> bool:
  """Whether `save_tree` finished writing `path` (for a staged scheme: its marker is there)."""
  p = epath.Path(path)
  return (p / STAGED_MARKER).exists() if needs_staging(path) else p.exists()


def restore_tree(path: str, abstract: Any) -> Any:
  """Restores a `save_tree` pytree onto the shapes, dtypes and shardings of `abstract`
  (ShapeDtypeStructs or arrays); a staged scheme is copied to a local folder first."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract)
  if not needs_staging(path):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(epath.Path(path), abstract)
  if not tree_exists(path):
    raise FileNotFoundError(f"{path}: no finished tree (its {STAGED_MARKER} marker is missing)")
  local = epath.Path(tempfile.mkdtemp(prefix="bgpo_tree_"))
  try:
    _copy_tree(path, local / "tree", skip=(STAGED_MARKER,))
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(local / "tree", abstract)
  finally:
    shutil.rmtree(str(local), ignore_errors=True)


def checkpoint_step(path: str) -> int:
  """The step of the checkpoint `path` names (a workdir or its checkpoints/ folder: the latest)."""
  return int(_find_state_dir(path).parent.name)


def _find_state_dir(path: str) -> epath.Path:
  for directory in (epath.Path(path), epath.Path(path) / "checkpoints"):
    if (directory / "state").is_dir():
      return directory / "state"
    if directory.is_dir():
      steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit()
               and (not needs_staging(directory) or (d / STAGED_MARKER).exists())]  # staged: finished only
      if steps:
        return directory / str(max(steps)) / "state"
  raise FileNotFoundError(
      f"no Orbax checkpoint found at {path!r}: expected a workdir with checkpoints/<step>/state "
      "(or give a Hugging Face directory with config.json)")


# ------------------------------------------------------------------------------ run record
# WORKDIR/run.json and WORKDIR/tokenizer/: what evaluating or continuing from the workdir needs
# besides the weights (the checkpoints hold params only): the model architecture as a Hugging
# Face config dict and a copy of the tokenizer files (or "char").
RUN_RECORD = "run.json"
TOKENIZER_DIR = "tokenizer"
# A fast tokenizer's tokenizer.json, or a byte-level BPE's vocab.json + merges.txt (Dream's), and
# the files with its special and added tokens.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def write_run_record(workdir: str, *, model_hf: dict, tokenizer_kind: str, tokenizer_path: str = "",
                     lora: dict | None = None) -> dict:
  """Writes run.json (and copies the tokenizer files into WORKDIR/tokenizer/); returns the record.
  lora: a LoRA run's adapter settings and base (train.run.LoraBase.record), recorded as "lora".

  Process 0 only (the caller decides). Works on any etils path (local or gs://)."""
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tok = {"kind": tokenizer_kind, "source": tokenizer_path}
  if tokenizer_kind == "hf":
    dst = root / TOKENIZER_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
      src = epath.Path(tokenizer_path) / name
      if src.exists():
        (dst / name).write_bytes(src.read_bytes())
    tok["path"] = TOKENIZER_DIR  # relative: the workdir stays valid when moved or copied
  record = {"model": model_hf, "tokenizer": tok}
  if lora is not None:
    record["lora"] = lora
  (root / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
  return record


def find_run_record(path: str) -> tuple[dict, str] | None:
  """(run.json's record, its workdir) for a workdir, its checkpoints/ folder or one step of it;
  None when `path` is not inside a run of this trainer (e.g. a Hugging Face directory)."""
  if not path:
    return None
  d = epath.Path(path)
  if "://" not in str(path):
    d = d.absolute()
  for _ in range(4):  # workdir / checkpoints / <step> / state
    f = d / RUN_RECORD
    if f.is_file():
      return json.loads(f.read_text()), str(d)
    if d.parent == d:
      break
    d = d.parent
  return None


# ------------------------------------------------------------------------------ run config
# WORKDIR/run_config.json: the whole config of the run's latest start, overrides applied (not
# config.json: that name marks a Hugging Face checkpoint directory, and a workdir is a valid
# init.checkpoint). `bgpo_jax.evaluate --checkpoint=WORKDIR` reads it when no --config is given.
# A resume whose config differs in a key outside RESUME_FREE_KEYS is refused: it would continue
# the old run's checkpoints and data position with other settings, silently.
RUN_CONFIG = "run_config.json"

# Keys that may change between a run's start and a resume: how long it runs (a non-constant
# learning-rate schedule then spans the new length), how often it saves, evaluates and logs,
# how much it evaluates, and where / on how many devices it runs. None changes a train step's
# math (micro-batches and the mesh change the order of float sums only).
RESUME_FREE_KEYS = frozenset({
    "total_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every",
    "eval.num_examples", "eval.batch_size", "eval.at_start", "sft.eval_every", "plot_at_end",
    "compilation_cache_dir", "distributed", "rewards.code_workers", "optim.max_nonfinite_steps",
    "mesh.shape", "rl.micro_batch_per_device", "sft.micro_batch_per_device",
})


class ResumeConfigError(ConfigError):
  """A resume with a config that differs from the run's recorded one in keys that change its math."""


def flatten_config(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1} (lists / tuples are values)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changed_keys(old: dict, new: dict, free: frozenset = RESUME_FREE_KEYS) -> list[str]:
  """Dotted keys whose value differs between two config dicts (nested, as JSON), sorted; keys in
  `free` and keys present on one side only (added or dropped by a code update) are not compared."""
  old, new = flatten_config(old), flatten_config(new)
  norm = lambda v: json.loads(json.dumps(v))  # tuples and lists alike
  return sorted(k for k in old.keys() & new.keys() if k not in free and norm(old[k]) != norm(new[k]))


def _flag_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(_flag_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return v if isinstance(v, str) else repr(v)


def check_run_config(workdir: str, config: dict, *, resuming: bool, write: bool = True) -> None:
  """On a resume, raises ResumeConfigError (one paragraph: the keys, old -> new, and the flags that
  restore the old values) when `config` differs from WORKDIR/run_config.json; otherwise records
  `config` there (`write`: process 0)."""
  path = epath.Path(workdir) / RUN_CONFIG
  if resuming and path.exists():
    old = json.loads(path.read_text())
    keys = changed_keys(old, config)
    if keys:
      o, n = flatten_config(old), flatten_config(config)
      diff = ", ".join(f"{k} {o[k]!r} -> {n[k]!r}" for k in keys)
      flags = " ".join(shlex.quote(f"--config.{k}={_flag_value(o[k])}") for k in keys)
      raise ResumeConfigError(
          f"--workdir {workdir} holds a run started with another config ({path}): {diff}. Resuming would "
          f"continue that run's checkpoints with the new values. Start the new config in a new --workdir, or "
          f"resume this run with its values: {flags}")
  if write:
    # Through a temporary file and a rename: a run killed mid-write never leaves a truncated record.
    tmp = path.parent / f".{RUN_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_run_config(workdir: str) -> dict | None:
  """The config dict WORKDIR/run_config.json records (None when there is none)."""
  path = epath.Path(workdir) / RUN_CONFIG
  return json.loads(path.read_text()) if path.is_file() else None


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a step folder (finished or not): a start there is a resume."""
  d = epath.Path(workdir) / "checkpoints"
  return d.is_dir() and any(c.name.isdigit() for c in d.iterdir())


def ensure_workdir(workdir: str) -> None:
  """Creates the run folder; RunError (one line) when `workdir` is an existing file or cannot be made."""
  p = epath.Path(workdir)
  if p.exists() and not p.is_dir():
    raise RunError(f"--workdir {workdir} is an existing file, not a folder; pass a folder path (it is created "
                   "when missing)")
  try:
    p.mkdir(parents=True, exist_ok=True)  # gs://, s3://, ... too
  except OSError as e:
    raise RunError(f"--workdir {workdir}: cannot create the folder ({describe_error(e)}); pass a folder path "
                   "you can write to") from None


STAGED_MARKER = "_STAGED"


def needs_staging(path) -> bool:
  """True for a URI that Orbax/TensorStore cannot write directly (anything but local and gs://)."""
  path = str(path)
  return "://" in path and not path.startswith("gs://")


def _latest_staged(directory: epath.Path) -> int | None:
  if not directory.exists():
    return None
  steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / STAGED_MARKER).exists()]
  return max(steps) if steps else None


def copy_tree(src, dst, skip: tuple[str, ...] = ()) -> None:
  """Copies a folder file by file through epath, streaming (between any two epath filesystems,
  e.g. a bucket and a local folder)."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.name in skip:
      continue
    if child.is_dir():
      copy_tree(child, dst / child.name, skip)
    else:
      with child.open("rb") as r, (dst / child.name).open("wb") as w:
        shutil.copyfileobj(r, w, 64 * 2**20)


_copy_tree = copy_tree
