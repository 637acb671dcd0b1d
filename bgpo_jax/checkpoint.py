"""Orbax checkpoints of a run: train state, host state (RNG, data position) and the config.

Layout: WORKDIR/checkpoints/<step>/{state, host}. Orbax writes each save into a temporary
directory and renames it only once complete, so a save killed half way leaves the earlier
checkpoints intact (and the half-written one is ignored on restore).
Kept: the last `keep` checkpoints plus the best one by `best_metric` (when evaluated).

Paths: local, or any `etils.epath` URI. Orbax writes local paths and gs:// itself (TensorStore
has a GCS driver; its other array paths must be absolute local ones). For any other URI scheme
(s3://, az://, hf://, ...), one process stages: Orbax writes a local temporary folder, each
finished step is copied to WORKDIR/checkpoints/<step> through epath with a `_STAGED` marker
written last, and resume copies the newest marked step back first.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from typing import Any

import jax
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class Checkpointer:
  """Saves asynchronously every `checkpoint_every` steps and resumes from the latest step."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str = "eval/accuracy",
               async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.best_metric = best_metric
    self.staged = needs_staging(workdir)
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
    """Starts a save (returns at once when asynchronous). `host` is JSON: rng, data position, config."""
    m = None
    if metrics and self.best_metric in metrics:
      m = {self.best_metric: float(metrics[self.best_metric])}
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
        metrics=m,
        force=True,
    )
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
      if self.staged:
        self._upload(step)
    return saved

  def _upload(self, step: int) -> None:
    """Staging: copies the finished step out (marker last) and mirrors the manager's deletions."""
    self.manager.wait_until_finished()
    _copy_tree(self._local / str(step), self.directory / str(step))
    (self.directory / str(step) / STAGED_MARKER).write_text("complete\n")
    kept = set(self.manager.all_steps())
    for old in sorted(self._uploaded - kept):
      if (self.directory / str(old)).exists():
        (self.directory / str(old)).rmtree()
    self._uploaded = (self._uploaded & kept) | {step}

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` onto the shardings/dtypes of `abstract_state` (ShapeDtypeStructs or arrays)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
    return out.state, dict(out.host)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self.staged:  # every finished step is in the workdir already
      shutil.rmtree(str(self._local), ignore_errors=True)


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


def is_orbax_checkpoint(path: str) -> bool:
  try:
    _find_state_dir(path)
    return True
  except FileNotFoundError:
    return False


# ------------------------------------------------------------------------------ run record
# WORKDIR/run.json and WORKDIR/tokenizer/: what evaluating or continuing from the workdir needs
# besides the weights (the checkpoints hold params only): the model architecture as a Hugging
# Face config dict and a copy of the tokenizer files (or "char").
RUN_RECORD = "run.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_run_record(workdir: str, *, model_hf: dict, tokenizer_kind: str, tokenizer_path: str = "") -> dict:
  """Writes run.json (and copies the tokenizer files into WORKDIR/tokenizer/); returns the record.

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
