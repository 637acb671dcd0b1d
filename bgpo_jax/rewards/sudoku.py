"""4x4 sudoku reward: the fraction of originally empty cells that the answer fills correctly.

Answer extraction, from the last `<answer>...</answer>` (else the whole completion): digit runs
are maximal sequences of digits separated only by spaces, newlines, tabs and `, | ; - + [ ] ( )`
quotes or dots (so "3 1 4 2 | 2 4 3 1 ..." or a grid over four lines is one run, while words
split runs). The answer is the last run with exactly 16 digits, else the last 16 digits of the
last longer run; if there is none but the text holds exactly 16 digits in total, those.
Otherwise the completion scores 0.
"""

from __future__ import annotations

import re

from bgpo_jax.rewards.extract import answer_tag

_RUN_RE = re.compile(r"\d(?:[\s,|;+\-\[\]()'\".]*\d)*")
SIZE = 16


def extract_grid(completion: str) -> str | None:
  """The 16-digit answer string found in `completion`, or None."""
  tag = answer_tag(completion)
  text = tag if tag is not None else completion
  runs = [re.sub(r"\D", "", m.group(0)) for m in _RUN_RE.finditer(text)]
  exact = [r for r in runs if len(r) == SIZE]
  if exact:
    return exact[-1]
  longer = [r for r in runs if len(r) > SIZE]
  if longer:
    return longer[-1][-SIZE:]
  digits = "".join(runs)
  return digits if len(digits) == SIZE else None


def sudoku_reward(completion: str, solution: str, puzzle: str | None = None) -> float:
  """Fraction of the puzzle's empty ('0') cells whose answer digit equals the solution's.
  Without `puzzle` every cell counts; a puzzle without empty cells scores 1.0 for an answer
  equal to the solution."""
  solution = re.sub(r"\D", "", str(solution))
  if len(solution) != SIZE:
    raise ValueError(f"sudoku solution {solution!r} does not have {SIZE} digits")
  puzzle = re.sub(r"\D", "", str(puzzle)) if puzzle is not None else "0" * SIZE
  if len(puzzle) != SIZE:
    raise ValueError(f"sudoku puzzle {puzzle!r} does not have {SIZE} digits")
  grid = extract_grid(completion)
  if grid is None:
    return 0.0
  empty = [i for i, c in enumerate(puzzle) if c == "0"]
  if not empty:
    return float(grid == solution)
  return sum(grid[i] == solution[i] for i in empty) / len(empty)
