"""The built-in tasks, one TaskSpec each: GSM8K, MATH (and its MATH500 test set), countdown,
4x4 sudoku, sudoku4 (generated only: four 4x4 sudokus in one 64-digit answer), HumanEval,
MBPP and user code sets ("code").

Each spec joins the task's pieces; the work stays where it is done for every task: reading rows
in data.records, generating puzzles in data.procedural, checking answers in rewards/. What is
here is only what differs between tasks: a row check, a grader, a format score, an SFT target.
The registry imports this module on its first lookup.
"""

from __future__ import annotations

import functools
import re

from bgpo_jax import rewards
from bgpo_jax.data import procedural, records
from bgpo_jax.rewards.code import code_case
from bgpo_jax.rewards.countdown import FORMAT_SCORE as COUNTDOWN_FORMAT_SCORE
from bgpo_jax.rewards.countdown import RECIPES as COUNTDOWN_RECIPES
from bgpo_jax.rewards.countdown import countdown_grade
from bgpo_jax.rewards.extract import answer_tag, code_blocks, last_boxed
from bgpo_jax.rewards.math_reward import gsm8k_reward, math_reward
from bgpo_jax.rewards.sudoku4 import sudoku4_grade
from bgpo_jax.rewards.sudoku import RECIPES as SUDOKU_RECIPES
from bgpo_jax.rewards.sudoku import sudoku_grade
from bgpo_jax.tasks.registry import TaskSpec, register

# ----------------------------------------------------------------------------- math (answers)


def _check_number(answer: str, extra: dict) -> dict:
  records.parse_number(answer)
  return extra


def _grade_gsm8k(completion, answer, extra, **_):
  ok = bool(gsm8k_reward(completion, answer))
  return ok, float(ok), float(ok)


def _grade_math(completion, answer, extra, *, verifier=None, **_):
  ok = bool(math_reward(completion, answer, verifier))
  return ok, float(ok), float(ok)


def _boxed_answer_format(completion: str) -> float:
  """d1's layout with a \\boxed{} inside the answer tag: 1.0; a tag or a box alone: 0.5."""
  tag = answer_tag(completion)
  if rewards.has_answer_layout(completion) and tag is not None and last_boxed(tag) is not None:
    return 1.0
  return 0.5 if (tag is not None or last_boxed(completion) is not None) else 0.0


def _boxed_target(ex: dict) -> str:
  return f"<answer>\\boxed{{{ex['ground_truth']}}}</answer>"


# The gsm8k / math rows ask a plain question: the answer format comes from the instruction.
_GSM8K_INSTRUCTION = ("{prompt}\nThink step by step, then write only the final number inside "
                      "<answer></answer>.")
_MATH_INSTRUCTION = "{prompt}\nThink step by step, then write the final answer inside \\boxed{}."
_MATH = dict(grade=_grade_math, format_score=_boxed_answer_format, sft_target=_boxed_target)

# ----------------------------------------------------------------------------- countdown


def _check_countdown(target: str, extra: dict) -> dict:
  if "numbers" not in extra:
    raise records.BadRow("missing: extra_info.numbers")
  extra["numbers"] = records.parse_numbers(extra["numbers"])
  if records.parse_number(target) != int(records.parse_number(target)):
    raise records.BadRow(f"ground_truth: countdown target {target!r} is not an integer")
  return extra


def _grade_countdown(completion, target, extra, *, recipe, **_):
  if "numbers" not in extra:
    raise ValueError("countdown needs extra['numbers'] (e.g. '[30, 100, 93]')")
  ok, formed = countdown_grade(completion, target, extra["numbers"])
  # "d1" (TinyZero's): a well-formed wrong answer earns a little; "binary": nothing.
  reward = 1.0 if ok else (COUNTDOWN_FORMAT_SCORE if formed and recipe == "d1" else 0.0)
  return ok, float(ok), reward


def _countdown_target(ex: dict) -> str:
  extra = ex["extra"]
  sol = extra.get("solution") or procedural.solve_countdown(extra["numbers"],
                                                            int(float(ex["ground_truth"])))
  if sol is None:
    raise ValueError(f"countdown example {ex.get('index')} has no solution to train on")
  return str(sol)


