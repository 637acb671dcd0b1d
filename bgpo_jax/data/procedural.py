"""Procedurally generated countdown, 4x4 sudoku and sudoku4 tasks (seeded, no external data).

Both generators return lists of uniform examples (records.py schema), usable directly as an
in-memory source or fed to the TFDS builder. Guarantees, by construction:
- countdown: every puzzle is built from an expression using each number exactly once, so it
  is solvable; the expression is stored as extra["solution"].
- sudoku: every puzzle is a valid 4x4 grid with cells blanked and is kept only if it has
  exactly one solution (checked against all 288 4x4 grids).
- sudoku4: four 4x4 sudokus side by side, each kept only with a unique solution: a 64-digit
  answer (the ELBO's noise matters at that length) with the demo sudoku's skill.
- uniqueness: no puzzle repeats within a split (countdown identity = sorted numbers + target).
- train/test disjoint for any seeds: a puzzle's split is a hash of its identity
  (`hash_split`), and each split keeps only puzzles that hash to it.

Difficulty knobs: sudoku min_blanks/max_blanks; countdown num_numbers, number range, target
range and allowed ops. Each generator's presets (`SUDOKU_PRESETS`, `COUNTDOWN_PRESETS`,
`SUDOKU4_PRESETS`, which
the task specs carry): "demo", settings a ~1M-param char-level model can learn, with prompts
under 40 characters (prompt_style="short"); "d1", d1-like ones.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from bgpo_jax.tasks import registry

PROMPT_STYLES = ("short", "long")
_STALL_ATTEMPTS = 50_000
# "demo": small, learnable variants for the embedded demo (char tokenizer, tiny model, 2-core
# CPU); "d1": d1-like settings.
SUDOKU_PRESETS: dict[str, dict] = {
    # 1-2 blanks: each blank is forced by its row/column; 4608 + 34560 unique puzzles exist.
    "demo": {"min_blanks": 1, "max_blanks": 2, "prompt_style": "short"},
    "d1": {"min_blanks": 8, "max_blanks": 10, "prompt_style": "long"},
}
COUNTDOWN_PRESETS: dict[str, dict] = {
    # 3 numbers 1..20 with + and -: answers like "17+5-3"; about 5000 unique train and 550
    # unique test puzzles exist (one-digit numbers would allow only ~500).
    "demo": {"num_numbers": 3, "min_number": 1, "max_number": 20, "min_target": 1,
             "max_target": 50, "ops": "+-", "prompt_style": "short"},
    # 3 numbers 1..100, targets 1..100, all four operations.
    "d1": {"num_numbers": 3, "min_number": 1, "max_number": 100, "min_target": 1,
           "max_target": 100, "ops": "+-*/", "prompt_style": "long"},
}

SUDOKU4_PRESETS: dict[str, dict] = {
    # The demo sudoku's 1-2 blanks in each of the four grids: a 64-digit answer that fills a
    # 64-token canvas exactly (the n sweep's long-response task); the prompt, "Sudokus " + 64
    # digits, is 95 tokens in the chat template. (A first try, the sums mod 10 of adjacent digits,
    # stayed at chance after 200 SFT steps of the tiny model: an addition table is learned far
    # more slowly than copying.)
    "demo": {"min_blanks": 1, "max_blanks": 2, "prompt_style": "short"},
}


def hash_split(task: str, key: str, test_fraction: float) -> str:
  """"test" for a stable fraction of puzzle identities, else "train" (seed-independent)."""
  h = int.from_bytes(hashlib.sha256(f"bgpo_jax/{task}/{key}".encode()).digest()[:8], "big")
  return "test" if h / 2.0**64 < test_fraction else "train"


def _check_split(split: str, test_fraction: float) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r} must be 'train' or 'test'")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction {test_fraction} must be in (0, 1) so both splits exist")


def _check_sudoku_knobs(split: str, test_fraction: float, min_blanks: int, max_blanks: int,
                        prompt_style: str) -> None:
  """The arguments every 4x4-sudoku generator shares, checked."""
  _check_split(split, test_fraction)
  if not 1 <= min_blanks <= max_blanks <= 12:
    raise ValueError(f"blanks range [{min_blanks}, {max_blanks}] must lie in [1, 12] (a 4x4 "
                     "sudoku needs at least 4 givens to have a unique solution)")
  if prompt_style not in PROMPT_STYLES:
    raise ValueError(f"prompt_style {prompt_style!r} not in {PROMPT_STYLES}")


def _rng(seed: int, task: str, split: str) -> random.Random:
  # Separate streams per (task, split) so asking for more test puzzles leaves train unchanged.
  # random.Random (string seeds are hashed with SHA-512, stable across Python versions) is
  # ~10x cheaper per draw than numpy's Generator for these scalar draws.
  return random.Random(f"bgpo_jax/{task}/{split}/{int(seed)}")


def _unique(n: int, draw: Callable[[], tuple | None], *, task: str, split: str,
            test_fraction: float, max_attempts: int | None, knobs: str, widen: str
            ) -> list[dict]:
  """n examples of distinct `task` puzzles of `split`, drawn until found.

  draw() -> None (no puzzle this attempt) or (identity key, make), where make(index) is the
  example, or None when the puzzle turns out unusable. A key is used once, and only when it
  hashes to `split`. Raises ValueError (naming the `knobs` and what to `widen`) once
  max_attempts (default 200 n + 10000) are spent or new puzzles stop turning up: the knobs
  allow too few.
  """
  max_attempts = max_attempts or 200 * n + 10_000
  seen: set[str] = set()
  out: list[dict] = []
  attempts = last_new = 0
  while len(out) < n:
    if attempts >= max_attempts or attempts - last_new > _STALL_ATTEMPTS:
      raise ValueError(f"found only {len(out)} of {n} unique {split} {task} puzzles with {knobs} "
                       f"after {attempts} attempts; widen {widen} or ask for fewer")
    attempts += 1
    drawn = draw()
    if drawn is None:
      continue
    key, make = drawn
    if key in seen or hash_split(task, key, test_fraction) != split:
      continue
    seen.add(key)
    last_new = attempts
    ex = make(len(out))
    if ex is not None:
      out.append(ex)
  return out


def _example(task: str, split: str, index: int, prompt: str, ground_truth: str,
             extra: dict) -> dict:
  return {
      "task": task, "data_source": f"generated_{task}", "split": split, "index": index,
      "prompt_json": json.dumps([{"role": "user", "content": prompt}]),
      "ground_truth": ground_truth,
      "extra_json": json.dumps(extra, sort_keys=True),
  }


# ----------------------------------------------------------------------------- sudoku


@functools.lru_cache(maxsize=1)
def all_sudoku_grids() -> np.ndarray:
  """All 288 valid 4x4 sudoku grids, int8 [288, 16] (row-major, digits 1-4)."""
  grids = []
  cells = [0] * 16

  def ok(pos: int, d: int) -> bool:
    r, c = divmod(pos, 4)
    for i in range(pos):
      ri, ci = divmod(i, 4)
      if cells[i] == d and (ri == r or ci == c or (ri // 2 == r // 2 and ci // 2 == c // 2)):
        return False
    return True

  def fill(pos: int) -> None:
    if pos == 16:
      grids.append(list(cells))
      return
    for d in range(1, 5):
      if ok(pos, d):
        cells[pos] = d
        fill(pos + 1)
    cells[pos] = 0

  fill(0)
  out = np.asarray(grids, np.int8)
  out.setflags(write=False)
  return out


def _puzzle_array(puzzle: str) -> np.ndarray:
  if len(puzzle) != 16 or any(ch not in "01234" for ch in puzzle):
    raise ValueError(f"sudoku puzzle {puzzle!r} must be 16 digits 0-4 (0 = empty)")
  return np.frombuffer(puzzle.encode(), np.uint8).astype(np.int8) - ord("0")


def sudoku_solutions(puzzle: str) -> list[str]:
  """Every completed grid consistent with the puzzle's givens ('0' = empty), as strings."""
  p = _puzzle_array(puzzle)
  given = p > 0
  grids = all_sudoku_grids()
  hits = grids[(grids[:, given] == p[given]).all(axis=1)]
  return ["".join(map(str, g)) for g in hits]


