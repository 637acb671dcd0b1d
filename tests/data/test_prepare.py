"""bgpo_jax.data.prepare: raw source records -> the task files the loaders read.

The download path needs the network and `datasets`; these tests convert raw files they write
themselves (`--from`), load the output with the project's loader (records.load_examples), and,
where the reference files exist, rebuild each reference row from the source fields it holds and
check that the conversion reproduces the row exactly.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgpo_jax.data import prepare, records

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
needs_shared = pytest.mark.skipif(
    not (DATASETS / "README.md").is_file(),
    reason=f"reference datasets not found at {DATASETS} (only present beside the dev repo)")

HE_STUB = 'def add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n'
HE_TEST = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"


def _part(split: str, name: str) -> prepare.Part:
  return next(p for p in prepare.PARTS if p.split == split and p.name == name)


def _jsonl(path: Path, rows: list) -> None:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def raw_dir(tmp_path):
  """Small raw files of every task, as the sources yield them, in all three raw formats, with bad rows."""
  raw = tmp_path / "raw"
  raw.mkdir()
  _jsonl(raw / "gsm8k_train.jsonl", [
      {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
      {"question": "A shop sells 1200 pens a day. How many in 2 days?", "answer": "1200*2\n#### 2,400"},
      {"question": "No answer line here?", "answer": "just text"},          # no ####: skipped
      "{not json",                                                          # bad line: skipped
  ])
  _jsonl(raw / "gsm8k_test.jsonl", [{"question": "What is 2+2?", "answer": "#### 4"}])
  pq.write_table(pa.Table.from_pylist([
      {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2"},
      {"problem": "Simplify $\\frac{2}{4}$.", "solution": "So $\\boxed{\\frac{1}{2}}$.", "answer": None},
      {"problem": "What is x?", "solution": "No box at all.", "answer": None},  # skipped
  ]), raw / "math_train.parquet")
  _jsonl(raw / "math500_test.jsonl", [{"problem": "Find $3 \\cdot 3$.", "answer": "9"}])
  _jsonl(raw / "countdown_train.jsonl", [
      {"target": 98, "nums": [44, 19, 35]},
      {"target": 10, "nums": [1, 2, 3, 4]},                                 # 4 numbers: filtered (d1)
      {"target": 64, "nums": [63, 95, 96]},
      {"target": 5, "nums": [1, 2, 3]},                                     # beyond the size cap
  ])
  _jsonl(raw / "countdown_test.jsonl", [{"input": "30,100,93", "output": "23"}])
  (raw / "sudoku_train.csv").write_text(
      "Puzzle,Solution\n0321003004002100,4321123434122143\n1400000032104020,1432234132144123\n"
      "1400000032104020,2222222222222222\n", encoding="utf-8")   # last: contradicts its givens, skipped
  (raw / "sudoku_test.csv").write_text("Puzzle,Solution\n3102200002100320,3142243142131324\n", encoding="utf-8")
  _jsonl(raw / "humaneval_test.jsonl", [
      {"task_id": "HumanEval/0", "prompt": HE_STUB, "canonical_solution": "    return a + b\n", "test": HE_TEST,
       "entry_point": "add"},
      {"task_id": "HumanEval/1", "prompt": HE_STUB, "canonical_solution": "", "test": HE_TEST,
       "entry_point": "other"},                                             # not the stub's def: skipped
  ])
  pq.write_table(pa.Table.from_pylist([
      {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b",
       "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "",
       "challenge_test_list": []},
      {"task_id": 12, "text": "Write a function to read a constant.", "code": "def get():\r\n  return K",
       "test_list": ["assert get() == 5"], "test_setup_code": "K = 5", "challenge_test_list": []},
  ]), raw / "mbpp_test.parquet")
  return raw


def test_from_raw_files_writes_what_the_loader_reads(raw_dir, tmp_path, capsys):
  out = tmp_path / "data"
  written = prepare.main(["--out", str(out), "--from", str(raw_dir), "--countdown-train-size", "2",
                          "--countdown-three-only"])
  names = sorted(p.name for p in out.iterdir())
  assert names == ["test_countdown.parquet", "test_gsm8k.parquet", "test_humaneval.parquet", "test_math500.parquet",
                   "test_mbpp.parquet", "test_sudoku.parquet", "train_countdown-n2.parquet", "train_gsm8k.parquet",
                   "train_math.parquet", "train_sudoku-n2.parquet"]
  assert sorted(p.name for ps in written.values() for p in ps) == names
  printed = capsys.readouterr().out
  # Per task: source and license; per file: rows written, and every skipped row counted with its reason.
  assert "openai/gsm8k (config main), train split; license: MIT" in printed
  assert "license: CC BY 4.0" in printed and "Apache-2.0" in printed
  assert re.search(r"train: 2 rows -> \S+train_gsm8k.parquet \(read 4 records\)\n    skipped 2: answer x1 "
                   r"\(first: record 2: answer: no '#### <number>' line", printed)
  assert "json x1 (first: record 3: json: line 4:" in printed
  assert "stopped at --countdown-train-size=2" in printed and "filtered x1" in printed
  assert "entry_point x1" in printed and "ground_truth x1" in printed  # humaneval; the contradicting sudoku
  assert printed.rstrip().endswith(f"done: pass --config.task.data_dir={out}")

  def load(task, split):
    exs, stats = records.load_examples(task, split, source_dir=out)
    assert stats.bad == 0, stats.to_dict()
    return [records.decode_example(e) for e in exs]

  gsm = load("gsm8k", "train")
  assert [e["ground_truth"] for e in gsm] == ["7", "2,400"] and [e["index"] for e in gsm] == [0, 1]
  assert gsm[0]["messages"] == [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]
  assert [e["ground_truth"] for e in load("math", "train")] == ["2", "\\frac{1}{2}"]
  m500 = load("math", "test")  # the math task's test split is test_math500
  assert m500[0]["data_source"] == "math500" and m500[0]["ground_truth"] == "9"
  cd = load("countdown", "train")
  assert [(e["extra"]["numbers"], e["ground_truth"]) for e in cd] == [([44, 19, 35], "98"), ([63, 95, 96], "64")]
  assert load("countdown", "test")[0]["extra"]["numbers"] == [30, 100, 93]
  sd = load("sudoku", "train")
  assert [e["extra"]["puzzle"] for e in sd] == ["0321003004002100", "1400000032104020"]
  he = load("humaneval", "test")
  assert len(he) == 1 and he[0]["extra"]["entry_point"] == "add" and he[0]["extra"]["test_format"] == "check"
  mb = load("mbpp", "test")
  assert [json.loads(e["ground_truth"]) for e in mb] == [["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
                                                         ["assert get() == 5"]]
  assert [e["extra"].get("test_setup_code") for e in mb] == [None, "K = 5"]
  assert [m["role"] for m in mb[0]["messages"]] == ["user", "assistant"] * 4
  assert mb[0]["messages"][-1]["content"] == "[BEGIN]\n"
  assert mb[0]["messages"][-2]["content"].endswith(
      "Your code should pass these tests:\n\n assert add(1, 2) == 3\nassert add(0, 0) == 0  \n")


def test_a_run_reads_the_written_folder_as_task_data_dir(raw_dir, tmp_path):
  """The path a training run takes with --config.task.data_dir=OUT: the TFDS build over the folder."""
  from bgpo_jax.data import tfds_builder
  out = tmp_path / "data"
  prepare.main(["--out", str(out), "--from", str(raw_dir), "--tasks", "math,mbpp"])
  for task, split, n in [("math", "train", 2), ("math", "test", 1), ("mbpp", "test", 2)]:
    src, stats = tfds_builder.tfds_source(task, split, data_dir=tmp_path / "tfds", source_dir=out)
    assert len(src) == n and not stats.get("bad_rows"), (task, split, stats)
  ex = records.decode_example(src[1])
  assert ex["data_source"] == "mbpp" and ex["extra"]["test_setup_code"] == "K = 5"


def test_refuses_to_overwrite_and_force_replaces_stale_files(raw_dir, tmp_path):
  out = tmp_path / "data"
  out.mkdir()
  stale = out / "train_countdown-n5000.parquet"   # the loader would read it beside the new file
  stale.write_bytes(b"old")
  other = out / "train_countdown_notes.txt"       # not a data file: left alone
  other.write_text("keep")
  args = ["--out", str(out), "--from", str(raw_dir), "--tasks", "countdown"]
  with pytest.raises(SystemExit, match=r"1 output file\(s\) exist: .*train_countdown-n5000.parquet; pass --force"):
    prepare.main(args)
  assert stale.read_bytes() == b"old"
  prepare.main(args + ["--force"])
  assert sorted(p.name for p in out.iterdir()) == ["test_countdown.parquet", "train_countdown-n4.parquet",
                                                   "train_countdown_notes.txt"]
  with pytest.raises(SystemExit, match="pass --force"):
    prepare.main(args)


def test_bad_arguments_name_the_value_and_the_fix(raw_dir, tmp_path):
  out = str(tmp_path / "data")
  with pytest.raises(SystemExit, match=r"--tasks 'gsm8k,maths': unknown \['maths'\]; use .*gsm8k,math,countdown"):
    prepare.main(["--out", out, "--tasks", "gsm8k,maths"])
  (raw_dir / "gsm8k_test.jsonl").unlink()
  with pytest.raises(SystemExit, match=r"no raw file for test_gsm8k; expected gsm8k_test.jsonl or "
                                       r"gsm8k_test.parquet or gsm8k_test.csv"):
    prepare.main(["--out", out, "--from", str(raw_dir), "--tasks", "gsm8k"])
  with pytest.raises(SystemExit, match="--countdown-train-size=-1 is negative"):
    prepare.main(["--out", out, "--countdown-train-size", "-1"])
  assert not Path(out).exists()  # nothing written by a refused run


def test_download_without_datasets_exits_with_the_install_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
  with pytest.raises(SystemExit) as e:
    prepare.main(["--out", str(tmp_path / "data"), "--tasks", "gsm8k"])
  message = str(e.value)
  assert "pip install datasets" in message and "\n" not in message
  assert not (tmp_path / "data").exists()


def test_download_path_reads_the_named_sources(tmp_path, monkeypatch, capsys):
  """The download path with a stand-in `datasets` module and GitHub: which sources it asks for, and that
  their records go through the same conversion; a failed download names the source and the --from file."""
  calls = []

  def load_dataset(path, config=None, *, split):
    calls.append((path, config, split))
    if path == "openai/gsm8k":
      return [{"question": f"What is {split}?", "answer": "#### 1"}]
    return [{"nums": [1, 2, 3, 4], "target": 10}, {"nums": [2, 3, 4], "target": 5}]

  monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
  monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)

  class Response(io.BytesIO):
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

  urls = []
  monkeypatch.setattr(prepare.urllib.request, "urlopen",
                      lambda url, timeout: urls.append(url) or Response(b'{"input": "30,100,93", "output": "23"}\n'))
  out = tmp_path / "data"
  prepare.main(["--out", str(out), "--tasks", "gsm8k,countdown"])
  assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
                   ("Jiayi-Pan/Countdown-Tasks-3to4", None, "train")]
  assert urls == [prepare._D1_URL + "countdown_cd3_test.jsonl"] and "/d1/837888f22c21" in urls[0]
  assert sorted(p.name for p in out.iterdir()) == ["test_countdown.parquet", "test_gsm8k.parquet",
                                                   "train_countdown-n2.parquet", "train_gsm8k.parquet"]
  assert "read 2 records; fewer than --countdown-train-size=20000: the source holds no more" in capsys.readouterr().out

  def offline(url, timeout):
    raise OSError("no route to host")

  monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
  with pytest.raises(SystemExit, match=r"cannot download .*/dataset/4x4_sudoku_unique_puzzles.csv: no route to "
                                       r"host; save the records by hand as RAW/sudoku_train.csv and run again with "
                                       r"--from RAW"):
    prepare.main(["--out", str(tmp_path / "other"), "--tasks", "sudoku", "--sudoku-train-size", "0"])

  def hub_down(path, config=None, *, split):
    raise ConnectionError("hub\nunreachable")

  monkeypatch.setattr(sys.modules["datasets"], "load_dataset", hub_down)
  with pytest.raises(SystemExit, match=r"cannot load openai/openai_humaneval, split test, from the Hugging Face hub: "
                                       r"ConnectionError: hub unreachable; save the records by hand as "
                                       r"RAW/humaneval_test.jsonl"):
    prepare.main(["--out", str(tmp_path / "third"), "--tasks", "humaneval"])


def test_conversions_of_single_records():
  row = prepare.countdown_row({"nums": [2, 3, 4], "target": 5}, "train", 7)
  assert row["extra_info"] == {"index": 7, "split": "train", "task": "math", "numbers": "[2, 3, 4]"}
  assert row["reward_model"] == {"ground_truth": "5", "style": "rule"}
  assert "Using only the numbers [2, 3, 4], create an arithmetic expression that evaluates to exactly 5." in (
      row["prompt"][0]["content"])
  # A Hendrycks-style MATH record (no `answer`): the last \boxed{} of the solution.
  row = prepare.math_row({"problem": "p", "solution": "first \\boxed{1}, then \\boxed{\\frac{1}{2}}"}, "train", 0)
  assert row["reward_model"]["ground_truth"] == "\\frac{1}{2}"
  for record, reason in [({"nums": [1, 2], "target": True}, "target: True is not an integer"),
                         ({"input": "1,x,3", "output": "4"}, "input: 'x' is not an integer"),
                         ({"Puzzle": 321003004002100, "Solution": "4321123434122143"},
                          "Puzzle: expected a string, got int")]:
    convert = prepare.sudoku_row if "Puzzle" in record else prepare.countdown_row
    with pytest.raises(records.BadRow, match=re.escape(reason)):
      convert(record, "test", 0)
  with pytest.raises(records.BadRow, match="test_list: expected a list"):
    prepare.mbpp_row({"text": "t", "test_list": "assert f() == 1"}, "test", 0)


# ----------------------------------------------------------------------------- against the reference files


def _shared(name: str) -> list[dict]:
  return pq.read_table(DATASETS / f"{name}.parquet").to_pylist()


def _raw_from_reference(name: str, row: dict) -> dict:
  """The source record a reference row was made from, rebuilt from the fields the row holds."""
  content, gt, extra = row["prompt"][-1]["content"], row["reward_model"]["ground_truth"], row["extra_info"]
  if name.endswith("gsm8k"):
    return {"question": content, "answer": f"Worked solution.\n#### {gt}"}
  if name.endswith(("math", "math500")):
    return {"problem": content, "answer": gt}
  if "countdown" in name:
    nums = ast.literal_eval(extra["numbers"])
    if name.startswith("test"):
      return {"input": ",".join(map(str, nums)), "output": gt}  # d1's test jsonl
    return {"nums": nums, "target": int(gt)}
  if "sudoku" in name:
    return {"Puzzle": extra["puzzle"], "Solution": gt}
  if name.endswith("humaneval"):
    stub = content.removeprefix("Complete the following python code:\n")
    return {"prompt": stub, "test": gt, "entry_point": re.findall(r"^def (\w+)", stub, re.M)[-1]}
  if name.endswith("mbpp"):
    text = re.match(r"You are an expert Python programmer, and here is your task: (.*) Your code should pass",
                    row["prompt"][-2]["content"], re.S).group(1)
    return {"text": text, "test_list": json.loads(gt), "test_setup_code": ""}
  raise AssertionError(name)


@needs_shared
@pytest.mark.parametrize("name,split,part_name,rows", [
    ("train_gsm8k", "train", "gsm8k", None), ("test_gsm8k", "test", "gsm8k", None),
    ("train_math", "train", "math", 2000), ("test_math500", "test", "math500", None),
    ("train_countdown-n20000", "train", "countdown", 2000), ("test_countdown", "test", "countdown", None),
    ("train_sudoku-n20000", "train", "sudoku", 2000), ("test_sudoku", "test", "sudoku", None),
    ("test_humaneval", "test", "humaneval", None), ("test_mbpp", "test", "mbpp", None)])
def test_conversion_reproduces_the_reference_rows(name, split, part_name, rows):
  """Prompts, ground truths and extra fields equal the reference files' for the same source records."""
  reference = _shared(name)[:rows]
  if name == "train_math":  # 4 reference rows have no answer (the loader skips them): no source record to rebuild
    reference = [r for r in reference if (r["reward_model"]["ground_truth"] or "").strip()]
  part = _part(split, part_name)
  got, stats, _ = prepare.convert(part, [_raw_from_reference(name, r) for r in reference])
  assert stats.bad == 0, stats.to_dict()
  for i, (mine, ref) in enumerate(zip(got, reference)):
    ref = dict(ref, extra_info=dict(ref["extra_info"], index=i))
    if name == "train_math":  # a few reference answers keep the spaces around the boxed content
      ref["reward_model"] = dict(ref["reward_model"], ground_truth=ref["reward_model"]["ground_truth"].strip())
    assert mine == ref, (name, i)
  assert len(got) == len(reference)


@needs_shared
def test_written_schema_matches_the_reference_files(tmp_path):
  rows, _, _ = prepare.convert(_part("test", "countdown"), [{"input": "30,100,93", "output": "23"}])
  prepare.write_parquet(rows, tmp_path / "test_countdown.parquet")
  mine = pq.read_schema(tmp_path / "test_countdown.parquet").remove_metadata()
  assert mine.equals(pq.read_schema(DATASETS / "test_countdown.parquet").remove_metadata())
  assert pq.read_table(tmp_path / "test_countdown.parquet").to_pylist() == _shared("test_countdown")[:1]
