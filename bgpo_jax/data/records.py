"""Reading task rows from local parquet / JSONL files into one uniform example schema.

Every example, whatever the task or backend (in-memory list or TFDS array_record), is a flat
dict of plain values:

  task:         str  a data task of bgpo_jax.tasks.registry (the builder / instruction key)
  data_source:  str  the row's own data_source (e.g. "math500" for task "math")
  split:        str  "train" | "test"
  index:        int  the row's extra_info.index when given, else its row number in its file
  prompt_json:  str  JSON list of chat messages [{"role", "content"}, ...]
  ground_truth: str  final answer (gsm8k, math, countdown target, sudoku solution), HumanEval
                     test code defining check(candidate), or a JSON list of test statements
                     (mbpp, user code sets)
  extra_json:   str  JSON dict: the row's extra_info with countdown "numbers" parsed to a list of
                     ints; code tasks add "test_format" ("check" | "asserts") and, for "check",
                     "entry_point"; generated puzzles add "solution"

What differs between tasks (file stems, the answer check, whether the truth is test code)
comes from the task's spec (bgpo_jax.tasks.registry). Bad rows are skipped, counted per reason
and the first few are reported (`RowStats`); a file that cannot be read raises `DataFileError`
naming the path.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from etils import epath

from bgpo_jax.tasks import registry

logger = logging.getLogger(__name__)

EXAMPLE_FIELDS = ("task", "data_source", "split", "index", "prompt_json", "ground_truth",
                  "extra_json")
SPLITS = ("train", "test")
_EXTS = (".parquet", ".jsonl")
_ROLES = ("system", "user", "assistant")


class DataFileError(ValueError):
  """A whole data file is missing or unreadable."""


class BadRow(ValueError):
  """One row fails validation; the message is the reason (counted in RowStats)."""


@dataclasses.dataclass
class RowStats:
  """What reading one (task, split) kept and skipped; `examples` holds the first few bad rows."""
  source: str
  total: int = 0
  kept: int = 0
  bad: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)
  max_examples: int = 5

  def add_bad(self, where: str, reason: str, row: Any) -> None:
    self.bad += 1
    self.reasons[reason.split(":")[0]] += 1
    if len(self.examples) < self.max_examples:
      self.examples.append({"where": where, "reason": reason, "row": repr(row)[:200]})

  def report(self) -> None:
    """logging.warning with the counts and first examples when any row was skipped."""
    if self.bad:
      logger.warning(
          "%s: skipped %d of %d rows (%s); first %d: %s", self.source, self.bad, self.total,
          dict(self.reasons), len(self.examples),
          "; ".join(f"{e['where']}: {e['reason']}" for e in self.examples))

  def to_dict(self) -> dict:
    return {"source": self.source, "total": self.total, "kept": self.kept, "bad": self.bad,
            "reasons": dict(self.reasons), "examples": list(self.examples)}


# ----------------------------------------------------------------------------- files


def find_task_files(source_dir: str | Path, task: str, split: str) -> list[Path]:
  """Files for (task, split) in source_dir: <split>_<stem>.{parquet,jsonl} or <split>_<stem>-*.

  Stems are the task spec's (TaskSpec.file_stems), the first with files wins: the layout of
  shared/datasets is <split>_<stem>[-suffix].{parquet,jsonl}, e.g. train_countdown-n20000.parquet.
  Returns [] when none match (the caller decides whether a missing split is an error).
  """
  spec = check_task(task)
  source_dir = epath.Path(source_dir)  # epath: a gs:// data folder too
  if not source_dir.is_dir():
    raise DataFileError(f"source_dir {source_dir} is not a directory; point it at a folder "
                        f"holding files like train_{task}.parquet")
  for stem in spec.file_stems(split):
    # The stem must end at '.', '-' or '_' so "math" does not pick up "math500".
    pat = re.compile(rf"^{split}_{re.escape(stem)}([-_.].*)?$")
    hits = sorted(p for p in source_dir.iterdir()
                  if p.is_file() and p.suffix in _EXTS and pat.match(p.stem))
    if hits:
      return hits
  return []


def read_rows(path: str | Path) -> list[dict]:
  """All rows of one parquet or JSONL file as python dicts; DataFileError names the path.

  A JSONL line that is not JSON or not UTF-8, or a parquet row with a string cell that is not
  UTF-8, comes back as a marker that `normalize_row` rejects: a bad row, not a bad file."""
  path = epath.Path(path)  # epath: a gs:// file too
  if not path.is_file():
    raise DataFileError(f"data file {path} does not exist")
  if path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
      with path.open("rb") as f:
        return _table_rows(pq.read_table(f))
    except Exception as e:  # pyarrow raises several types for corrupt files
      raise DataFileError(f"cannot read parquet file {path}: {type(e).__name__}: {e}") from e
  if path.suffix in (".jsonl", ".json"):
    rows = []
    try:
      with path.open("rb") as f:
        for line_number, raw in enumerate(_lines(f), start=1):
          raw = raw.strip()
          if not raw:
            continue
          try:
            line = raw.decode("utf-8")
          except UnicodeDecodeError as e:
            rows.append(_Unparsed(raw.decode("utf-8", "backslashreplace"),
                                  f"line {line_number}: invalid UTF-8 at byte {e.start}: {e.reason}",
                                  kind="utf8"))
            continue
          # A non-JSON line is a bad row, not a bad file: keep it as a marker for RowStats.
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            rows.append(_Unparsed(line, str(e)))
    except OSError as e:
      raise DataFileError(f"cannot read JSONL file {path}: {type(e).__name__}: {e}") from e
    if rows and all(isinstance(r, _Unparsed) for r in rows):
      raise DataFileError(f"no line of {path} parses as JSON (first error: {rows[0].kind}: "
                          f"{rows[0].error}); expected one UTF-8 JSON object per line")
    return rows
  raise DataFileError(f"data file {path} has unsupported suffix {path.suffix!r}; "
                      "use .parquet or .jsonl")


def _lines(f) -> Iterable[bytes]:
  """The lines of a binary file, split at LF, CRLF or a lone CR (universal newlines, as text
  mode reads them; a JSON string never holds a raw CR)."""
  for raw in f:  # a binary file iterates over LF-terminated lines
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    yield from raw.split(b"\r")


def _table_rows(table) -> list:
  """A pyarrow table as row dicts; a row with a string cell that is not UTF-8 becomes an
  `_Unparsed` naming the column (the other rows are kept)."""
  try:
    return table.to_pylist()
  except UnicodeDecodeError:
    pass
  names = table.column_names
  columns: dict[str, list] = {}
  bad: dict[int, str] = {}  # row -> the first column whose cell does not decode
  for name in names:
    column = table.column(name)
    try:
      columns[name] = column.to_pylist()
      continue
    except UnicodeDecodeError:
      pass
    cells = []
    for i in range(len(column)):
      try:
        cells.append(column[i].as_py())
      except UnicodeDecodeError as e:
        cells.append(None)
        bad.setdefault(i, f"column {name!r}: invalid UTF-8 at byte {e.start}: {e.reason}")
    columns[name] = cells
  rows = []
  for i in range(table.num_rows):
    row = {name: columns[name][i] for name in names}
    rows.append(_Unparsed(repr(row)[:200], bad[i], kind="utf8") if i in bad else row)
  return rows


@dataclasses.dataclass
class _Unparsed:
  """A row that could not be read: `kind` is the reason counted in RowStats (json / utf8)."""
  text: str
  error: str
  kind: str = "json"


# ----------------------------------------------------------------------------- rows


def check_task(task: str) -> registry.TaskSpec:
  """The spec of a data task (one whose rows files or generators hold); ValueError otherwise."""
  spec = registry.find(task)
  if spec is None or not spec.is_data_task:
    raise ValueError(f"unknown task {task!r}; expected one of {registry.names('data')}")
  return spec


def _messages(prompt: Any) -> list[dict]:
  """Validated chat messages from a row's prompt (a message list, or a plain string)."""
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  if prompt is None or not hasattr(prompt, "__len__") or isinstance(prompt, dict):
    raise BadRow(f"prompt: expected a list of messages, got {type(prompt).__name__}")
  msgs = []
  for m in prompt:
    if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(
        m.get("content"), str):
      raise BadRow(f"prompt: bad message {str(m)[:80]}")
    msgs.append({"role": m["role"], "content": m["content"]})
  users = [m for m in msgs if m["role"] == "user"]
  if not users or not users[-1]["content"].strip():
    raise BadRow("prompt: empty (no non-empty user message)")
  return msgs


