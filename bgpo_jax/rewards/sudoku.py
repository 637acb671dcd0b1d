"""4x4 sudoku reward: the fraction of originally empty cells that the answer fills correctly.

Answer extraction (`extract_grid`), after cutting the completion at its first end-of-turn token:
- with an `<answer>` tag holding digits (its last one; an unclosed tag runs to the end; a
  `</answer>` never opened: the text after it): the last "digit run" of exactly 16 digits in
  it, else its longest run, padded with "0" or cut to the first 16 (as d1's evaluation does, so
  a short or long answer still earns partial credit).
  A digit run is a maximal sequence of digits separated only by spaces, newlines, tabs and
  `, | ; - + [ ] ( )` quotes or dots ("3 1 4 2 | 2 4 3 1 ..." or a grid over four lines is one).
- without one: the last run with exactly 16 digits, else the last 16 digits of the last longer
  run; if there is none but the text holds exactly 16 digits in total, those. Otherwise None.

Scoring: a puzzle may have several valid completions. `solutions(puzzle)` lists all of them (a
4x4 grid has at most 288, found by backtracking in microseconds): any of them is fully correct
(score 1.0), not only the listed ground truth. Any other answer scores the fraction of empty
cells equal to the ground truth's, as d1 does, and is correct when that is 1.0 (the given cells
are not re-checked, as in d1, so "reward >= 1" and "correct" coincide under "fraction").

Training reward recipes (config `rewards.sudoku`): "fraction" (d1: the fraction of empty cells
filled correctly) or "binary" (1.0 for a complete, valid grid, else 0.0). Correctness (the
evaluation's accuracy) is always "the whole grid is a valid completion".
"""

from __future__ import annotations

import functools
import re

from bgpo_jax.rewards.extract import answer_tag, end_of_response

_RUN_RE = re.compile(r"\d(?:[\s,|;+\-\[\]()'\".\\]*\d)*")
_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
SIZE = 16
RECIPES = ("fraction", "binary")
# Cells sharing a row, column or 2x2 box with each cell.
_PEERS = tuple(
    tuple(j for j in range(SIZE) if j != i and (j // 4 == i // 4 or j % 4 == i % 4
                                                 or (j // 8, j % 4 // 2) == (i // 8, i % 4 // 2)))
    for i in range(SIZE))


def extract_grid(completion: str) -> str | None:
  """The 16-character answer string found in `completion` ("0" = padding), or None."""
  text = end_of_response(completion)
  tag = answer_tag(text)
  if tag is None and _CLOSE_RE.search(text):
    tag = text[_CLOSE_RE.search(text).end():]  # the answer written after a lone closing tag
  if tag is not None and re.search(r"\d", tag):
    runs = [re.sub(r"\D", "", m.group(0)) for m in _RUN_RE.finditer(tag)]
    exact = [r for r in runs if len(r) == SIZE]
    if exact:
      return exact[-1]
    longest = max(runs, key=len)
    return (longest + "0" * SIZE)[:SIZE]
  runs = [re.sub(r"\D", "", m.group(0)) for m in _RUN_RE.finditer(text)]
  exact = [r for r in runs if len(r) == SIZE]
  if exact:
    return exact[-1]
  longer = [r for r in runs if len(r) > SIZE]
  if longer:
    return longer[-1][-SIZE:]
  digits = "".join(runs)
  return digits if len(digits) == SIZE else None


def _digits16(value, what: str) -> str:
  s = re.sub(r"\D", "", str(value))
  if len(s) != SIZE:
    raise ValueError(f"sudoku {what} {value!r} does not have {SIZE} digits")
  return s


@functools.lru_cache(maxsize=65536)
def solutions(puzzle: str) -> tuple[str, ...]:
  """Every valid completion of a 16-digit puzzle ("0" = empty), in lexicographic order."""
  puzzle = _digits16(puzzle, "puzzle")
  grid = [int(c) for c in puzzle]
  for i, v in enumerate(grid):
    if v and (v > 4 or any(grid[j] == v for j in _PEERS[i])):
      return ()  # contradictory givens
  out: list[str] = []

  def fill(i: int) -> None:
    while i < SIZE and grid[i]:
      i += 1
    if i == SIZE:
      out.append("".join(map(str, grid)))
      return
    used = {grid[j] for j in _PEERS[i]}
    for v in (1, 2, 3, 4):
      if v not in used:
        grid[i] = v
        fill(i + 1)
    grid[i] = 0

  fill(0)
  return tuple(out)


def sudoku_grade(completion: str, solution: str, puzzle: str | None = None) -> tuple[bool, float]:
  """(correct, fraction of the puzzle's empty cells filled correctly); any valid completion
  of the puzzle is correct (module docstring). Without `puzzle` every cell counts and only
  `solution` is accepted; a puzzle without empty cells gives 1.0 for an answer equal to it."""
  solution = _digits16(solution, "solution")
  puzzle = _digits16(puzzle, "puzzle") if puzzle is not None else "0" * SIZE
  grid = extract_grid(completion)
  if grid is None:
    return False, 0.0
  empty = [i for i, c in enumerate(puzzle) if c == "0"]
  if not empty:
    return grid == solution, float(grid == solution)
  if puzzle != "0" * SIZE and grid != solution and grid in solutions(puzzle):
    return True, 1.0  # another valid completion
  frac = sum(grid[i] == solution[i] for i in empty) / len(empty)
  return frac == 1.0, frac


def sudoku_reward(completion: str, solution: str, puzzle: str | None = None,
                  recipe: str = "fraction") -> float:
  """Training reward under `recipe` ("fraction" or "binary")."""
  if recipe not in RECIPES:
    raise ValueError(f"sudoku reward recipe {recipe!r} is unknown; use one of {RECIPES}")
  correct, frac = sudoku_grade(completion, solution, puzzle)
  return frac if recipe == "fraction" else float(correct)
