"""Task rewards (SPEC section 5): extraction edge cases per task, and real dataset rows."""

import concurrent.futures
import itertools
import json
import threading
import time
import types
from pathlib import Path

import pytest

from bgpo_jax import rewards
from bgpo_jax.rewards import code as code_rewards
from bgpo_jax.rewards.countdown import evaluate, parse_numbers
from bgpo_jax.rewards.extract import answer_tag, boxed_all, code_blocks, last_boxed
from bgpo_jax.rewards.math_reward import MathVerifier, math_reward
from bgpo_jax.rewards.sudoku import extract_grid

DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _rows(name: str):
  if not (DATA / name).exists():
    pytest.skip(f"{DATA / name} not found (shared datasets live beside the repo)")
  import pyarrow.parquet as pq  # a runtime dependency; pandas is not
  return [types.SimpleNamespace(**r) for r in pq.read_table(DATA / name).to_pylist()]


# ----------------------------------------------------------------------------- dispatch


def test_unknown_task_lists_known_tasks():
  with pytest.raises(ValueError, match="unknown reward task 'chess'.*gsm8k.*mbpp"):
    rewards.score("chess", "x", "y")
  with pytest.raises(ValueError, match="unknown reward task"):
    rewards.score_batch(["gsm8k", "poetry"], ["1", "2"], ["1", "2"])


def test_batch_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="batch lengths differ"):
    rewards.score_batch("gsm8k", ["1", "2"], ["1"])


# ----------------------------------------------------------------------------- extraction


def test_answer_tag_and_boxed_extraction():
  assert answer_tag("a <answer> 5 </answer> b <answer>7</answer>") == "7"
  assert answer_tag("x <answer>12 and then cut") == "12 and then cut"
  assert answer_tag("no tags") is None
  assert boxed_all(r"\boxed{\frac{1}{2}} and \boxed{\{1,2\}} and \boxed 5") == [
      r"\frac{1}{2}", r"\{1,2\}", "5"]
  assert last_boxed(r"\boxed{a^{2}} then \fbox{b}") == "b"
  assert last_boxed(r"\boxed{unbalanced") is None
  blocks = code_blocks("t\n```python\nx = 1\n```\n```bash\nls\n```\n```\ny = 2\n")
  assert blocks == ["x = 1\n", "y = 2\n"]


# ----------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize("completion,truth,expected", [
    ("<answer>1,234</answer>", "1234", 1.0),           # thousands separator in the answer
    ("<answer>1234</answer>", "1,234", 1.0),           # ... or in the ground truth
    ("<answer>She pays $1,234.00 in total.</answer>", "1234", 1.0),  # "$", decimals, text
    ("<answer>The temperature drops to -5 degrees.</answer>", "-5", 1.0),
    ("<answer>-5</answer>", "5", 0.0),
    ("<answer>18 eggs per day</answer>", "18", 1.0),   # units after the number
    ("<answer>18</answer> next year she will have 20", "18", 1.0),  # the tag wins
    (r"so \boxed{5.0} then 7 more", "5", 1.0),        # boxed beats later text, 5.0 == 5
    ("first 3 then 4 then 72", "72", 0.0),             # no box, no tag: no answer (d1)
    ("<answer>first 3 then 4 then 72</answer>", "72", 1.0),  # last number of the answer
    ("<answer>pages 5-6</answer>", "6", 1.0),          # a range, not -6
    ("<answer>no numbers here</answer>", "3", 0.0),
    (r"<answer>\boxed{12} apples, 3 left</answer>", "12", 1.0),  # the box inside the tag
    (r"<answer>\boxed{}101</answer>", "101", 1.0),    # an empty box: the tag's number
    (r"<answer>\boxed{20}</answer><|eot_id|>\boxed{0}<|eot_id|>", "20", 1.0),  # after EOS: ignored
    ("<answer>\n\\boxed{36>", "36", 1.0),          # an answer tag cut off by the length
    ("<answer>0.5</answer>", "0.50", 1.0),
    ("<answer>1,234,567</answer>", "1234567", 1.0),
])
def test_gsm8k(completion, truth, expected):
  assert rewards.score("gsm8k", completion, truth) == expected