def parse_number(text: str) -> float:
  """A numeric answer (commas allowed) as a finite float; BadRow otherwise."""
  try:
    v = float(text.replace(",", "").strip())
  except (ValueError, AttributeError):
    raise BadRow(f"ground_truth: not a number: {str(text)[:40]!r}") from None
  if not math.isfinite(v):
    raise BadRow(f"ground_truth: not finite: {text!r}")
  return v


def parse_numbers(value: Any) -> list[int]:
  """Countdown numbers from a list or a string like "[30, 100, 93]" (BadRow if unparseable)."""
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise BadRow(f"numbers: cannot parse {value[:40]!r}") from None
  if not isinstance(value, (list, tuple)) or not value:
    raise BadRow(f"numbers: expected a non-empty list, got {str(value)[:40]!r}")
  out = []
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
      raise BadRow(f"numbers: {v!r} is not an integer")
    out.append(int(v))
  return out


_DEF_RE = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.M)


def _entry_point(messages: list[dict]) -> str | None:
  """HumanEval entry point: the last top-level def of the last user turn (helpers come first)."""
  users = [m["content"] for m in messages if m["role"] == "user"]
  names = _DEF_RE.findall(users[-1]) if users else []
  return names[-1] if names else None


def _code_ground_truth(tests: Any, messages: list[dict], extra: dict, *,
                       allow_script: bool) -> str:
  """Ground truth + test_format for code rows: check(candidate) code or a JSON statement list.

  allow_script: a string that is not JSON is one test block (user {prompt, tests} rows); in
  the reward_model layout (mbpp) it must be a JSON list, anything else is a bad row.
  """
  if isinstance(tests, str) and not tests.strip():
    raise BadRow("ground_truth: empty tests")
  if isinstance(tests, str) and "def check(" in tests:
    extra["test_format"] = "check"
    extra.setdefault("entry_point", _entry_point(messages))
    if not extra["entry_point"]:
      raise BadRow("ground_truth: check(candidate) tests but no entry point (no `def` in prompt)")
    return tests
  if isinstance(tests, str):
    try:
      parsed = json.loads(tests)
    except json.JSONDecodeError:
      if not allow_script:
        raise BadRow(f"ground_truth: not a JSON list of tests: {tests[:60]!r}") from None
      parsed = [tests]  # a plain test script: one statement block
    tests = parsed
  if (not isinstance(tests, (list, tuple)) or not tests
      or not all(isinstance(t, str) and t.strip() for t in tests)):
    raise BadRow(f"ground_truth: expected a non-empty JSON list of test strings, got "
                 f"{str(tests)[:60]!r}")
  extra["test_format"] = "asserts"
  return json.dumps(list(tests))