def solve_sudoku(puzzle: str) -> str | None:
  """The unique solution, or None when the puzzle has zero or several."""
  sols = sudoku_solutions(puzzle)
  return sols[0] if len(sols) == 1 else None


def _sudoku_prompt(puzzle: str, style: str) -> str:
  if style == "short":
    return f"Sudoku {puzzle}"
  return ("Solve this 4x4 sudoku: every row, column and 2x2 box must hold the digits 1-4 "
          "once. The grid is given as 16 digits read row by row, with 0 for an empty cell: "
          f"{puzzle}\nThink inside <reasoning></reasoning>, then write the 16-digit solved grid "
          "inside <answer></answer>.")


def generate_sudoku(n: int, *, seed: int = 0, split: str = "train", min_blanks: int = 8,
                    max_blanks: int = 10, test_fraction: float = 0.1,
                    prompt_style: str = "long", max_attempts: int | None = None) -> list[dict]:
  """n unique 4x4 sudoku puzzles with unique solutions, blanks in [min_blanks, max_blanks].

  Deterministic in (seed, split, knobs). extra = {"puzzle", "blanks"}; ground_truth = solution.
  Raises ValueError when fewer than n unique puzzles turn up within max_attempts (the knobs
  allow too few puzzles for this split).
  """
  _check_sudoku_knobs(split, test_fraction, min_blanks, max_blanks, prompt_style)
  rng = _rng(seed, "sudoku", split)
  grids = [list("".join(map(str, g))) for g in all_sudoku_grids()]

  def draw():
    p = list(grids[rng.randrange(len(grids))])
    k = rng.randint(min_blanks, max_blanks)
    for b in rng.sample(range(16), k):
      p[b] = "0"
    puzzle = "".join(p)

    def make(index):
      sols = sudoku_solutions(puzzle)
      if len(sols) != 1:
        return None
      return _example("sudoku", split, index, _sudoku_prompt(puzzle, prompt_style), sols[0],
                      {"puzzle": puzzle, "blanks": k})
    return puzzle, make

  return _unique(n, draw, task="sudoku", split=split, test_fraction=test_fraction,
                 max_attempts=max_attempts, knobs=f"{min_blanks}-{max_blanks} blanks",
                 widen="the blanks range")


