"""TFDS builder (array_record) for every task, from local files or the procedural generators.

Building and reading need no TensorFlow: GeneratorBasedBuilder writes array_record shards
with its pure-Python writer, and `as_data_source()` gives random access over them.

    builder = build_tfds("gsm8k", data_dir="~/tfds", source_dir="/path/datasets")
    source, stats = tfds_source("gsm8k", "train", data_dir=..., source_dir=...)
    builder = build_tfds("code", data_dir=..., files={"train": ["my_code.jsonl"]})
    builder = build_tfds("sudoku", data_dir=..., generate={"train": 20000, "test": 500,
                                                           "seed": 0, "min_blanks": 8})

One builder class (`BgpoPrompts`, name "bgpo_prompts"); each build is a config named
<task>_<fingerprint>, where the fingerprint hashes the task, the schema version, the
CONTENTS of the source files and the generator settings: a changed file builds a new
dataset instead of silently reusing a stale one. Layout:
<data_dir>/bgpo_prompts/<task>_<fingerprint>/1.0.0/bgpo_prompts-<split>.array_record-*.
Examples keep file order (disable_shuffling), so a TFDS source and the in-memory
records.load_examples list hold the same examples at the same indices. Bad-row stats are
saved in the dataset's metadata.json (builder.info.metadata["row_stats"][split]).

Concurrency: build once (e.g. on process 0, then barrier) before several hosts read a
shared data_dir; TFDS writes to a temporary folder and renames it, but two concurrent
writers of the same config race.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bgpo_jax.data import procedural, records
from bgpo_jax.data.dataset import TfdsSource

SCHEMA_VERSION = "1"


@dataclasses.dataclass(eq=False)
class TaskPromptsConfig(tfds.core.BuilderConfig):
  """Which task and where its rows come from (one of files / generate)."""
  task: str = ""
  files: tuple = ()  # ((split, (path, ...)), ...)
  generate: tuple = ()  # sorted (key, value) items: split counts, seed, knobs


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:  # epath
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _resolve(p) -> Path | epath.Path:
  """Local paths made absolute; URIs (gs://...) kept as they are."""
  return epath.Path(p) if "://" in str(p) else Path(p).resolve()


def _resolve_files(task: str, source_dir: str | Path | None,
                   files: Mapping[str, Sequence[str | Path]] | None) -> dict[str, list[Path]]:
  """{split: [paths]} from explicit files or the source_dir layout (missing splits left out)."""
  if files is not None:
    out = {}
    for split, paths in files.items():
      if split not in records.SPLITS:
        raise ValueError(f"files has split {split!r}; use {records.SPLITS}")
      paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
      for p in paths:
        if not epath.Path(p).is_file():
          raise records.DataFileError(f"data file {p} does not exist")
      out[split] = [_resolve(p) for p in paths]
    return out
  if source_dir is None:
    raise ValueError(f"task {task!r} needs source_dir, files or generate")
  out = {s: records.find_task_files(source_dir, task, s) for s in records.SPLITS}
  out = {s: [_resolve(p) for p in ps] for s, ps in out.items() if ps}
  if not out:
    raise records.DataFileError(
        f"no files for task {task!r} in {source_dir}: expected train_{task}*.parquet / "
        f"test_{task}*.parquet (or .jsonl)")
  return out


def make_config(task: str, *, source_dir: str | Path | None = None,
                files: Mapping[str, Sequence[str | Path]] | None = None,
                generate: Mapping[str, Any] | None = None) -> TaskPromptsConfig:
  """Builder config whose name fingerprints the task, file contents and generator settings.

  generate: {"train": n, "test": n, "seed": s, **knobs of procedural.generate_<task>}.
  """
  records.check_task(task)
  fp: dict[str, Any] = {"task": task, "schema": SCHEMA_VERSION}
  if generate is not None:
    procedural.generator(task)  # a task without one is an error naming those with one
    if not any(generate.get(s) for s in records.SPLITS):
      raise ValueError(f"generate {dict(generate)} asks for no examples; set 'train' and/or "
                       "'test' counts")
    gen = tuple(sorted(generate.items()))
    fp["generate"] = gen
    file_items: tuple = ()
  else:
    resolved = _resolve_files(task, source_dir, files)
    file_items = tuple((s, tuple(str(p) for p in ps)) for s, ps in sorted(resolved.items()))
    fp["files"] = [(s, [_sha256_file(p) for p in ps]) for s, ps in file_items]
    gen = ()
  digest = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()
  return TaskPromptsConfig(name=f"{task}_{digest[:12]}", description=f"bgpo_jax {task} prompts",
                           task=task, files=file_items, generate=gen)


@contextlib.contextmanager
def _quiet_custom_config_warning():
  """Drops TFDS's "Using custom data configuration: <whole config>" warning: every config here
  is custom by design (named by its fingerprint), so it would print on every load."""
  def keep(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")
  log = logging.getLogger("absl")
  log.addFilter(keep)
  try:
    yield
  finally:
    log.removeFilter(keep)


class BgpoPrompts(tfds.core.GeneratorBasedBuilder):
  """Uniform prompt examples (records.EXAMPLE_FIELDS) for one task; see module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Uniform prompt schema."}
  # TFDS only reads code_path to find a checksums file for downloads (this builder has none).
  # Computing it for a builder defined inside a package touches `importlib_resources`, which
  # tensorflow-datasets 4.9.x uses but declares only for Python < 3.9 (tensorflow/datasets
  # issue 11212), so prepare() fails with ModuleNotFoundError unless it is installed.
  code_path = None

  def __init__(self, *, config: TaskPromptsConfig, data_dir: str | Path, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self.row_stats: dict[str, dict] = {}
    with _quiet_custom_config_warning():
      super().__init__(config=config, data_dir=str(data_dir), **kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)" before
  # and "... downloaded and prepared" after every build straight to stdout: nothing here downloads,
  # and no size is known, so those lines only mislead. Kept when absl's logger shows INFO
  # (`--verbose` of bgpo_jax.main / bgpo_jax.evaluate).
  def _log_download_bytes(self) -> None:
    if logging.getLogger("absl").isEnabledFor(logging.INFO):
      super()._log_download_bytes()

  def _log_download_done(self) -> None:
    if logging.getLogger("absl").isEnabledFor(logging.INFO):
      super()._log_download_done()

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="Prompts with ground truth for verifiable-reward RL (bgpo_jax).",
        features=tfds.features.FeaturesDict({
            "task": text, "data_source": text, "split": text, "index": np.int64,
            "prompt_json": text, "ground_truth": text, "extra_json": text,
        }),
        disable_shuffling=True,  # keep file order: same indices as the in-memory path
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: Any) -> dict:
    del dl_manager  # everything is local
    cfg: TaskPromptsConfig = self.builder_config
    if cfg.generate:
      gen = dict(cfg.generate)
      return {s: self._generate_examples(s) for s in records.SPLITS if gen.get(s)}
    return {s: self._generate_examples(s) for s, _ in cfg.files}

  def _generate_examples(self, split: str):
    cfg: TaskPromptsConfig = self.builder_config
    if cfg.generate:
      gen = dict(cfg.generate)
      n = int(gen.pop(split))
      for s in records.SPLITS:
        gen.pop(s, None)
      examples = procedural.generate(cfg.task, n, split=split, **gen)
      stats = records.RowStats(source=f"{cfg.task}/{split}", total=n, kept=n).to_dict()
    else:
      paths = dict(cfg.files)[split]
      examples, row_stats = records.load_examples(cfg.task, split, files=paths)
      stats = row_stats.to_dict()
    self.row_stats[split] = stats
    self.info.metadata.setdefault("row_stats", {})[split] = stats
    for k, ex in enumerate(examples):
      yield k, ex


def build_tfds(task: str, *, data_dir: str | Path, source_dir: str | Path | None = None,
               files: Mapping[str, Sequence[str | Path]] | None = None,
               generate: Mapping[str, Any] | None = None) -> BgpoPrompts:
  """Prepares (or reuses) the array_record dataset for task; returns the prepared builder.

  Exactly one of source_dir / files / generate is used (files over source_dir).
  """
  config = make_config(task, source_dir=source_dir, files=files, generate=generate)
  if not sys.stderr.isatty():
    # TFDS's tqdm bars redraw with carriage returns and cursor-up escapes: in a log file or a
    # pipe each redraw is kept, as garbage. A terminal still gets them.
    tfds.disable_progress_bar()
  builder = BgpoPrompts(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_dir=str(epath.Path(data_dir) / "downloads"),  # epath: gs:// stays gs://
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def row_stats(builder: tfds.core.DatasetBuilder, split: str) -> dict:
  """Bad-row stats recorded when the split was built (also after reloading from disk)."""
  md = builder.info.metadata or {}
  return dict(md.get("row_stats", {}).get(split, {}))


def tfds_source(task: str, split: str, *, data_dir: str | Path, **build_kwargs
                ) -> tuple[TfdsSource, dict]:
  """(random-access source over the split, its bad-row stats); builds it when needed."""
  builder = build_tfds(task, data_dir=data_dir, **build_kwargs)
  if split not in builder.info.splits:
    raise ValueError(f"task {task!r} has no {split!r} split here; built splits: "
                     f"{sorted(builder.info.splits)}")
  return TfdsSource(builder.as_data_source(split=split)), row_stats(builder, split)


def load_prepared(builder_dir: str | Path, split: str) -> TfdsSource:
  """Source over an already built dataset folder (…/bgpo_prompts/<config>/1.0.0), no builder
  code or source files needed (tfds.builder_from_directory)."""
  path = epath.Path(builder_dir)  # epath: a gs:// dataset folder too
  if not (path / "dataset_info.json").is_file():
    raise records.DataFileError(f"{path} is not a prepared TFDS dataset folder (no "
                                "dataset_info.json); build it with build_tfds first")
  builder = tfds.builder_from_directory(str(path))
  return TfdsSource(builder.as_data_source(split=split))
