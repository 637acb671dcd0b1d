"""Data: real-file counts, TFDS build/read without TensorFlow, bad rows, generators, order."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import operator
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgpo_jax.data import dataset, order, procedural, records
from bgpo_jax.tokenizer import CharTokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared"
DATASETS = SHARED / "datasets"
needs_shared = pytest.mark.skipif(
    not (DATASETS / "README.md").is_file(),
    reason=f"reference datasets not found at {DATASETS} (only present beside the dev repo)")

# (task, split) -> rows kept / bad in shared/datasets. train_math has 2 null and 2 empty
# ground truths, which must be reported, not silently kept.
REAL_COUNTS = {
    ("gsm8k", "train"): (7473, 0), ("gsm8k", "test"): (1319, 0),
    ("math", "train"): (7470, 4), ("math", "test"): (500, 0),
    ("countdown", "train"): (20000, 0), ("countdown", "test"): (256, 0),
    ("sudoku", "train"): (20000, 0), ("sudoku", "test"): (500, 0),
    ("humaneval", "test"): (164, 0), ("mbpp", "test"): (500, 0),
}


def _row(content, gt, source="gsm8k", **extra):
  return {"data_source": source, "prompt": [{"role": "user", "content": content}],
          "reward_model": {"ground_truth": gt, "style": "rule"},
          "extra_info": {"split": "train", **extra}}


def _write_jsonl(path: Path, rows) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


# ----------------------------------------------------------------------------- real files


@needs_shared
def test_real_files_counts_and_fields():
  for (task, split), (kept, bad) in REAL_COUNTS.items():
    ex, stats = records.load_examples(task, split, source_dir=DATASETS)
    assert (len(ex), stats.bad) == (kept, bad), (task, split)
    e = records.decode_example(ex[0])
    assert e["task"] == task and e["split"] == split and e["messages"][-1]["content"]
    if task == "countdown":
      assert all(isinstance(x, int) for x in e["extra"]["numbers"])
    if task == "sudoku":
      assert len(e["extra"]["puzzle"]) == 16 and len(e["ground_truth"]) == 16
    if task == "humaneval":
      assert e["extra"]["test_format"] == "check"
      assert e["extra"]["entry_point"] == "has_close_elements"
    if task == "mbpp":
      assert e["extra"]["test_format"] == "asserts"
      assert isinstance(json.loads(e["ground_truth"]), list)
      assert e["messages"][-1]["role"] == "assistant"  # the "[BEGIN]" prefill
  with pytest.raises(records.DataFileError, match="no train files for task 'humaneval'"):
    records.load_examples("humaneval", "train", source_dir=DATASETS)


@needs_shared
def test_real_test_splits_through_tfds_without_tensorflow(tmp_path):
  from bgpo_jax.data import tfds_builder
  for task in ("gsm8k", "math", "countdown", "sudoku", "humaneval", "mbpp"):
    files = records.find_task_files(DATASETS, task, "test")
    src, stats = tfds_builder.tfds_source(task, "test", data_dir=tmp_path,
                                          files={"test": files})
    assert len(src) == REAL_COUNTS[(task, "test")][0] == stats["kept"]
    mem, _ = records.load_examples(task, "test", files=files)
    for i in (0, len(src) // 2, len(src) - 1):  # file order kept: same example, same index
      assert src[i] == mem[i]
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- TFDS build


def _small_dir(tmp_path: Path) -> Path:
  d = tmp_path / "src"
  d.mkdir()
  _write_jsonl(d / "train_gsm8k.jsonl",
               [_row(f"What is {i} + 1?", str(i + 1), index=100 + i) for i in range(7)])
  test = [_row(f"What is {i} * 2?", f"{2 * i:,}") for i in range(600, 605)]
  pq.write_table(pa.Table.from_pylist(test), d / "test_gsm8k-small.parquet")
  return d


def test_tfds_build_and_read_back_from_local_files(tmp_path):
  from bgpo_jax.data import tfds_builder
  src_dir = _small_dir(tmp_path)
  builder = tfds_builder.build_tfds("gsm8k", data_dir=tmp_path / "tfds", source_dir=src_dir)
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
      "train": 7, "test": 5}
  assert any(p.name.startswith("bgpo_prompts-train.array_record")
             for p in Path(builder.data_dir).iterdir())
  train = dataset.TfdsSource(builder.as_data_source(split="train"))
  mem, _ = records.load_examples("gsm8k", "train", source_dir=src_dir)
  assert [train[i] for i in range(7)] == mem
  assert train[3]["index"] == 103 and json.loads(train[3]["prompt_json"])[0]["content"] == (
      "What is 3 + 1?")
  # Reading a built folder needs neither the builder code nor the source files.
  test = tfds_builder.load_prepared(builder.data_dir, "test")
  assert [e["ground_truth"] for e in test.get_many([0, 4])] == ["1,200", "1,208"]
  # Same files -> same config (reused); changed contents -> a new config, not stale data.
  same = tfds_builder.make_config("gsm8k", source_dir=src_dir)
  assert same.name == builder.builder_config.name
  _write_jsonl(src_dir / "train_gsm8k.jsonl", [_row("What is 1 + 1?", "2")])
  rebuilt = tfds_builder.build_tfds("gsm8k", data_dir=tmp_path / "tfds", source_dir=src_dir)
  assert rebuilt.builder_config.name != builder.builder_config.name
  assert rebuilt.info.splits["train"].num_examples == 1
  assert "tensorflow" not in sys.modules


def test_tfds_generated_task_matches_in_memory(tmp_path):
  from bgpo_jax.data import tfds_builder
  gen = {"train": 40, "test": 10, "seed": 3, **procedural.SUDOKU_PRESETS["demo"]}
  builder = tfds_builder.build_tfds("sudoku", data_dir=tmp_path, generate=gen)
  src = dataset.TfdsSource(builder.as_data_source(split="train"))
  mem = procedural.demo_examples("sudoku", "train", n=40, seed=3)
  assert [src[i] for i in range(40)] == mem
  # A TFDS source and the list give the same batches for the same seed and step.
  a = dataset.TaskDataset(src, batch_size=8, seed=1)
  b = dataset.TaskDataset(mem, batch_size=8, seed=1)
  for step in (0, 4, 9):
    assert a.batch(step).examples == b.batch(step).examples


def test_code_training_set_from_user_jsonl(tmp_path):
  from bgpo_jax.data import tfds_builder
  path = _write_jsonl(tmp_path / "my_code.jsonl", [
      {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
      {"prompt": "def sq(x):\n  \"\"\"Square.\"\"\"\n",
       "tests": "def check(candidate):\n  assert candidate(3) == 9\n"},
      {"prompt": "Write neg(x).", "tests": "assert neg(1) == -1\nassert neg(0) == 0"},
      {"prompt": "Write f().", "tests": []},  # bad: no tests
      {"prompt": "", "tests": ["assert True"]},  # bad: empty prompt
  ])
  src, stats = tfds_builder.tfds_source("code", "train", data_dir=tmp_path / "tfds",
                                        files={"train": [path]})
  assert len(src) == 3 and stats["bad"] == 2
  ex = [records.decode_example(src[i]) for i in range(3)]
  assert json.loads(ex[0]["ground_truth"]) == ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
  assert ex[0]["extra"]["test_format"] == "asserts"
  assert ex[1]["extra"] == {"test_format": "check", "entry_point": "sq"}
  assert json.loads(ex[2]["ground_truth"]) == ["assert neg(1) == -1\nassert neg(0) == 0"]


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_counted_reported_and_persisted(tmp_path, caplog):
  from bgpo_jax.data import tfds_builder
  good = _row("Use [1, 2, 3] to make 6", "6", source="countdown", numbers="[1, 2, 3]")
  rows = [good] * 3 + [
      {"data_source": "countdown", "reward_model": {"ground_truth": "6"}},  # no prompt
      _row("   ", "6", source="countdown", numbers="[1, 2, 3]"),  # empty prompt
      _row("x", "6", source="countdown", numbers="1, 2, three"),  # numbers don't parse
      _row("x", "6", source="countdown"),  # numbers missing
      _row("x", "six", source="countdown", numbers="[1, 2]"),  # target not a number
      {"prompt": [{"role": "user", "content": "x"}]},  # no ground truth
      "{not json",
  ]
  d = tmp_path / "src"
  d.mkdir()
  _write_jsonl(d / "train_countdown.jsonl", rows)
  with caplog.at_level(logging.WARNING, logger="bgpo_jax.data.records"):
    ex, stats = records.load_examples("countdown", "train", source_dir=d, max_bad_examples=3)
  assert (stats.total, stats.kept, stats.bad) == (10, 3, 7) and len(ex) == 3
  assert stats.reasons == Counter({"missing": 3, "prompt": 1, "numbers": 1, "ground_truth": 1,
                                   "json": 1})
  assert len(stats.examples) == 3 and stats.examples[0]["where"] == "train_countdown.jsonl:3"
  assert "skipped 7 of 10 rows" in caplog.text
  # mbpp ground truth that is not a JSON list, and a sudoku whose solution breaks its givens.
  _, mbpp = records.normalize_rows(
      [_row("x", "assert f() == 1", source="mbpp"), _row("x", '["assert f() == 1"]')],
      "mbpp", "test")
  assert (mbpp.kept, mbpp.bad) == (1, 1) and "not a JSON list" in mbpp.examples[0]["reason"]
  _, sud = records.normalize_rows(
      [_row("x", "1234341221434321", puzzle="1000000000000000"),
       _row("x", "1234341221434321", puzzle="2000000000000000")], "sudoku", "test")
  assert (sud.kept, sud.bad) == (1, 1)
  # TFDS keeps the stats with the dataset (metadata.json), also when reloaded from disk.
  b = tfds_builder.build_tfds("countdown", data_dir=tmp_path / "tfds", source_dir=d)
  again = tfds_builder.BgpoPrompts(config=b.builder_config, data_dir=tmp_path / "tfds")
  assert tfds_builder.row_stats(again, "train")["bad"] == 7


def test_unreadable_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "train_gsm8k.parquet"
  bad.write_bytes(b"this is not parquet")
  with pytest.raises(records.DataFileError, match="train_gsm8k.parquet"):
    records.load_examples("gsm8k", "train", source_dir=tmp_path)
  with pytest.raises(records.DataFileError, match="nope.jsonl does not exist"):
    records.load_examples("gsm8k", "train", files=[tmp_path / "nope.jsonl"])
  _write_jsonl(tmp_path / "test_gsm8k.jsonl", ["garbage", "more garbage"])
  with pytest.raises(records.DataFileError, match="test_gsm8k.jsonl"):
    records.load_examples("gsm8k", "test", source_dir=tmp_path)
  with pytest.raises(records.DataFileError, match="no train files for task 'math'"):
    records.load_examples("math", "train", source_dir=tmp_path)


def test_invalid_utf8_jsonl_line_is_one_bad_row(tmp_path):
  good = [json.dumps(_row(f"What is {i} + 1?", str(i + 1))).encode() for i in range(3)]
  bad = json.dumps(_row("What is 1 + 1?", "2")).encode().replace(b"What", b"Wh\xe9t")  # Latin-1
  # CRLF line ends and a blank line: the bad row is row 2 of the file's rows but line 4.
  path = tmp_path / "train_gsm8k.jsonl"
  path.write_bytes(b"\r\n".join([good[0], good[1], b"", bad, good[2]]) + b"\r\n")
  ex, stats = records.load_examples("gsm8k", "train", files=[path])
  assert [records.decode_example(e)["ground_truth"] for e in ex] == ["1", "2", "3"]
  assert (stats.total, stats.kept, stats.bad) == (4, 3, 1)
  assert stats.reasons == Counter({"utf8": 1})
  (report,) = stats.examples
  assert report["where"] == "train_gsm8k.jsonl:2"
  assert report["reason"].startswith("utf8: line 4: invalid UTF-8 at byte ")
  # A file with no UTF-8 line at all is still an unreadable file, not rows.
  path.write_bytes(b"\xff\xfe{}\n\xff\n")
  with pytest.raises(records.DataFileError, match="train_gsm8k.jsonl.*utf8: line 1"):
    records.load_examples("gsm8k", "train", files=[path])


def test_invalid_utf8_parquet_cell_is_one_bad_row(tmp_path):
  rows = [_row(f"What is {i} + 1?", str(i + 1)) for i in range(5)]
  table = pa.Table.from_pylist(rows)

  def poison(column, i, new):
    """column with cell i's UTF-8 bytes replaced by `new` (not UTF-8), bypassing validation."""
    raw = column.cast(pa.binary()).to_pylist()
    raw[i] = new
    return pa.array(raw, pa.binary()).view(pa.string())

  column = table.column_names.index
  table = table.set_column(column("data_source"), "data_source",
                           poison(table.column("data_source").combine_chunks(), 1, b"gsm\xff8k"))
  # A nested cell: the message content inside row 3's prompt (list<struct<role, content>>).
  prompt = table.column("prompt").combine_chunks()
  fields = [f.name for f in prompt.type.value_type]
  messages = [prompt.values.field(f) for f in fields]
  messages[fields.index("content")] = poison(messages[fields.index("content")], 3, b"What is 3 \xe2\x28 1?")
  table = table.set_column(column("prompt"), "prompt", pa.ListArray.from_arrays(
      prompt.offsets, pa.StructArray.from_arrays(messages, names=fields)))
  path = tmp_path / "train_gsm8k.parquet"
  pq.write_table(table, path)
  with pytest.raises(UnicodeDecodeError):
    pq.read_table(path).to_pylist()  # what used to reject the whole file
  ex, stats = records.load_examples("gsm8k", "train", files=[path])
  assert [records.decode_example(e)["ground_truth"] for e in ex] == ["1", "3", "5"]
  assert (stats.total, stats.kept, stats.bad) == (5, 3, 2)
  assert stats.reasons == Counter({"utf8": 2})
  assert [e["where"] for e in stats.examples] == ["train_gsm8k.parquet:1", "train_gsm8k.parquet:3"]
  assert stats.examples[0]["reason"].startswith("utf8: column 'data_source': invalid UTF-8 at byte 3")
  assert stats.examples[1]["reason"].startswith("utf8: column 'prompt': invalid UTF-8 at byte ")