# ----------------------------------------------------------------------------- countdown


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  if op == "/":
    return a / b if b != 0 else None
  raise ValueError(f"op {op!r} not in '+-*/'")


def solve_countdown(numbers: Sequence[int], target: int, ops: str = "+-*/") -> str | None:
  """An expression using every number once that equals target (exact rationals), or None.

  Exhaustive: repeatedly combines two items of the pool with each op in both orders.
  """
  goal = Fraction(target)

  def search(pool: list[tuple[Fraction, str]]) -> str | None:
    if len(pool) == 1:
      return pool[0][1] if pool[0][0] == goal else None
    for i, j in itertools.permutations(range(len(pool)), 2):
      rest = [pool[k] for k in range(len(pool)) if k not in (i, j)]
      (a, ea), (b, eb) = pool[i], pool[j]
      for op in ops:
        if i > j and op in "+*":
          continue  # commutative: the (j, i) order already covered it
        v = _apply(op, a, b)
        if v is not None:
          found = search(rest + [(v, f"({ea}{op}{eb})")])
          if found:
            return found
    return None

  found = search([(Fraction(x), str(x)) for x in numbers])
  return found[1:-1] if found and found.startswith("(") and len(numbers) > 1 else found


def _countdown_prompt(numbers: Sequence[int], target: int, style: str) -> str:
  if style == "short":
    return f"Make {target} with {' '.join(map(str, numbers))}"
  return (f"Using each of the numbers {list(numbers)} exactly once, with + - * / and "
          f"parentheses, write an arithmetic expression equal to {target}.\nThink inside "
          "<reasoning></reasoning>, then write only the expression (no '=' and no target) "
          "inside <answer></answer>.")


def countdown_key(numbers: Sequence[int], target: int) -> str:
  """Puzzle identity: the multiset of numbers and the target (order does not matter)."""
  return f"{sorted(int(x) for x in numbers)}->{int(target)}"


def generate_countdown(n: int, *, seed: int = 0, split: str = "train", num_numbers: int = 3,
                       min_number: int = 1, max_number: int = 100, min_target: int = 1,
                       max_target: int = 100, ops: str = "+-*/", test_fraction: float = 0.1,
                       prompt_style: str = "long",
                       max_attempts: int | None = None) -> list[dict]:
  """n unique countdown puzzles, each built from a random expression over its numbers.

  The expression combines the numbers pairwise with `ops`, keeping every intermediate value
  an integer (division only when exact), and the result must land in [min_target,
  max_target]. extra = {"numbers", "solution"}; ground_truth = str(target).
  """
  _check_split(split, test_fraction)
  if num_numbers < 2 or not 0 <= min_number <= max_number or min_target > max_target:
    raise ValueError(f"bad countdown knobs: num_numbers={num_numbers} (need >= 2), numbers "
                     f"[{min_number}, {max_number}], targets [{min_target}, {max_target}]")
  if not ops or set(ops) - set("+-*/"):
    raise ValueError(f"ops {ops!r} must be a non-empty subset of '+-*/'")
  if prompt_style not in PROMPT_STYLES:
    raise ValueError(f"prompt_style {prompt_style!r} not in {PROMPT_STYLES}")
  rng = _rng(seed, "countdown", split)

  def draw():
    numbers = [rng.randint(min_number, max_number) for _ in range(num_numbers)]
    found = _random_expression(numbers, ops, rng)
    if found is None or not min_target <= found[0] <= max_target:
      return None
    target, solution = found
    return countdown_key(numbers, target), lambda index: _example(
        "countdown", split, index, _countdown_prompt(numbers, target, prompt_style), str(target),
        {"numbers": numbers, "solution": solution})

  knobs = (f"numbers [{min_number}, {max_number}], targets [{min_target}, {max_target}], ops "
           f"{ops!r}")
  return _unique(n, draw, task="countdown", split=split, test_fraction=test_fraction,
                 max_attempts=max_attempts, knobs=knobs, widen="the ranges")