def _countdown_from_question(target, question: str, extra: dict):
  """d1's rows: the target may come as [numbers, target]; else the numbers are in the text."""
  if isinstance(target, (list, tuple)) and len(target) == 2:
    extra.setdefault("numbers", list(target[0]))
    target = target[1]
  if "numbers" not in extra:
    m = (re.search(r"Numbers:\s*\[([\d,\s]+)\]", question, re.I)
         or re.search(r"\[([\d,\s]+)\]", question))
    numbers = [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []
    if numbers:
      extra["numbers"] = numbers
  return target, extra


# ----------------------------------------------------------------------------- sudoku

def _sudoku_row_check(cells: int):
  """The row check of a sudoku task whose puzzle and solution are `cells` digits (0 = blank)."""
  puzzle_re, solution_re = re.compile(rf"^[0-4]{{{cells}}}$"), re.compile(rf"^[1-4]{{{cells}}}$")

  def check(solution: str, extra: dict) -> dict:
    puzzle = str(extra.get("puzzle", ""))
    if not puzzle_re.match(puzzle):
      raise records.BadRow(f"puzzle: expected {cells} digits 0-4, got {puzzle[:20]!r}")
    if not solution_re.match(solution):
      raise records.BadRow(f"ground_truth: expected {cells} digits 1-4, got {solution[:20]!r}")
    if any(p != "0" and p != s for p, s in zip(puzzle, solution)):
      raise records.BadRow("ground_truth: solution contradicts the puzzle's givens")
    return extra
  return check


_check_sudoku = _sudoku_row_check(16)


def _grade_sudoku(completion, solution, extra, *, recipe, **_):
  ok, frac = sudoku_grade(completion, solution, extra.get("puzzle"))
  return ok, frac, frac if recipe == "fraction" else float(ok)


def _sudoku_target(ex: dict) -> str:
  return str(ex["ground_truth"])


def _sudoku_from_question(solution, question: str, extra: dict):
  if "puzzle" not in extra:
    m = (re.search(r"[Ss]udoku puzzle:\s*([0-9]{16})", question)
         or re.search(r"(?<!\d)([0-4]{16})(?!\d)", question))
    if m:
      extra["puzzle"] = m.group(1)
  return solution, extra


# ----------------------------------------------------------------------------- sudoku4

_check_sudoku4 = _sudoku_row_check(64)


def _grade_sudoku4(completion, solution, extra, **_):
  if "puzzle" not in extra:
    raise ValueError("sudoku4 needs extra['puzzle'] (the 64-digit puzzle, 0 = empty)")
  ok, frac = sudoku4_grade(completion, solution, extra["puzzle"])
  return ok, frac, frac


# ----------------------------------------------------------------------------- code


def _code_format(completion: str) -> float:
  return 1.0 if code_blocks(completion) else 0.0


def _mbpp_format(completion: str) -> float:
  return 1.0 if code_blocks(completion) or "[DONE]" in completion else 0.0


def _code_grader(extra: dict) -> str:
  """A user code row grades as HumanEval (check(candidate) tests) or MBPP (an assert list)."""
  return "humaneval" if extra.get("test_format") == "check" else "mbpp"


# ----------------------------------------------------------------------------- the specs

register(TaskSpec(
    name="gsm8k", check_row=_check_number, instruction=_GSM8K_INSTRUCTION, grade=_grade_gsm8k,
    d1_names=("gsm",), train_on=("gsm8k",), eval_sets=("gsm8k",), sft_target=_boxed_target))
register(TaskSpec(
    name="math", stems={"train": ("math",), "test": ("math500", "math")},
    instruction=_MATH_INSTRUCTION, train_on=("gsm8k", "math"), eval_sets=("gsm8k", "math500"),
    **_MATH))
register(TaskSpec(name="math500", data_task="math", d1_names=("math",), **_MATH))
register(TaskSpec(
    name="countdown", check_row=_check_countdown, generate=procedural.generate_countdown,
    presets=procedural.COUNTDOWN_PRESETS, grade=_grade_countdown,
    recipes=COUNTDOWN_RECIPES, d1_names=("countdown",), recover_extra=_countdown_from_question,
    train_on=("countdown",), eval_sets=("countdown",), sft_target=_countdown_target,
    d1_inner_updates=8))
register(TaskSpec(
    name="sudoku", check_row=_check_sudoku, generate=procedural.generate_sudoku,
    presets=procedural.SUDOKU_PRESETS, grade=_grade_sudoku,
    recipes=SUDOKU_RECIPES, partial_score=True, d1_names=("sudoku",),
    recover_extra=_sudoku_from_question,
    train_on=("sudoku",), eval_sets=("sudoku",), sft_target=_sudoku_target,
    d1_inner_updates=8))
# Generated only, for the demo (task.demo_task=sudoku4): no file source, so no task.name of its own.
register(TaskSpec(
    name="sudoku4", check_row=_check_sudoku4, generate=procedural.generate_sudoku4,
    presets=procedural.SUDOKU4_PRESETS, grade=_grade_sudoku4, partial_score=True, sft_target=_sudoku_target))
register(TaskSpec(name="humaneval", code=True, format_score=_code_format,
                  code_case=functools.partial(code_case, "humaneval")))
register(TaskSpec(name="mbpp", code=True, format_score=_mbpp_format,
                  code_case=functools.partial(code_case, "mbpp")))
register(TaskSpec(
    name="code", code=True, grade_as=_code_grader, train_on=("code",),
    eval_sets=("humaneval", "mbpp"), train_file="a JSONL of {prompt, tests}"))