# ----------------------------------------------------------------------------- generators


def _safe_eval(expr: str) -> float:
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv}

  def ev(node):
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
      return ops[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    raise ValueError(f"unexpected node in {expr!r}")

  return ev(ast.parse(expr, mode="eval").body)


def _leaves(expr: str) -> list[int]:
  return sorted(n.value for n in ast.walk(ast.parse(expr, mode="eval"))
                if isinstance(n, ast.Constant))


@pytest.mark.parametrize("preset", ["demo", "d1"])
def test_countdown_generator(preset):
  knobs = procedural.COUNTDOWN_PRESETS[preset]
  train = procedural.generate_countdown(600, seed=7, split="train", **knobs)
  test = procedural.generate_countdown(100, seed=7, split="test", **knobs)
  assert train == procedural.generate_countdown(600, seed=7, split="train", **knobs)
  assert train != procedural.generate_countdown(600, seed=8, split="train", **knobs)
  keys = {}
  for split, exs in (("train", train), ("test", test)):
    keys[split] = set()
    for e in map(records.decode_example, exs):
      nums, target = e["extra"]["numbers"], int(e["ground_truth"])
      assert len(nums) == knobs["num_numbers"]
      assert all(knobs["min_number"] <= x <= knobs["max_number"] for x in nums)
      assert knobs["min_target"] <= target <= knobs["max_target"]
      sol = e["extra"]["solution"]  # built by construction: uses each number once
      assert _leaves(sol) == sorted(nums) and abs(_safe_eval(sol) - target) < 1e-9
      assert set(sol) <= set("0123456789()" + knobs["ops"])
      assert procedural.solve_countdown(nums, target, knobs["ops"]) is not None
      keys[split].add(procedural.countdown_key(nums, target))
    assert len(keys[split]) == len(exs)  # unique (as multisets + target)
  assert not keys["train"] & keys["test"]
  # disjoint for any seeds: the split is a hash of the puzzle
  other = procedural.generate_countdown(100, seed=99, split="test", **knobs)
  assert not keys["train"] & {procedural.countdown_key(
      json.loads(e["extra_json"])["numbers"], int(e["ground_truth"])) for e in other}
  if preset == "demo":
    assert max(len(json.loads(e["prompt_json"])[0]["content"]) for e in train) < 40


def test_countdown_solver():
  assert procedural.solve_countdown([2, 3, 4], 5) is not None
  sol = procedural.solve_countdown([3, 7, 8], 29)
  assert _safe_eval(sol) == 29 and _leaves(sol) == [3, 7, 8]
  assert procedural.solve_countdown([1, 1, 1], 100) is None
  assert procedural.solve_countdown([6, 4], 2, ops="+*") is None


@pytest.mark.parametrize("preset", ["demo", "d1"])
def test_sudoku_generator(preset):
  knobs = procedural.SUDOKU_PRESETS[preset]
  grids = procedural.all_sudoku_grids()
  assert grids.shape == (288, 16) and len({g.tobytes() for g in grids}) == 288
  train = procedural.generate_sudoku(800, seed=1, split="train", **knobs)
  test = procedural.generate_sudoku(100, seed=1, split="test", **knobs)
  assert train == procedural.generate_sudoku(800, seed=1, split="train", **knobs)
  puzzles = {}
  for split, exs in (("train", train), ("test", test)):
    ps = [json.loads(e["extra_json"])["puzzle"] for e in exs]
    assert len(set(ps)) == len(ps)
    puzzles[split] = set(ps)
    for e, p in zip(exs, ps):
      sol = e["ground_truth"]
      assert procedural.sudoku_solutions(p) == [sol]  # exactly one solution
      assert knobs["min_blanks"] <= p.count("0") <= knobs["max_blanks"]
      g = np.array(list(sol), int).reshape(4, 4)
      boxes = g.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
      for lines in (g, g.T, boxes):
        assert all(sorted(r) == [1, 2, 3, 4] for r in lines)
      assert all(a == "0" or a == b for a, b in zip(p, sol))
  assert not puzzles["train"] & puzzles["test"]
  assert not puzzles["train"] & {json.loads(e["extra_json"])["puzzle"] for e in
                                 procedural.generate_sudoku(100, seed=5, split="test", **knobs)}
  # a puzzle with two solutions (all blank) is detected, never generated
  assert len(procedural.sudoku_solutions("0" * 16)) == 288
  assert procedural.solve_sudoku("0" * 16) is None


def test_generator_knob_errors():
  with pytest.raises(ValueError, match="found only"):
    procedural.generate_countdown(50, num_numbers=2, min_number=1, max_number=2,
                                  max_target=4, ops="+")
  with pytest.raises(ValueError, match="blanks range"):
    procedural.generate_sudoku(1, min_blanks=0, max_blanks=3)
  with pytest.raises(ValueError, match="ops"):
    procedural.generate_countdown(1, ops="+^")


# ----------------------------------------------------------------------------- order


def test_batch_indices_pure_epochwise_and_resumable():
  n, b = 24, 8
  steps = [order.batch_indices(n, b, 5, s) for s in range(9)]
  order.epoch_permutation.cache_clear()
  assert all((order.batch_indices(n, b, 5, s) == steps[s]).all() for s in range(9))
  for e in range(3):  # each epoch (3 steps) is a permutation, different per epoch
    assert sorted(np.concatenate(steps[3 * e:3 * e + 3])) == list(range(n))
  assert not (np.concatenate(steps[0:3]) == np.concatenate(steps[3:6])).all()
  assert not (order.batch_indices(n, b, 6, 0) == steps[0]).all()
  # batches straddling an epoch boundary (10 does not divide 24) are still pure
  s = order.batch_indices(n, 10, 5, 2)  # positions 20..29: epoch 0 tail + epoch 1 head
  np.testing.assert_array_equal(s[:4], order.epoch_permutation(n, 5, 0)[20:])
  np.testing.assert_array_equal(s[4:], order.epoch_permutation(n, 5, 1)[:6])
  np.testing.assert_array_equal(order.batch_indices(5, 4, 0, 1, shuffle=False), [4, 0, 1, 2])
  # TaskDataset resumed at step 5 sees the batches an uninterrupted run saw
  exs = procedural.demo_examples("countdown", n=30, seed=0)
  run = dataset.TaskDataset(exs, batch_size=4, seed=11)
  full = [run.batch(s).examples for s in range(10)]
  resumed = dataset.TaskDataset(list(exs), batch_size=4, seed=11)
  assert [resumed.batch(s).examples for s in range(5, 10)] == full[5:]


def test_multi_host_shares_disjoint_and_covering():
  n, b, p = 50, 12, 4
  for step in (0, 3, 7):
    shares = [order.batch_indices(n, b, 2, step, process_index=i, process_count=p)
              for i in range(p)]
    assert all(len(s) == b // p for s in shares)
    np.testing.assert_array_equal(np.concatenate(shares), order.batch_indices(n, b, 2, step))
    assert len(set(np.concatenate(shares).tolist())) == b  # disjoint within the step
  with pytest.raises(ValueError, match="not divisible by process_count 4"):
    order.batch_indices(n, 10, 0, 0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index 4"):
    order.batch_indices(n, 12, 0, 0, process_index=4, process_count=4)


# ----------------------------------------------------------------------------- prompts


def test_instructions_chat_template_and_prefill():
  tok = CharTokenizer()
  gsm = records.normalize_rows([_row("What is 2 + 2?", "4")], "gsm8k", "train")[0]
  ds = dataset.TaskDataset(gsm, tok, batch_size=1)
  b = ds.batch(0)
  content = b.messages[0][-1]["content"]
  assert content.startswith("What is 2 + 2?\n") and "<answer></answer>" in content
  assert b.prompt_ids[0] == tok.apply_chat_template(b.messages[0])
  assert b.ground_truth == ["4"] and b.extra[0]["style"] == "rule" and b.tasks == ["gsm8k"]
  ds2 = dataset.TaskDataset(gsm, tok, batch_size=1,
                            instructions={"gsm8k": "Q: {prompt} \\boxed{}"})
  assert ds2.batch(0).messages[0][-1]["content"] == "Q: What is 2 + 2? \\boxed{}"
  with pytest.raises(ValueError, match="placeholder"):
    dataset.TaskDataset(gsm, batch_size=1, instructions={"gsm8k": "no slot"}).batch(0)
  # mbpp-style prefill: rendered turns + generation header, then the prefill text
  msgs = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "[BEGIN]\n"}]
  ids = dataset.encode_prompt(tok, msgs)
  head = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
  assert ids == head + tok.encode("[BEGIN]\n")
  # the demo task's prompt stays short through the char chat template
  demo = dataset.TaskDataset(procedural.demo_examples("sudoku", n=16), tok, batch_size=16)
  assert demo.batch(0).tokens.shape[1] < 64


def test_truncation_policies_count_what_they_cut(caplog):
  tok = CharTokenizer()
  rows = [_row("x" * n, "1") for n in (5, 40, 10, 80)]
  exs, _ = records.normalize_rows(rows, "gsm8k", "train")
  instr = {"gsm8k": "{prompt}"}
  lens = [len(tok.apply_chat_template(json.loads(e["prompt_json"]))) for e in exs]
  limit = lens[0] + 20  # fits the 5- and 10-char prompts only
  left = dataset.TaskDataset(exs, tok, batch_size=4, shuffle=False, instructions=instr,
                             max_prompt_tokens=limit)
  with caplog.at_level(logging.WARNING, logger="bgpo_jax.data.dataset"):
    b = left.batch(0)
  assert b.num_truncated == 2 and b.tokens_cut == (lens[1] - limit) + (lens[3] - limit)
  assert b.tokens.shape == (4, limit) and b.attention_mask.sum() == lens[0] + lens[2] + 2 * limit
  full = tok.apply_chat_template(json.loads(exs[3]["prompt_json"]))
  assert b.prompt_ids[3] == full[-limit:]  # left-truncated: the generation header survives
  assert left.stats["truncated"] == 2 and "left-truncated 2 of 4 prompts" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="bgpo_jax.data.dataset"):
    assert left.batch(1).num_truncated == 2  # counted again, not logged again
  assert left.stats["truncated"] == 4 and "left-truncated" not in caplog.text
  drop = dataset.TaskDataset(exs, tok, batch_size=2, seed=0, instructions=instr,
                             max_prompt_tokens=limit, truncation="drop")
  assert len(drop) == 2 and drop.stats["dropped"] == 2 and drop.stats["dropped_first"] == [1, 3]
  assert sorted(drop.batch(0).indices.tolist()) == [0, 2] and drop.batch(3).num_truncated == 0
  err = dataset.TaskDataset(exs, tok, batch_size=4, shuffle=False, instructions=instr,
                            max_prompt_tokens=limit, truncation="error")
  with pytest.raises(ValueError, match="max_prompt_tokens"):
    err.batch(0)