def _ground_truth(row: dict, spec: registry.TaskSpec, extra: dict) -> tuple[Any, bool]:
  """(the row's raw ground truth, whether it came from the user code layout's `tests`)."""
  if "reward_model" in row:
    rm = row["reward_model"]
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
      raise BadRow("missing: reward_model.ground_truth")
    if rm.get("style") is not None:
      extra.setdefault("style", rm["style"])
    return rm["ground_truth"], False
  if "tests" in row and spec.code:
    if row.get("entry_point"):
      extra["entry_point"] = str(row["entry_point"])
    return row["tests"], True
  if "ground_truth" in row:
    return row["ground_truth"], False
  raise BadRow("missing: reward_model.ground_truth" + (" or tests" if spec.code else ""))


def normalize_row(row: Any, task: str, split: str, row_number: int) -> dict:
  """One raw row -> uniform example dict (see module docstring); raises BadRow with the reason.

  Accepts the shared/datasets layout {data_source, prompt, reward_model{ground_truth},
  extra_info} and, for code tasks, the user layout {prompt, tests[, entry_point]}. The task's
  spec checks the answer (TaskSpec.check_row); a code task's tests are checked here.
  """
  spec = check_task(task)
  if isinstance(row, _Unparsed):
    raise BadRow(f"{row.kind}: {row.error}")
  if not isinstance(row, dict):
    raise BadRow(f"row: expected an object, got {type(row).__name__}")
  if "prompt" not in row or row["prompt"] is None:
    raise BadRow("missing: prompt")
  messages = _messages(row["prompt"])
  if not isinstance(row.get("extra_info") or {}, dict):
    raise BadRow("extra_info: not an object")
  extra = dict(row.get("extra_info") or {})
  gt, from_tests = _ground_truth(row, spec, extra)
  if spec.code:
    gt = _code_ground_truth(gt, messages, extra, allow_script=from_tests)
  else:
    if not isinstance(gt, (str, int, float)) or isinstance(gt, bool) or not str(gt).strip():
      raise BadRow("ground_truth: empty")
    gt = str(gt).strip()
    if spec.check_row is not None:
      extra = spec.check_row(gt, extra)
  index = extra.get("index")
  if isinstance(index, bool) or not isinstance(index, int):
    index = row_number
  return {
      "task": task,
      "data_source": str(row.get("data_source") or task),
      "split": split,
      "index": int(index),
      "prompt_json": json.dumps(messages, ensure_ascii=False),
      "ground_truth": gt,
      "extra_json": json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str),
  }