def _random_expression(numbers: Sequence[int], ops: str, rng: random.Random
                       ) -> tuple[int, str] | None:
  """(value, expression) of the numbers combined pairwise in a random order with random ops,
  every intermediate value an integer; None when a draw divides inexactly (or by zero)."""
  pool = [(x, str(x)) for x in numbers]
  while len(pool) > 1:
    i, j = rng.sample(range(len(pool)), 2)
    op = ops[rng.randrange(len(ops))]
    (a, ea), (b, eb) = pool[i], pool[j]
    if op == "/" and (b == 0 or a % b):
      return None
    v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if op == "/" else 0}[op]
    pool = [pool[k] for k in range(len(pool)) if k not in (i, j)]
    # Parenthesize when this is not the last combination (keeps precedence explicit).
    expr = f"{ea}{op}{eb}"
    pool.append((v, expr if not pool else f"({expr})"))
  return pool[0]


# ----------------------------------------------------------------------------- sudoku4


def _sudoku4_prompt(puzzle: str, style: str) -> str:
  if style == "short":
    return f"Sudokus {puzzle}"
  return ("Solve these four 4x4 sudokus: in each, every row, column and 2x2 box must hold the digits "
          "1-4 once. The grids are given one after the other as 64 digits, each grid read row by row "
          f"with 0 for an empty cell: {puzzle}\nWrite the 64-digit solved grids in the same order.")


def generate_sudoku4(n: int, *, seed: int = 0, split: str = "train", min_blanks: int = 1,
                     max_blanks: int = 2, test_fraction: float = 0.1, prompt_style: str = "long",
                     max_attempts: int | None = None) -> list[dict]:
  """n unique puzzles of four 4x4 sudokus side by side (64 digits), each grid with its own number
  of blanks in [min_blanks, max_blanks] and a unique solution: sudoku's skill (copy the givens, fill
  the blanks) with a 64-digit answer, long enough for the ELBO's noise to matter.

  Deterministic in (seed, split, knobs). extra = {"puzzle", "blanks"}; ground_truth = the 64-digit
  solution.
  """
  _check_sudoku_knobs(split, test_fraction, min_blanks, max_blanks, prompt_style)
  rng = _rng(seed, "sudoku4", split)
  grids = ["".join(map(str, g)) for g in all_sudoku_grids()]

  def draw():
    puzzles, solutions, blanks = [], [], 0
    for _ in range(4):
      p = list(grids[rng.randrange(len(grids))])
      k = rng.randint(min_blanks, max_blanks)
      for b in rng.sample(range(16), k):
        p[b] = "0"
      sols = sudoku_solutions("".join(p))
      if len(sols) != 1:
        return None
      puzzles.append("".join(p))
      solutions.append(sols[0])
      blanks += k
    puzzle = "".join(puzzles)
    return puzzle, lambda index: _example("sudoku4", split, index, _sudoku4_prompt(puzzle, prompt_style),
                                          "".join(solutions), {"puzzle": puzzle, "blanks": blanks})

  return _unique(n, draw, task="sudoku4", split=split, test_fraction=test_fraction,
                 max_attempts=max_attempts, knobs=f"{min_blanks}-{max_blanks} blanks per grid",
                 widen="the blanks range")


def generator(task: str) -> Callable[..., list[dict]]:
  """The task spec's generator (TaskSpec.generate); ValueError naming the generated tasks."""
  spec = registry.find(task)
  if spec is None or spec.generate is None:
    generated = sorted(s.name for s in registry.specs() if s.generate is not None)
    raise ValueError(f"no generator for task {task!r}; generated tasks: {generated}")
  return spec.generate


def generate(task: str, n: int, *, seed: int = 0, split: str = "train", **knobs) -> list[dict]:
  """The task's generator (generate_sudoku, generate_countdown, ...) by task name."""
  return generator(task)(n, seed=seed, split=split, **knobs)


def demo_examples(task: str = "sudoku", split: str = "train", n: int = 2000, seed: int = 0,
                  **overrides) -> list[dict]:
  """The embedded demo's task: its spec's "demo" preset updated with overrides."""
  if task not in registry.names("demo"):
    raise ValueError(f"no demo preset for task {task!r}; choose one of "
                     f"{sorted(registry.names('demo'))}")
  knobs = registry.get(task).presets["demo"]
  return generate(task, n, seed=seed, split=split, **{**knobs, **overrides})