def test_concat_source_mixes_tasks():
  a = procedural.demo_examples("sudoku", n=5)
  b = procedural.demo_examples("countdown", n=3)
  src = dataset.ConcatSource([dataset.ListSource(a), dataset.ListSource(b)])
  assert len(src) == 8 and src[4] == a[4] and src[5] == b[0] and src[7] == b[2]
  tasks = Counter(dataset.TaskDataset(src, batch_size=8).batch(0).tasks)
  assert tasks == {"sudoku": 5, "countdown": 3}


def test_reward_inputs_grade_with_rewards_module():
  rewards = pytest.importorskip("bgpo_jax.rewards")
  rows = [{"prompt": "def sq(x):\n  \"\"\"Square.\"\"\"\n",
           "tests": "def check(candidate):\n  assert candidate(3) == 9\n"},
          {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]}]
  exs, _ = records.normalize_rows(rows, "code", "train")
  b = dataset.TaskDataset(exs, batch_size=2, shuffle=False).batch(0)
  tasks, gts, extras = b.reward_inputs()
  assert tasks == ["humaneval", "mbpp"] and extras[0]["prompt"] == b.messages[0]
  good = ["```python\ndef sq(x):\n  return x * x\n```",
          "```python\ndef add(a, b):\n  return a + b\n```"]
  assert [rewards.score(t, c, g, x) for t, c, g, x in zip(tasks, good, gts, extras)] == [1.0, 1.0]
  cd = procedural.demo_examples("countdown", n=4)
  cb = dataset.TaskDataset(cd, batch_size=4, shuffle=False).batch(0)
  t, g, x = cb.reward_inputs()
  sols = [f"<answer>{e['solution']}</answer>" for e in x]
  assert [rewards.score(*a) for a in zip(t, sols, g, x)] == [1.0] * 4