def normalize_rows(rows: Iterable[Any], task: str, split: str, *, where: str = "rows",
                   stats: RowStats | None = None) -> tuple[list[dict], RowStats]:
  """Normalizes rows, skipping bad ones into `stats` (created when None; not reported here)."""
  check_task(task)
  stats = stats or RowStats(source=f"{task}/{split}")
  out = []
  for i, row in enumerate(rows):
    stats.total += 1
    try:
      out.append(normalize_row(row, task, split, i))
      stats.kept += 1
    except BadRow as e:
      stats.add_bad(f"{where}:{i}", str(e), row)
  return out, stats


def load_examples(task: str, split: str, *, source_dir: str | Path | None = None,
                  files: Sequence[str | Path] | None = None,
                  max_bad_examples: int = 5) -> tuple[list[dict], RowStats]:
  """Reads and normalizes every row of (task, split) from `files` or found in `source_dir`.

  Returns (examples in file order, stats); bad rows are skipped and logged with a warning.
  Raises DataFileError when no file matches or a file cannot be read.
  """
  spec = check_task(task)
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  if files is None:
    if source_dir is None:
      raise ValueError(f"load_examples({task!r}, {split!r}) needs source_dir or files")
    files = find_task_files(source_dir, task, split)
    if not files:
      raise DataFileError(
          f"no {split} files for task {task!r} in {source_dir}: expected "
          f"{split}_{spec.file_stems(split)[0]}[-*].parquet or .jsonl")
  stats = RowStats(source=f"{task}/{split}", max_examples=max_bad_examples)
  examples: list[dict] = []
  for path in files:
    rows = read_rows(path)
    got, _ = normalize_rows(rows, task, split, where=epath.Path(path).name, stats=stats)
    examples.extend(got)
  stats.report()
  return examples, stats


def decode_example(ex: dict) -> dict:
  """Uniform example (str fields, possibly bytes from TFDS) -> dict with parsed messages/extra.

  Returns {task, data_source, split, index, messages: list[dict], ground_truth: str,
  extra: dict}.
  """
  def s(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return {
      "task": s(ex["task"]), "data_source": s(ex["data_source"]), "split": s(ex["split"]),
      "index": int(ex["index"]), "messages": json.loads(s(ex["prompt_json"])),
      "ground_truth": s(ex["ground_truth"]), "extra": json.loads(s(ex["extra_json"])),
  }