def test_gsm8k_real_rows():
  rows = _rows("test_gsm8k.parquet")[:50]
  for rm in (r.reward_model for r in rows):
    gt = rm["ground_truth"]
    value = int(gt.replace(",", ""))
    assert rewards.score("gsm8k", f"<reasoning>...</reasoning><answer>{gt}</answer>", gt) == 1.0
    assert rewards.score("gsm8k", f"The answer is \\boxed{{{value:,}}} dollars.", gt) == 1.0
    assert rewards.score("gsm8k", f"The answer is {value:,} dollars.", gt) == 0.0  # no box/tag
    assert rewards.score("gsm8k", f"<answer>{value + 1}</answer>", gt) == 0.0


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("completion,truth,expected", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0),
    (r"first \boxed{3}, no wait: \boxed{5}", "5", 1.0),   # several boxes: the last wins
    (r"first \boxed{3}, no wait: \boxed{5}", "3", 0.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{7}", r"\sqrt{51}", 0.0),
    (r"<answer>$\frac{14}{3}$</answer>", r"\frac{14}{3}", 1.0),
    ("the answer is 5", "5", 0.0),                        # neither box nor answer tag
    (r"\boxed{}", "5", 0.0),
])
def test_math(completion, truth, expected):
  assert rewards.score("math", completion, truth) == expected


def test_math_works_in_worker_threads():
  # math-verify's own timeouts use signal.alarm (main thread only); ours must not.
  with concurrent.futures.ThreadPoolExecutor(2) as ex:
    fut = ex.submit(rewards.score, "math500", r"\boxed{\frac{2}{4}}", "0.5")
    assert fut.result(timeout=120) == 1.0
  assert threading.current_thread() is threading.main_thread()


def test_math_verifier_hard_timeout_and_restart(tmp_path):
  # A worker that never answers: the caller gives up after its deadline, kills it, restarts.
  script = tmp_path / "hang.py"
  script.write_text("import sys, time, json\nprint(json.dumps({'ready': True}), flush=True)\n"
                    "for line in sys.stdin:\n  time.sleep(1000)\n")
  v = MathVerifier(timeout_s=0.3, worker_script=str(script))
  try:
    t0 = time.monotonic()
    assert v.equivalent("1", "2") is False
    assert time.monotonic() - t0 < 10.0
    first = list(v._all)
    assert v.equivalent("1", "2") is False
    assert first == [] or first[0] not in v._all  # the stuck worker was replaced
  finally:
    v.close()
  # No worker at all (math-verify missing): only number / string equality remains.
  broken = tmp_path / "broken.py"
  broken.write_text("raise SystemExit(3)\n")
  v = MathVerifier(worker_script=str(broken))
  try:
    assert v.equivalent("1", "2") is None
    assert math_reward(r"\boxed{\frac{1}{2}}", "0.5", v) == 0.0
    assert math_reward(r"\boxed{0.50}", "0.5", v) == 1.0
  finally:
    v.close()


def test_math500_real_rows():
  rows = _rows("test_math500.parquet")[:12]
  truths = [r.reward_model["ground_truth"] for r in rows]
  completions = [f"<reasoning>work</reasoning><answer>\\boxed{{{t}}}</answer>" for t in truths]
  assert rewards.score_batch("math500", completions, truths) == [1.0] * len(truths)
  wrong = [r"\boxed{123456789}"] * len(truths)
  assert rewards.score_batch("math500", wrong, truths) == [0.0] * len(truths)


# ----------------------------------------------------------------------------- countdown

NUMS = "[30, 100, 93]"