# ----------------------------------------------------------------------------- evaluation rows


@pytest.mark.parametrize("rows", [1319, 500, 164, 12, 16, 1])
def test_eval_batches_pad_the_last_batch_and_cover_every_row_once(rows):
  plan = order.eval_batches(rows, 16)
  assert all(len(r) == 16 and len(v) == 16 for r, v in plan)  # one shape: one program, any mesh
  assert len(plan) == -(-rows // 16)
  real = np.concatenate([r[v] for r, v in plan])
  np.testing.assert_array_equal(real, np.arange(rows))  # every row once, in order
  pad_rows, pad_valid = plan[-1]
  assert (~pad_valid).sum() == (-rows) % 16
  assert np.all(pad_rows[~pad_valid] == rows - 1)  # padding repeats a real row (valid ids, any task)
  # Split over processes: contiguous slices of the same global batches.
  halves = [order.eval_batches(rows, 16, process_index=p, process_count=2) for p in (0, 1)]
  for k, (r, v) in enumerate(plan):
    np.testing.assert_array_equal(np.concatenate([halves[0][k][0], halves[1][k][0]]), r)
    np.testing.assert_array_equal(np.concatenate([halves[0][k][1], halves[1][k][1]]), v)
  with pytest.raises(ValueError, match="multiple of process_count"):
    order.eval_batches(rows, 15, process_count=2)


class _AnswerSampler:
  """Stands in for a RolloutSampler: answers each prompt with its example's ground truth and
  records the batch sizes it was called with."""

  def __init__(self, tok, answers: dict):
    self.tok, self.answers, self.calls = tok, answers, []

  def inference_params(self, params):
    return params

  def sample_ids(self, params, ids, rng):
    import types
    self.calls.append(len(ids))
    return types.SimpleNamespace(completions=[f"<answer>{self.answers[tuple(i)]}</answer>" for i in ids])


def test_evaluate_pads_batches_scores_only_real_rows_and_walks_the_kept_examples():
  """tasks.evaluate on 7 examples (2 dropped as too long) with eval batch 4: every sampler call
  gets 4 rows, the 5 kept examples are each scored once, in order, the dropped ones never."""
  import jax
  from bgpo_jax import tasks as tasks_lib
  tok = CharTokenizer()
  lengths = (5, 90, 10, 12, 90, 7, 9)
  rows = [_row("x" * n, str(k)) for k, n in enumerate(lengths)]
  exs, _ = records.normalize_rows(rows, "gsm8k", "test")
  instr = {"gsm8k": "{prompt}"}
  limit = len(tok.apply_chat_template([{"role": "user", "content": "x" * 20}]))
  ds = dataset.TaskDataset(exs, tok, batch_size=1, shuffle=False, instructions=instr,
                           max_prompt_tokens=limit, truncation="drop")
  kept = [k for k, n in enumerate(lengths) if n < 20]
  assert len(ds) == 5 and ds.dropped == [1, 4]
  answers = {tuple(ds.prompt_ids(ds.example(k))): str(k) for k in kept}
  sampler = _AnswerSampler(tok, answers)
  task = tasks_lib.Task("gsm8k", tok, None, {"gsm8k": ds}, {})
  out: list = []
  res = tasks_lib.evaluate(sampler, task, None, rng=jax.random.key(0), batch_size=4, records=out)
  assert sampler.calls == [4, 4]
  assert [r["index"] for r in out] == [exs[k]["index"] for k in kept]
  assert [r["ground_truth"] for r in out] == [str(k) for k in kept]
  assert res["eval/gsm8k/num_examples"] == 5 and res["eval/accuracy"] == 1.0
  # num_examples cuts the split; the cut is padded too.
  sampler.calls.clear()
  res = tasks_lib.evaluate(sampler, task, None, rng=jax.random.key(0), num_examples=3, batch_size=4)
  assert sampler.calls == [4] and res["eval/gsm8k/num_examples"] == 3


# ----------------------------------------------------------------------------- task registry


@pytest.fixture
def own_registry(monkeypatch):
  """The task registry with the built-in specs, restored after the test."""
  from bgpo_jax.tasks import registry
  registry.names()  # the built-in specs in first
  monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
  return registry


def _echo_spec(registry):
  """A task of one spec: repeat the word in the prompt (rows check, grader, SFT target)."""
  def check_row(answer, extra):
    if not answer.isalpha():
      raise records.BadRow(f"ground_truth: not a word: {answer!r}")
    return extra

  def grade(completion, answer, extra, *, recipe, **_):
    ok = completion.strip() == answer
    loose = answer in completion
    return ok, float(ok), 1.0 if ok else (0.5 if loose and recipe == "loose" else 0.0)

  return registry.TaskSpec(
      name="echo", stems={"test": ("echo_eval",)}, check_row=check_row,
      instruction="Repeat: {prompt}", grade=grade, recipes=("strict", "loose"),
      train_on=("echo",), eval_sets=("echo",), sft_target=lambda ex: ex["ground_truth"])


def test_a_registered_task_flows_through_data_rewards_and_config(own_registry, tmp_path):
  from bgpo_jax import config as config_lib
  from bgpo_jax import rewards
  from bgpo_jax import tasks as tasks_lib
  registry = own_registry
  registry.register(_echo_spec(registry))
  assert "echo" in registry.names("train") and "echo" in rewards.graders()
  # rows: the spec's check and file stems
  exs, stats = records.normalize_rows([_row("cat", "cat"), _row("dog", "d0g")], "echo", "train")
  assert len(exs) == 1 and stats.reasons == Counter({"ground_truth": 1})
  _write_jsonl(tmp_path / "test_echo_eval.jsonl", [_row("owl", "owl")])
  assert [p.name for p in records.find_task_files(tmp_path, "echo", "test")] == ["test_echo_eval.jsonl"]
  # prompts: the spec's instruction; rewards: its grader, recipes and the default format score
  ex = dataset.TaskDataset(exs, batch_size=1).example(0)
  assert ex["messages"][-1]["content"] == "Repeat: cat"
  graders, truths, extras = dataset.reward_inputs([ex])
  assert graders == ["echo"] and rewards.grade("echo", "cat", "cat").correct
  assert rewards.grade("echo", "a cat", "cat", recipes={"echo": "loose"}).reward == 0.5
  assert rewards.grade("echo", "a cat", "cat").reward == 0.0  # the default recipe: strict
  assert rewards.format_score("echo", "<answer>cat</answer>") == 0.5
  assert tasks_lib.sft_target(ex) == "cat"
  # config: a train task and an eval set, with d1's default mu
  c = config_lib.base_config()
  c.task.name, c.task.eval_tasks, c.task.data_dir = "echo", "echo,gsm8k", str(tmp_path)
  c.tokenizer.kind = "char"
  config_lib.validate(c, data_parallel_size=1)
  assert config_lib.d1_diffu_grpo(c).rl.updates_per_batch == 12


def test_registry_errors_name_the_known_tasks(own_registry):
  registry = own_registry
  with pytest.raises(ValueError, match=r"unknown task 'chess'; known tasks: gsm8k, math, .*code"):
    registry.get("chess")
  with pytest.raises(ValueError, match="'gsm8k' is already registered"):
    registry.register(registry.TaskSpec(name="gsm8k"))
  with pytest.raises(ValueError, match="lacks the '{prompt}' placeholder"):
    registry.register(registry.TaskSpec(name="bad", instruction="Answer."))
  spec = registry.register(dataclasses.replace(registry.get("gsm8k"), instruction="Q: {prompt}"),
                           replace=True)
  assert dataset.default_instruction("gsm8k") == spec.instruction == "Q: {prompt}"
  with pytest.raises(ValueError, match="unknown task 'chess'; expected one of"):
    records.load_examples("chess", "train", source_dir=".")
