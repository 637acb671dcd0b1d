"""sudoku4 reward: four 4x4 sudokus side by side (64 digits), scored like sudoku per grid.

The completion, cut at its first end-of-turn token, gives its digits in order (every non-digit
dropped), cut or padded with "0" to 64: grid g is digits 16g .. 16g+15. A grid that is a valid
completion of its puzzle is solved (any valid completion, as in rewards/sudoku.py); otherwise its
empty cells count where they equal the ground truth. Scoring:
- score = reward = the empty cells filled correctly over all four grids / all empty cells (a
  solved grid counts all of its empty cells);
- correct = all four grids solved.
"""

from __future__ import annotations

import re

from bgpo_jax.rewards.extract import end_of_response
from bgpo_jax.rewards.sudoku import solutions

GRIDS, CELLS = 4, 16
SIZE = GRIDS * CELLS


def _digits64(value, what: str) -> str:
  s = re.sub(r"\D", "", str(value))
  if len(s) != SIZE:
    raise ValueError(f"sudoku4 {what} {str(value)[:70]!r} does not have {SIZE} digits")
  return s


def sudoku4_grade(completion: str, solution: str, puzzle: str) -> tuple[bool, float]:
  """(correct, fraction of empty cells filled correctly) of `completion` for the 64-digit
  `puzzle` ("0" = empty) and its `solution`."""
  solution, puzzle = _digits64(solution, "solution"), _digits64(puzzle, "puzzle")
  got = (re.sub(r"\D", "", end_of_response(completion)) + "0" * SIZE)[:SIZE]
  right = total = solved = 0
  for g in range(GRIDS):
    sl = slice(g * CELLS, (g + 1) * CELLS)
    empty = [i for i, c in enumerate(puzzle[sl]) if c == "0"]
    total += len(empty)
    if got[sl] in solutions(puzzle[sl]):
      right += len(empty)
      solved += 1
    else:
      right += sum(got[sl][i] == solution[sl][i] for i in empty)
  frac = right / total if total else float(solved == GRIDS)
  return solved == GRIDS, frac