@pytest.mark.parametrize("completion,target,numbers,expected", [
    ("<answer>100 - 93 + 30</answer>", "37", NUMS, 1.0),
    ("<answer>\n(100 - 93) * 30\n</answer>", "210", NUMS, 1.0),
    ("<answer>30 + 93 - 100 = 23</answer>", "23", NUMS, 1.0),   # trailing "= target"
    ("<answer>30 \\times (100 - 93)</answer>", "210", [30, 100, 93], 1.0),
    ("<answer>-(30 - 100) + 93</answer>", "163", NUMS, 1.0),     # unary minus
    ("<answer>100 / 4 + 30 - 93</answer>", "-38", "[100, 4, 30, 93]", 1.0),
    ("<answer>100 - 93 + 30 + 30</answer>", "67", NUMS, 0.0),    # 30 reused
    ("<answer>100 - 93</answer>", "7", NUMS, 0.0),               # 30 missing
    ("<answer>100 - 93 + 31</answer>", "38", NUMS, 0.0),         # a number not given
    ("<answer>100 - 93 + 30</answer>", "38", NUMS, 0.0),         # wrong value
    ("<answer>30 ** 2 - 100 - 93</answer>", "707", NUMS, 0.0),   # power
    ("<answer>abs(30 - 100) + 93</answer>", "163", NUMS, 0.0),   # call
    ("<answer>100 % 93 + 30</answer>", "37", NUMS, 0.0),         # modulo
    ("<answer>__import__('os')</answer>", "37", NUMS, 0.0),
    ("<answer>100.0 - 93 + 30</answer>", "37", NUMS, 0.0),       # float literal
    ("<answer>30 / (5 - 5)</answer>", "1", "[30, 5, 5]", 0.0),   # division by zero
    ("<answer>30 = 30 + 100 - 93</answer>", "37", NUMS, 0.0),    # "=" not a trailing target
    ("reasoning...\n100 - 93 + 30\n", "37", NUMS, 1.0),          # no tag: last expression line
    ("no expression at all", "37", NUMS, 0.0),
    ("<answer>" + "1+" * 300 + "1</answer>", "301", NUMS, 0.0),  # over the length cap
])
def test_countdown(completion, target, numbers, expected):
  extra = {"numbers": numbers}
  g = rewards.grade("countdown", completion, target, extra)
  assert g.correct == bool(expected) and g.score == expected
  # d1 / TinyZero recipe (the default): 0.1 for a wrong answer in an answer tag or box.
  formed = "<answer>" in completion or "\\boxed" in completion
  assert g.reward == (1.0 if expected else 0.1 if formed else 0.0)
  assert rewards.score("countdown", completion, target, extra,
                       recipes={"countdown": "binary"}) == expected


def test_countdown_evaluate_is_exact_and_safe():
  value, used = evaluate("(100 - 93) / 3 * 3")
  assert value == 7 and used == [100, 93, 3, 3]
  for bad in ("().__class__", "[1, 2]", "1 if 1 else 2", "x + 1", "2 ** 1000000", "1 < 2"):
    assert evaluate(bad) is None, bad
  assert parse_numbers("[30, 100, 93]") == [30, 100, 93]
  with pytest.raises(ValueError, match="countdown needs extra"):
    rewards.score("countdown", "<answer>1</answer>", "1", {})


def _solve_countdown(numbers, target):
  for perm in itertools.permutations(numbers):
    for o1, o2 in itertools.product("+-*/", repeat=2):
      for expr in (f"({perm[0]} {o1} {perm[1]}) {o2} {perm[2]}",
                   f"{perm[0]} {o1} ({perm[1]} {o2} {perm[2]})"):
        res = evaluate(expr)
        if res is not None and abs(float(res[0]) - target) < 1e-5:
          return expr
  return None


def test_countdown_real_rows():
  rows = _rows("test_countdown.parquet")[:30]
  solved = 0
  for rm, extra in ((r.reward_model, r.extra_info) for r in rows):
    expr = _solve_countdown(parse_numbers(extra["numbers"]), float(rm["ground_truth"]))
    if expr is None:
      continue
    solved += 1
    assert rewards.score("countdown", f"<answer>{expr}</answer>", rm["ground_truth"],
                         dict(extra)) == 1.0
    wrong = rewards.grade("countdown", f"<answer>{expr} + 1</answer>", rm["ground_truth"],
                          dict(extra))
    assert not wrong.correct and wrong.reward == pytest.approx(0.1)
  assert solved >= 20


# ----------------------------------------------------------------------------- sudoku

PUZZLE = "3102200002100320"
SOLUTION = "3142243142131324"


