r"""Task data in one command: fetch the public sources of the tasks and write the files the loaders read.

  python -m bgpo_jax.data.prepare --out data                          # every task
  python -m bgpo_jax.data.prepare --out data --tasks gsm8k,math       # what configs/math.py reads
  python -m bgpo_jax.data.prepare --out data --from raw/              # convert local raw files
  python -m bgpo_jax.main --config=configs/math.py ... --config.task.data_dir=data

Why: the task configs read `task.data_dir`, a folder of `<split>_<name>[-suffix].parquet` files
(docs/tasks.md, "Files"); this builds that folder from the sources the d1 and BGPO papers used,
with the prompts in the layout the reference files hold, so a fresh clone can train and evaluate.

Output, one parquet file per (task, split), one row per prompt:

  file                                   rows (default)  source
  train_gsm8k.parquet / test_gsm8k       7473 / 1319     openai/gsm8k, config main (MIT)
  train_math.parquet                     12000           ankner/math-500, train: d1's MATH training
                                                         set (MATH train+test minus MATH-500; MIT)
  test_math500.parquet                   500             HuggingFaceH4/MATH-500, test (MIT)
  train_countdown-n<rows>.parquet        20000           Jiayi-Pan/Countdown-Tasks-3to4, train, the
                                                         first rows in source order (3 and 4 numbers)
  test_countdown.parquet                 256             d1's dataset/countdown_cd3_test.jsonl
  train_sudoku-n<rows>.parquet           20000           d1's dataset/4x4_sudoku_unique_puzzles.csv,
                                                         the first rows
  test_sudoku.parquet                    500             d1's dataset/4x4_test_sudoku.csv
  test_humaneval.parquet                 164             openai/openai_humaneval, test (MIT)
  test_mbpp.parquet                      500             google-research-datasets/mbpp, config full,
                                                         test (CC BY 4.0)

The d1 files come from github.com/dllm-reasoning/d1 at a pinned commit (Apache-2.0, the
repository's license); the Hugging Face sources through `datasets.load_dataset` (the optional
extra: pip install -e ".[data]"). `--countdown-train-size` / `--sudoku-train-size` (0 = all)
set the training sizes; the file name carries the rows written (`-n20000`). The countdown training
file, like the reference file train_countdown-n20000.parquet, holds the source's first rows, 3- and
4-number tasks alike (about half each); `--countdown-three-only` keeps only the 3-number ones, as
d1's own loader does (its test set has 3 numbers either way).

Columns (pyarrow types; struct fields in this order):

  data_source   string   gsm8k | math | math500 | countdown | sudoku | humaneval | mbpp
  prompt        list<struct<content: string, role: string>>  chat messages, the last user turn
                is the question. gsm8k / math / math500: the question alone (the task's
                instruction is added at load time); countdown / sudoku: d1's full prompt with its
                answer format; humaneval: "Complete the following python code:\n" + the stub;
                mbpp: three few-shot user / assistant turns (MBPP tasks 2, 3, 4), the task, and
                an assistant prefill "[BEGIN]\n".
  reward_model  struct<ground_truth: string, style: string>  style "rule"; ground_truth: the
                final answer (gsm8k: after "####", commas kept; math: the `answer` field, or the
                last \boxed{} of `solution`), the countdown target, the sudoku solution,
                HumanEval's test code defining check(candidate), or MBPP's assert lines as a
                JSON list.
  extra_info    struct<index: int64, [numbers | puzzle | test_setup_code: string,] split: string,
                task: string>  index = row number in the file; task = "math" | "code";
                numbers (countdown) like "[30, 100, 93]"; puzzle (sudoku) 16 digits, 0 = empty;
                test_setup_code (mbpp) only when some row of the file has one (null elsewhere).

Every converted row is also checked with the loader's own row check (records.normalize_row), so
every written row loads. Rows that cannot be used are skipped, counted per reason and the first
of each reason printed, never dropped silently (with `--countdown-three-only`, the 4-number tasks
count as "filtered"). A HumanEval record whose entry point is not the stub's last top-level `def`
(the loader's rule) is skipped rather than graded against the wrong function.

`--from DIR` converts local raw files instead of downloading: the source's records as the
source yields them, one file per (task, split) named `<raw name>.jsonl`, `.parquet` or `.csv`:

  gsm8k_train, gsm8k_test   {question, answer}                  openai/gsm8k records
  math_train                {problem, answer} or {problem, solution}
  math500_test              {problem, answer}
  countdown_train           {nums, target}                      Countdown-Tasks-3to4 records
  countdown_test            {input: "30,100,93", output: "23"}  d1's jsonl (or {nums, target})
  sudoku_train, sudoku_test {Puzzle, Solution}                  d1's csv (or puzzle / solution)
  humaneval_test            {prompt, test, entry_point}
  mbpp_test                 {text, test_list[, test_setup_code]}

Existing output files are never replaced without `--force`; with it, every file the loader would
read for that (split, task) (`<split>_<name>.*`, `<split>_<name>-*`) is removed first, so a stale
`train_countdown-n5000.parquet` is not read together with the new one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import re
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from bgpo_jax.data import records
from bgpo_jax.rewards.extract import last_boxed

TASKS = ("gsm8k", "math", "countdown", "sudoku", "humaneval", "mbpp")
RAW_EXTS = (".jsonl", ".parquet", ".csv")
_D1_COMMIT = "837888f22c21a5da91a0af2b0d7b19e81d9b47ec"
_D1_URL = f"https://raw.githubusercontent.com/dllm-reasoning/d1/{_D1_COMMIT}/dataset/"
_D1_LICENSE = "Apache-2.0 (license of the d1 repository that ships the file)"
_INSTALL = 'the Hugging Face sources need the `datasets` package: pip install datasets (or pip install -e ".[data]")'

# ----------------------------------------------------------------------------- prompts

# d1's answer-format preamble (countdown) and its full sudoku prompt, as the reference files hold.
_FORMAT = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n"
_COUNTDOWN = (
    _FORMAT + "Using only the numbers {numbers}, create an arithmetic expression that evaluates to exactly "
    "{target}. You must use all numbers from the list, and each number must be used exactly once. You may use the "
    "operations +, -, *, and / as needed. After reasoning, provide only your final expression inside "
    "<answer></answer> tags without including an equals sign or the target number. For example, if the numbers "
    "are [2, 3, 4] and the target is 5, a valid answer is: <answer>\n2*4-3\n</answer>")
_SUDOKU = (
    "Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- Fill empty cells with digits "
    "1-4\n- Each row must contain digits 1-4 exactly once\n- Each column must contain digits 1-4 exactly once\n"
    "- Each 2x2 box must contain digits 1-4 exactly once\n\nImportant: Your solution must be a COMPLETE "
    "16-character string with only the digits 1-4, representing your final solved grid.\n\nRespond in this exact "
    "format:\n<reasoning>\nYour step-by-step solving process\n</reasoning>\n<answer>\n[16-character solution "
    "string with no spaces or separators]\n</answer>\n\n\nSolve the following Sudoku puzzle: {puzzle}\n")
_HUMANEVAL = "Complete the following python code:\n{stub}"
_MBPP_ASK = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
             "tests:\n\n {tests}\n")
_MBPP_ANSWER = "[BEGIN]\n '{code}' \n[DONE] \n\n "
_MBPP_PREFILL = "[BEGIN]\n"
# MBPP tasks 2, 3 and 4 (its prompt split), the few-shot turns before every test task: (text, the
# test lines as the turn shows them, the reference solution with its CRLF line ends).
_MBPP_SHOTS = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
     "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4) \n"
     "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14) ",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
     "  return (res)"),
    ("Write a python function to identify non-prime numbers.",
     "assert is_not_prime(2) == False \nassert is_not_prime(10) == True \nassert is_not_prime(35) == True ",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
     "\r\n        if n % i == 0:\r\n            result = True\r\n    return result"),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
     "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
     "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35] ",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums"),
)
_TOP_DEF = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.M)

# ----------------------------------------------------------------------------- conversion (pure)


def _user(content: str) -> dict:
  return {"content": content, "role": "user"}


def make_row(data_source: str, messages: list[dict], ground_truth: str, split: str, index: int, kind: str,
             **extra: str) -> dict:
  """One output row (module docstring, "Columns"); kind is extra_info.task: "math" or "code"."""
  return {"data_source": data_source, "prompt": messages,
          "reward_model": {"ground_truth": ground_truth, "style": "rule"},
          "extra_info": {"index": index, "split": split, "task": kind, **extra}}


def _text(record: Mapping, *names: str) -> str:
  """The first of `names` present in the record, as a non-empty string (BadRow otherwise)."""
  for name in names:
    if name in record and record[name] is not None:
      value = record[name]
      if not isinstance(value, str):
        raise records.BadRow(f"{name}: expected a string, got {type(value).__name__} {str(value)[:40]!r}")
      if not value.strip():
        raise records.BadRow(f"{name}: empty")
      return value
  raise records.BadRow(f"missing: {' or '.join(names)}")


def _integer(value: Any, what: str) -> int:
  if isinstance(value, bool):
    raise records.BadRow(f"{what}: {value!r} is not an integer")
  if isinstance(value, str):
    value = value.strip()
    if not re.fullmatch(r"-?\d+", value):
      raise records.BadRow(f"{what}: {value[:40]!r} is not an integer")
    return int(value)
  if isinstance(value, (int, float)) and value == int(value):
    return int(value)
  raise records.BadRow(f"{what}: {str(value)[:40]!r} is not an integer")


def gsm8k_row(record: Mapping, split: str, index: int) -> dict:
  """openai/gsm8k {question, answer}: the question; the answer after its "####" line."""
  question, answer = _text(record, "question"), _text(record, "answer")
  if "####" not in answer:
    raise records.BadRow(f"answer: no '#### <number>' line in {answer[-60:]!r}")
  return make_row("gsm8k", [_user(question)], answer.split("####")[-1].strip(), split, index, "math")


def math_row(record: Mapping, split: str, index: int, data_source: str = "math") -> dict:
  """MATH-style {problem, answer} (ankner/math-500, MATH-500) or {problem, solution} (Hendrycks MATH): the
  problem; the `answer` field, else the last \\boxed{} of the solution."""
  problem = _text(record, "problem")
  if record.get("answer") is not None:
    answer = _text(record, "answer").strip()
  else:
    answer = last_boxed(_text(record, "solution"))
    if not answer:
      raise records.BadRow("answer: no `answer` field and no \\boxed{} answer in the solution")
  return make_row(data_source, [_user(problem)], answer, split, index, "math")


def math500_row(record: Mapping, split: str, index: int) -> dict:
  return math_row(record, split, index, data_source="math500")


def countdown_row(record: Mapping, split: str, index: int, *, three_only: bool = False) -> dict:
  """Countdown-Tasks-3to4 {nums, target} or d1's test {input: "30,100,93", output: "23"}; three_only: skip
  the tasks with other than 3 numbers as "filtered" (d1's filter)."""
  if "nums" in record:
    nums, target = record["nums"], record.get("target")
    if isinstance(nums, str) or not hasattr(nums, "__iter__"):
      raise records.BadRow(f"nums: expected a list of integers, got {str(nums)[:40]!r}")
    numbers = [_integer(x, "nums") for x in nums]
  elif "input" in record:
    numbers = [_integer(x, "input") for x in _text(record, "input").split(",")]
    target = record.get("output")
  else:
    raise records.BadRow("missing: nums (or input)")
  if target is None:
    raise records.BadRow("missing: target (or output)")
  target = _integer(target, "target")
  if three_only and len(numbers) != 3:
    raise records.BadRow(f"filtered: {len(numbers)} numbers (d1's countdown keeps 3-number tasks)")
  content = _COUNTDOWN.format(numbers=numbers, target=target)
  return make_row("countdown", [_user(content)], str(target), split, index, "math", numbers=str(numbers))


def sudoku_row(record: Mapping, split: str, index: int) -> dict:
  """d1's sudoku csv {Puzzle, Solution} (16-digit strings, 0 = empty cell)."""
  puzzle = _text(record, "Puzzle", "puzzle").strip()
  solution = _text(record, "Solution", "solution").strip()
  return make_row("sudoku", [_user(_SUDOKU.format(puzzle=puzzle))], solution, split, index, "math",
                  puzzle=puzzle)


def humaneval_row(record: Mapping, split: str, index: int) -> dict:
  """openai_humaneval {prompt, test, entry_point}: the stub after an instruction line; the check() code."""
  stub, test = _text(record, "prompt"), _text(record, "test")
  entry = record.get("entry_point")
  defs = _TOP_DEF.findall(stub)
  if entry and (not defs or defs[-1] != entry):
    raise records.BadRow(f"entry_point: {entry!r} is not the stub's last top-level def "
                         f"({defs[-1] if defs else None!r}), which the loader grades")
  return make_row("humaneval", [_user(_HUMANEVAL.format(stub=stub))], test, split, index, "code")


def _mbpp_shots() -> list[dict]:
  turns = []
  for text, tests, code in _MBPP_SHOTS:
    turns += [_user(_MBPP_ASK.format(text=text, tests=tests)),
              {"content": _MBPP_ANSWER.format(code=code), "role": "assistant"}]
  return turns


def mbpp_row(record: Mapping, split: str, index: int) -> dict:
  """MBPP {text, test_list[, test_setup_code]}: three few-shot turns, the task with its asserts, the
  "[BEGIN]" prefill; ground truth = the asserts as a JSON list."""
  text, tests = _text(record, "text"), record.get("test_list")
  if isinstance(tests, str) or not hasattr(tests, "__iter__"):
    raise records.BadRow(f"test_list: expected a list of assert lines, got {str(tests)[:40]!r}")
  tests = list(tests)
  if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
    raise records.BadRow(f"test_list: expected non-empty assert strings, got {str(tests)[:60]!r}")
  ask = _MBPP_ASK.format(text=text, tests="\n".join(tests) + "  ")
  messages = _mbpp_shots() + [_user(ask), {"content": _MBPP_PREFILL, "role": "assistant"}]
  setup = record.get("test_setup_code") or ""
  extra = {"test_setup_code": setup} if isinstance(setup, str) and setup.strip() else {}
  return make_row("mbpp", messages, json.dumps(tests), split, index, "code", **extra)


# ----------------------------------------------------------------------------- sources


def _datasets_load() -> Callable[..., Any]:
  """datasets.load_dataset, imported on first use; SystemExit with the install line when it is missing."""
  try:
    from datasets import load_dataset
  except ImportError:
    raise SystemExit(f"error: {_INSTALL}") from None
  return load_dataset


def _by_hand(raw: str, suffix: str) -> str:
  return f"save the records by hand as RAW/{raw}{suffix} and run again with --from RAW"


def _download_d1(name: str, raw: str) -> list:
  """Records of one file of d1's dataset/ folder, downloaded from GitHub at the pinned commit."""
  url, suffix = _D1_URL + name, Path(name).suffix
  try:
    with urllib.request.urlopen(url, timeout=120) as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise SystemExit(f"error: cannot download {url}: {e}; {_by_hand(raw, suffix)}") from None
  if text.startswith("version https://git-lfs"):
    raise SystemExit(f"error: {url} is a Git LFS pointer, not the data; {_by_hand(raw, suffix)}")
  return parse_raw(text, suffix, where=url)


@dataclasses.dataclass(frozen=True)
class Part:
  """One output file: the raw records it is made of, where they come from and how each becomes a row."""
  task: str                # the --tasks name
  split: str               # "train" | "test"
  name: str                # output file stem after "<split>_": gsm8k, math500, countdown, ...
  loader_task: str         # the records task whose row check every written row passes
  raw: str                 # raw file stem for --from
  source: str              # what is downloaded, in words
  license: str
  convert: Callable[[Mapping, str, int], dict]
  hub: tuple[str, str | None] = ()  # (Hugging Face dataset, config) read with datasets.load_dataset
  d1_file: str = ""        # else this file of d1's dataset/ folder
  size_flag: str = ""      # the option capping the rows (train sets); the file name gets -n<rows>

  def download(self) -> Iterable[dict]:
    """The source's raw records (datasets.load_dataset for the hub sources, d1's GitHub files otherwise)."""
    if not self.hub:
      return _download_d1(self.d1_file, self.raw)
    path, config = self.hub
    load = _datasets_load()
    try:
      return load(path, config, split=self.split) if config else load(path, split=self.split)
    except Exception as e:  # network, hub and cache errors come in many types
      why = " ".join(str(e).split())[:300]  # one line
      raise SystemExit(f"error: cannot load {path}" + (f" (config {config})" if config else "")
                       + f", split {self.split}, from the Hugging Face hub: {type(e).__name__}: {why}; "
                       + _by_hand(self.raw, ".jsonl")) from None


PARTS = (
    Part("gsm8k", "train", "gsm8k", "gsm8k", "gsm8k_train", "openai/gsm8k (config main), train split", "MIT",
         gsm8k_row, hub=("openai/gsm8k", "main")),
    Part("gsm8k", "test", "gsm8k", "gsm8k", "gsm8k_test", "openai/gsm8k (config main), test split", "MIT",
         gsm8k_row, hub=("openai/gsm8k", "main")),
    Part("math", "train", "math", "math", "math_train",
         "ankner/math-500, train split (d1's MATH training set: MATH minus the MATH-500 problems)",
         "MIT (MATH)", math_row, hub=("ankner/math-500", None)),
    Part("math", "test", "math500", "math", "math500_test", "HuggingFaceH4/MATH-500, test split", "MIT",
         math500_row, hub=("HuggingFaceH4/MATH-500", None)),
    Part("countdown", "train", "countdown", "countdown", "countdown_train",
         "Jiayi-Pan/Countdown-Tasks-3to4, train split, the first rows in source order",
         "not stated here: see the dataset card on the Hugging Face hub", countdown_row,
         hub=("Jiayi-Pan/Countdown-Tasks-3to4", None), size_flag="countdown_train_size"),
    Part("countdown", "test", "countdown", "countdown", "countdown_test",
         f"d1's dataset/countdown_cd3_test.jsonl (github.com/dllm-reasoning/d1 at {_D1_COMMIT[:7]})", _D1_LICENSE,
         countdown_row, d1_file="countdown_cd3_test.jsonl"),
    Part("sudoku", "train", "sudoku", "sudoku", "sudoku_train",
         f"d1's dataset/4x4_sudoku_unique_puzzles.csv (github.com/dllm-reasoning/d1 at {_D1_COMMIT[:7]})",
         _D1_LICENSE, sudoku_row, d1_file="4x4_sudoku_unique_puzzles.csv", size_flag="sudoku_train_size"),
    Part("sudoku", "test", "sudoku", "sudoku", "sudoku_test",
         f"d1's dataset/4x4_test_sudoku.csv (github.com/dllm-reasoning/d1 at {_D1_COMMIT[:7]})", _D1_LICENSE,
         sudoku_row, d1_file="4x4_test_sudoku.csv"),
    Part("humaneval", "test", "humaneval", "humaneval", "humaneval_test", "openai/openai_humaneval, test split",
         "MIT", humaneval_row, hub=("openai/openai_humaneval", None)),
    Part("mbpp", "test", "mbpp", "mbpp", "mbpp_test", "google-research-datasets/mbpp (config full), test split",
         "CC BY 4.0", mbpp_row, hub=("google-research-datasets/mbpp", "full")),
)


# ----------------------------------------------------------------------------- raw files


def parse_raw(data: str | bytes, suffix: str, *, where: str) -> list:
  """Raw records of a .jsonl / .csv text or .parquet bytes; a JSONL line that does not parse becomes a
  marker the conversion counts as a bad row (records.read_rows' rule)."""
  if suffix == ".parquet":
    import pyarrow.parquet as pq
    try:
      return pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
      raise SystemExit(f"error: cannot read parquet {where}: {type(e).__name__}: {e}") from None
  text = data.decode("utf-8") if isinstance(data, bytes) else data
  if suffix == ".csv":
    return list(csv.DictReader(io.StringIO(text)))  # every cell a string: sudoku keeps its leading zeros
  if suffix == ".jsonl":
    out: list = []
    for number, line in enumerate(text.splitlines(), start=1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          out.append(_BadLine(f"json: line {number}: {e}"))
    return out
  raise SystemExit(f"error: raw file {where} has suffix {suffix!r}; use one of {RAW_EXTS}")


@dataclasses.dataclass
class _BadLine:
  reason: str


def raw_file(raw_dir: Path, part: Part) -> Path:
  """The one raw file of a part in raw_dir: <raw>.jsonl | .parquet | .csv (SystemExit naming the choices)."""
  hits = [raw_dir / f"{part.raw}{ext}" for ext in RAW_EXTS if (raw_dir / f"{part.raw}{ext}").is_file()]
  if not hits:
    raise SystemExit(f"error: --from {raw_dir}: no raw file for {part.split}_{part.name}; expected "
                     f"{' or '.join(part.raw + e for e in RAW_EXTS)} holding records of {part.source}")
  if len(hits) > 1:
    raise SystemExit(f"error: --from {raw_dir}: several raw files for {part.split}_{part.name}: "
                     f"{[h.name for h in hits]}; keep one")
  return hits[0]


# ----------------------------------------------------------------------------- convert and write


def convert(part: Part, raw_records: Iterable[Any], limit: int = 0
            ) -> tuple[list[dict], records.RowStats, bool]:
  """(rows of `part` from its raw records in source order, stats, whether `limit` stopped the reading).

  limit: stop after this many rows (0 = all). A record is skipped, counted in the stats under its
  reason, when it cannot be converted or the converted row fails the loader's check for
  `part.loader_task`."""
  stats = records.RowStats(source=f"{part.split}_{part.name}", max_examples=10)
  rows: list[dict] = []
  for number, rec in enumerate(raw_records):
    if limit and len(rows) >= limit:
      return rows, stats, True
    stats.total += 1
    try:
      if isinstance(rec, _BadLine):
        raise records.BadRow(rec.reason)
      if not isinstance(rec, Mapping):
        raise records.BadRow(f"record: expected an object, got {type(rec).__name__}")
      row = part.convert(rec, part.split, len(rows))
      records.normalize_row(row, part.loader_task, part.split, len(rows))
    except records.BadRow as e:
      stats.add_bad(f"record {number}", str(e), rec)
      continue
    rows.append(row)
    stats.kept += 1
  return rows, stats, False


def _schema(rows: Sequence[dict]):
  """The output schema: fixed columns, extra_info's fields sorted by name (index int64, the rest strings)."""
  import pyarrow as pa
  keys = sorted({k for r in rows for k in r["extra_info"]} | {"index", "split", "task"})
  extra = pa.struct([(k, pa.int64() if k == "index" else pa.string()) for k in keys])
  message = pa.struct([("content", pa.string()), ("role", pa.string())])
  return pa.schema([("data_source", pa.string()), ("prompt", pa.list_(message)),
                    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
                    ("extra_info", extra)])


def write_parquet(rows: Sequence[dict], path: Path) -> None:
  """rows -> parquet at path, written to a temporary name first so a failed write leaves no half file."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.Table.from_pylist(list(rows), schema=_schema(rows))
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(table, tmp)
  tmp.replace(path)


def loader_files(out: Path, split: str, name: str) -> list[Path]:
  """Files in out that the loader would read for (split, name): <split>_<name>[-_.]* .parquet / .jsonl."""
  pat = re.compile(rf"^{split}_{re.escape(name)}([-_.].*)?$")
  if not out.is_dir():
    return []
  return sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".parquet", ".jsonl") and pat.match(p.stem))


def _parse_tasks(spec: str) -> list[str]:
  tasks = [t.strip() for t in spec.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise SystemExit(f"error: --tasks {spec!r}: unknown {unknown or 'empty list'}; use a comma-separated subset "
                     f"of {','.join(TASKS)}")
  return [t for t in TASKS if t in tasks]


def _report(part: Part, rows: list[dict], stats: records.RowStats, path: Path, stopped: bool, limit: int) -> str:
  """The lines printed for one written file: rows, records read, the skipped ones per reason."""
  line = f"  {part.split}: {len(rows)} rows -> {path} (read {stats.total} records"
  if stopped:
    line += f", stopped at --{part.size_flag.replace('_', '-')}={limit}"
  elif limit and len(rows) < limit:
    line += f"; fewer than --{part.size_flag.replace('_', '-')}={limit}: the source holds no more"
  line += ")"
  if stats.bad:
    firsts: dict[str, str] = {}
    for e in stats.examples:
      firsts.setdefault(e["reason"].split(":")[0], f"{e['where']}: {e['reason']}")
    reasons = "; ".join(f"{k} x{n}" + (f" (first: {firsts[k]})" if k in firsts else "")
                        for k, n in stats.reasons.most_common())
    line += f"\n    skipped {stats.bad}: {reasons}"
  return line


def main(argv: Sequence[str] | None = None) -> dict[str, list[Path]]:
  """The command (module docstring); returns {task: files written}."""
  ap = argparse.ArgumentParser(prog="python -m bgpo_jax.data.prepare", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="folder to write (created); pass it as --config.task.data_dir")
  ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
  ap.add_argument("--from", dest="raw_dir", default="", help="convert raw files in this folder instead of downloading")
  ap.add_argument("--force", action="store_true", help="replace existing output files of the chosen tasks")
  ap.add_argument("--countdown-train-size", type=int, default=20000, help="countdown training rows (0 = all)")
  ap.add_argument("--countdown-three-only", action="store_true",
                  help="train on the 3-number countdown tasks only (d1's filter)")
  ap.add_argument("--sudoku-train-size", type=int, default=20000, help="sudoku training rows (0 = all)")
  a = ap.parse_args(argv)
  tasks = _parse_tasks(a.tasks)
  for flag in ("countdown_train_size", "sudoku_train_size"):
    if getattr(a, flag) < 0:
      raise SystemExit(f"error: --{flag.replace('_', '-')}={getattr(a, flag)} is negative; pass a row count, "
                       "or 0 for all rows")
  out = Path(a.out)
  if out.exists() and not out.is_dir():
    raise SystemExit(f"error: --out {out} exists and is not a folder; pass a folder path")
  parts = [p for p in PARTS if p.task in tasks]
  if a.countdown_three_only:
    parts = [dataclasses.replace(p, convert=functools.partial(countdown_row, three_only=True),
                                 source=p.source + ", 3-number tasks only")
             if p.convert is countdown_row and p.split == "train" else p for p in parts]
  raw_dir = Path(a.raw_dir) if a.raw_dir else None
  if raw_dir is not None:
    if not raw_dir.is_dir():
      raise SystemExit(f"error: --from {raw_dir} is not a folder; pass the folder holding the raw files")
    raws = {p: raw_file(raw_dir, p) for p in parts}  # every raw file checked before any work
  elif any(p.hub for p in parts):
    _datasets_load()
  existing = [f for p in parts for f in loader_files(out, p.split, p.name)]
  if existing and not a.force:
    raise SystemExit(f"error: {len(existing)} output file(s) exist: {', '.join(str(f) for f in existing)}; pass "
                     "--force to replace them, or choose another --out")
  out.mkdir(parents=True, exist_ok=True)
  written: dict[str, list[Path]] = {}
  for task in tasks:
    task_parts = [p for p in parts if p.task == task]
    print(f"{task}:")
    for part in task_parts:
      print(f"  {part.split} source: {part.source}; license: {part.license}"
            + (f" (converted from {raws[part]})" if raw_dir is not None else ""))
    for part in task_parts:
      limit = getattr(a, part.size_flag) if part.size_flag else 0
      if raw_dir is not None:
        path = raws[part]
        raw = parse_raw(path.read_bytes() if path.suffix == ".parquet" else path.read_text(encoding="utf-8"),
                        path.suffix, where=str(path))
      else:
        raw = part.download()
      rows, stats, stopped = convert(part, raw, limit)
      if not rows:
        raise SystemExit(f"error: {part.split}_{part.name}: no usable rows out of {stats.total} records "
                         f"(reasons: {dict(stats.reasons)}); check the source")
      suffix = f"-n{len(rows)}" if part.size_flag else ""
      dest = out / f"{part.split}_{part.name}{suffix}.parquet"
      for stale in loader_files(out, part.split, part.name):
        stale.unlink()  # only reached with --force (checked above) or for a file of this run's own name
      write_parquet(rows, dest)
      written.setdefault(task, []).append(dest)
      print(_report(part, rows, stats, dest, stopped, limit))
  print(f"done: pass --config.task.data_dir={out}")
  return written


if __name__ == "__main__":
  main()
