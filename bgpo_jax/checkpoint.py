"""Orbax checkpoints of a run: train state, host state (RNG, data position) and the config.

Layout: WORKDIR/checkpoints/<step>/{state, host}. Orbax writes each save into a temporary
directory and renames it only once complete, so a save killed half way leaves the earlier
checkpoints intact (and the half-written one is ignored on restore).
Kept: the last `keep` checkpoints plus the best one by `best_metric` (when evaluated).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class Checkpointer:
  """Saves asynchronously every `checkpoint_every` steps and resumes from the latest step."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str = "eval/accuracy",
               async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints") if "://" not in workdir else workdir.rstrip("/") + "/checkpoints"
    self.best_metric = best_metric
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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "host"))

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
    return saved

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


def restore_params(path: str, abstract_params: Any) -> Any:
  """Parameters only, from an Orbax checkpoint written by this trainer (the optimizer stays on disk).

  `path` is a run's workdir, its checkpoints/ folder, or one step folder in it; the latest step wins.
  `abstract_params` gives shapes, dtypes and (optionally) target shardings.
  """
  state_dir = _find_state_dir(path)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_params)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract)
  out = ocp.PyTreeCheckpointer().restore(
      state_dir,
      args=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": restore_args},
                                  partial_restore=True))
  return out["params"]


def _find_state_dir(path: str) -> str:
  for directory in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(directory, "state")):
      return os.path.join(directory, "state")
    if os.path.isdir(directory):
      steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
      if steps:
        return os.path.join(directory, str(max(steps)), "state")
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
  from etils import epath

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
  if not path or "://" in path:
    return None
  d = os.path.abspath(path)
  for _ in range(4):  # workdir / checkpoints / <step> / state
    f = os.path.join(d, RUN_RECORD)
    if os.path.isfile(f):
      with open(f) as fh:
        return json.load(fh), d
    d = os.path.dirname(d)
  return None