@pytest.mark.parametrize("completion,expected", [
    (f"<answer>\n{SOLUTION}\n</answer>", 1.0),
    (f"The solved grid is {SOLUTION}, done.", 1.0),                  # surrounded by text
    ("<answer>3 1 4 2\n2 4 3 1\n4 2 1 3\n1 3 2 4</answer>", 1.0),      # spaces / newlines
    ("<answer>3,1,4,2 | 2,4,3,1 | 4,2,1,3 | 1,3,2,4</answer>", 1.0),  # commas and bars
    (f"Puzzle {PUZZLE} -> answer\n<answer>{SOLUTION}</answer>", 1.0),
    (f"<answer>{PUZZLE}</answer>", 0.0),                              # nothing filled in
    ("<answer>3112243142131323</answer>", 6 / 8),                     # 2 of 8 empty cells wrong
    ("<answer>4142243142131324</answer>", 1.0),   # a given cell changed: only empty cells count
    ("<answer>314224</answer>", 2 / 8),            # short: padded with "0" as in d1
    ("<answer>31422431421313241111</answer>", 1.0),   # long: cut to the first 16
    ("no digits", 0.0),
])
def test_sudoku(completion, expected):
  assert rewards.score("sudoku", completion, SOLUTION, {"puzzle": PUZZLE}) == pytest.approx(expected)


def test_sudoku_extract_and_errors():
  assert extract_grid(f"first 1234 then {SOLUTION} end") == SOLUTION
  with pytest.raises(ValueError, match="16 digits"):
    rewards.score("sudoku", SOLUTION, "123", {"puzzle": PUZZLE})


def test_sudoku_real_rows():
  rows = _rows("test_sudoku.parquet")[:40]
  for rm, extra in ((r.reward_model, r.extra_info) for r in rows):
    sol, puzzle = rm["ground_truth"], extra["puzzle"]
    assert rewards.score("sudoku", f"<answer>{sol}</answer>", sol, dict(extra)) == 1.0
    assert rewards.score("sudoku", f"<answer>{puzzle}</answer>", sol, dict(extra)) == 0.0


# ----------------------------------------------------------------------------- format


def test_format_score_and_bonus():
  good = "<reasoning>think</reasoning>\n<answer>18</answer>"
  assert rewards.format_score("gsm8k", good) == 1.0
  assert rewards.format_score("gsm8k", "<answer>18</answer>") == 0.5
  assert rewards.format_score("gsm8k", "18") == 0.0
  assert rewards.format_score("math", "<reasoning>r</reasoning><answer>\\boxed{2}</answer>") == 1.0
  assert rewards.format_score("math", "<reasoning>r</reasoning><answer>2</answer>") == 0.5
  assert rewards.format_score("humaneval", "```python\npass\n```") == 1.0
  assert rewards.format_score("mbpp", "def f(): pass\n[DONE]") == 1.0
  assert rewards.score("gsm8k", good, "18", format_reward=0.1) == pytest.approx(1.1)
  assert rewards.score("gsm8k", "<answer>17</answer>", "18", format_reward=0.1) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- code

HE_SOLUTIONS = {
    "has_close_elements": (
        "Here you go:\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    for i, a in enumerate(numbers):\n"
        "        for b in numbers[i + 1:]:\n"
        "            if abs(a - b) < threshold:\n"
        "                return True\n"
        "    return False\n```\nThis checks all pairs."),
    "truncate_number": "    return number % 1.0\n",  # body-only continuation of the prompt
    "filter_by_substring": (
        "```python\ndef filter_by_substring(strings, substring):\n"
        "    return [s for s in strings if substring in s]\n```"),
    "strlen": "```python\ndef strlen(string: str) -> int:\n    return len(string)\n```",
}
HE_WRONG = {
    "has_close_elements": "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",
    "truncate_number": "    return number\n",
    "filter_by_substring": "```python\ndef filter_by_substring(strings, substring):\n    return strings\n```",
    "strlen": "```python\ndef strlen(string):\n    import sys\n    sys.exit(0)\n```",
}
MBPP_SOLUTIONS = {
    "remove_Occ": (
        "[BEGIN]\n 'def remove_Occ(s, ch):\r\n    i = s.find(ch)\r\n    if i >= 0:\r\n"
        "        s = s[:i] + s[i + 1:]\r\n    j = s.rfind(ch)\r\n    if j >= 0:\r\n"
        "        s = s[:j] + s[j + 1:]\r\n    return s' \n[DONE]"),
    "sort_matrix": "```python\ndef sort_matrix(M):\n    return sorted(M, key=sum)\n```",
    "find_Volume": "def find_Volume(l, b, h):\n    return (l * b * h) / 2\n",
}
MBPP_WRONG = {
    "remove_Occ": "[BEGIN]\n 'def remove_Occ(s, ch):\r\n    return s[1:-1]' \n[DONE]",
    "sort_matrix": "```python\ndef sort_matrix(M):\n    return M\n```",
    "find_Volume": "def find_Volume(l, b, h):\n    while True:\n        pass\n",
}


def _find(rows, needle_of_row):
  out = {}
  for row in rows:
    key = needle_of_row(row)
    if key:
      out.setdefault(key, row)
  return out


@pytest.fixture(scope="module")
def code_rows():
  he = _rows("test_humaneval.parquet")
  mb = _rows("test_mbpp.parquet")
  he_rows = _find(he, lambda r: next((n for n in HE_SOLUTIONS
                                      if f"def {n}(" in r.prompt[-1]["content"]), None))
  mb_rows = _find(mb, lambda r: next((n for n in MBPP_SOLUTIONS
                                      if f"assert {n}(" in r.reward_model["ground_truth"]), None))
  assert set(he_rows) == set(HE_SOLUTIONS) and set(mb_rows) == set(MBPP_SOLUTIONS)
  tasks, comps, truths, extras, expected = [], [], [], [], []
  for name, row in he_rows.items():
    extra = {**row.extra_info, "prompt": list(row.prompt)}
    for comp, exp in ((HE_SOLUTIONS[name], 1.0), (HE_WRONG[name], 0.0)):
      tasks.append("humaneval"); comps.append(comp); extras.append(extra)
      truths.append(row.reward_model["ground_truth"]); expected.append(exp)
  for name, row in mb_rows.items():
    for comp, exp in ((MBPP_SOLUTIONS[name], 1.0), (MBPP_WRONG[name], 0.0)):
      tasks.append("mbpp"); comps.append(comp); extras.append(dict(row.extra_info))
      truths.append(row.reward_model["ground_truth"]); expected.append(exp)
  return tasks, comps, truths, extras, expected


def test_code_real_rows_batch(code_rows):
  tasks, comps, truths, extras, expected = code_rows
  with rewards.SandboxPool(max_workers=4) as pool:
    got = rewards.score_batch(tasks, comps, truths, extras, pool=pool, code_timeout_s=3.0)
  assert got == expected, [(t, c[:40], g, e) for t, c, g, e in zip(tasks, comps, got, expected)
                           if g != e]


def test_submit_batch_mixed_tasks_is_a_future(code_rows):
  tasks, comps, truths, extras, expected = code_rows
  tasks = list(tasks[:2]) + ["gsm8k", "sudoku"]
  comps = list(comps[:2]) + ["<answer>7</answer>", f"<answer>{SOLUTION}</answer>"]
  truths = list(truths[:2]) + ["7", SOLUTION]
  extras = list(extras[:2]) + [None, {"puzzle": PUZZLE}]
  fut = rewards.submit_batch(tasks, comps, truths, extras, code_timeout_s=3.0)
  assert isinstance(fut, concurrent.futures.Future)
  assert fut.result(timeout=60) == list(expected[:2]) + [1.0, 1.0]


def test_code_solution_is_judged_apart_from_its_tests():
  # An unterminated string in the completion is the solution's own syntax error.
  v = rewards.code_result("mbpp", "def f(x):\n    return 2\ns = '''", json.dumps(["assert f(1) == 2"]))
  assert not v.passed and "SyntaxError" in v.detail, v
  # `if __name__ == "__main__"` demo blocks in completions do not run (stdin is closed).
  ok = rewards.code_result("mbpp", "def f(x):\n    return 2\nif __name__ == '__main__':\n"
                           "    f(int(input()))\n", json.dumps(["assert f(1) == 2"]))
  assert ok.passed and ok.status == "passed", ok


def test_code_extraction_rules():
  text = "```python\ndef helper():\n    pass\n```\n```python\ndef target(x):\n    return x\n```\n```python\nprint(target(1))\n```"
  assert code_rewards.extract_code(text, "target").startswith("def target")
  assert code_rewards.extract_code("```\nshort\n```\n```\nmuch longer block\n```") == "much longer block\n"
  assert code_rewards.extract_code("[BEGIN]\n 'def f(): pass' \n[DONE]") == "def f(): pass"
  assert code_rewards.entry_point_of("def a():\n  pass\ndef b():\n  pass\n") == "b"
  with pytest.raises(ValueError, match="entry_point"):
    code_rewards.humaneval_case("print(1)", "def check(c): pass", {})
