"""Verifiable rewards (SPEC section 5): math, countdown, sudoku and sandboxed code tests.

    grade(task, completion, ground_truth, extra=None, *, recipes=None, format_reward=0.0) -> Grade
    grade_batch(tasks, completions, ground_truths, extras=None, *, pool=None, ...) -> list[Grade]
    submit_grades(...) -> concurrent.futures.Future[list[Grade]]   (non-blocking)
    score / score_batch / submit_batch: the same, returning the training rewards only (floats)
    format_score(task, completion) -> float in [0, 1]

Tasks: the graders of bgpo_jax.tasks.registry (`graders()`: gsm8k, math, math500, countdown,
sudoku, humaneval, mbpp, and any registered since); each grades with its spec's `grade` (or,
for code, `code_case` in the sandbox) and `format_score`. `extra` is the row's `extra_info`
(countdown: `numbers`; sudoku: `puzzle`) plus, for humaneval, `prompt` (see `rewards.code`).

A `Grade` keeps apart what training and evaluation need:
- `correct`: the answer is fully correct (a sudoku grid completely and validly filled). Evaluation
  accuracy is the mean of this, whatever the training reward recipe or format bonus.
- `score`: the task's published per-example evaluation score (d1's protocol): 1.0 / 0.0, and for
  sudoku the fraction of originally empty cells filled correctly.
- `reward`: the training reward: the task's recipe (`recipes`, config `rewards.countdown` /
  `rewards.sudoku`; each task's default, the first of its spec's `recipes`, is the published
  d1 one) plus the format bonus.
  countdown "d1": 1.0 correct, 0.1 well-formed but wrong, 0.0 no answer; "binary": 1 / 0.
  sudoku "fraction": the fraction of empty cells solved; "binary": 1 / 0. Other tasks: 1 / 0.

Format reward (off by default): `score(..., format_reward=w)` adds `w * format_score(...)`,
where format_score is 1.0 for the d1 layout `<reasoning>...</reasoning>` followed by
`<answer>...</answer>` (math: with a `\\boxed{}` inside the answer), 0.5 for an answer tag or
box alone, 0 otherwise; code tasks: 1.0 for a fenced Python block (or MBPP's [BEGIN]...[DONE]).

Code rows are judged by `rewards.judge`: the solution runs in the sandbox, its test here, so the
program cannot compute or influence its verdict. A row whose test cannot be judged that way
(rewards.code_tests) and a completion that is not a string grade 0 with `Grade.flag`
"unrewritable" / "non_string"; `flag_counts` turns a batch's flags into metrics.

`score_batch` is what the trainer calls: code rows run in parallel in a `SandboxPool`,
MATH comparisons in math-verify worker processes, the rest inline. It is thread-safe and holds
no GIL-heavy work (children do the running), so it can run in a background thread while the
device computes; `submit_batch` does exactly that and returns a future.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Any, Sequence

from bgpo_jax.rewards import judge as _judge
from bgpo_jax.rewards._process_wide import process_wide
from bgpo_jax.rewards.code_tests import Unrewritable
from bgpo_jax.rewards.countdown import countdown_grade, countdown_reward
from bgpo_jax.rewards.extract import answer_tag, code_blocks, end_of_response, last_boxed
from bgpo_jax.rewards.math_reward import MathVerifier, default_verifier, gsm8k_reward, math_reward
from bgpo_jax.rewards.sandbox import SandboxError, SandboxPool, SandboxResult, run_program
from bgpo_jax.rewards.sudoku import sudoku_grade, sudoku_reward
from bgpo_jax.tasks import registry

DEFAULT_CODE_TIMEOUT_S = 5.0
DEFAULT_CODE_MEMORY_MB = 1024

__all__ = [
    "graders", "Grade", "grade", "grade_batch", "submit_grades", "score", "score_batch",
    "submit_batch", "format_score", "answer_format_score", "code_result", "recipe_names",
    "default_recipes", "check_recipes", "SandboxError", "SandboxPool", "SandboxResult",
    "run_program", "MathVerifier", "default_pool", "default_verifier", "flag_counts", "FLAGS",
    "Unrewritable",
]

# Grade.flag values, each counted as metric rewards/<flag> (flag_counts).
FLAGS = ("unrewritable", "non_string")


@dataclasses.dataclass(frozen=True)
class Grade:
  """One completion's grade (module docstring): training `reward`, evaluation `correct`, the
  published per-example `score`, and `flag`: "" or why the row was graded 0 without being
  judged (one of FLAGS)."""
  reward: float
  correct: bool
  score: float
  flag: str = ""


def flag_counts(grades: Sequence[Grade], prefix: str = "rewards/") -> dict[str, float]:
  """{prefix + flag: how many grades carry it} for every flag in FLAGS (zeros included)."""
  return {prefix + f: float(sum(g.flag == f for g in grades)) for f in FLAGS}

def graders() -> tuple[str, ...]:
  """The task names `grade` takes (registered graders, registration order)."""
  return registry.names("grader")


def recipe_names() -> dict[str, tuple[str, ...]]:
  """{task: its training reward recipes, the default first} for the graders that offer some
  (config rewards.countdown / rewards.sudoku)."""
  return {s.name: tuple(s.recipes) for s in registry.specs() if s.is_grader and s.recipes}


def default_recipes() -> dict[str, str]:
  """{task: the published (d1 / TinyZero) recipe}, used where none is chosen."""
  return {task: names[0] for task, names in recipe_names().items()}


def check_recipes(chosen: dict | None) -> dict:
  """`chosen` merged over default_recipes(); unknown tasks or recipe names are an error."""
  offered = recipe_names()
  out = {task: names[0] for task, names in offered.items()}
  for task, name in (chosen or {}).items():
    if task not in offered:
      raise ValueError(f"no reward recipes for task {task!r}; tasks with recipes: {sorted(offered)}")
    if name not in offered[task]:
      raise ValueError(f"{task} reward recipe {name!r} is unknown; use one of {offered[task]}")
    out[task] = name
  return out


def _grader(task: str) -> registry.TaskSpec:
  """The spec of a grader; any other name (a task graded as others, like "code") is an error
  naming the graders."""
  spec = registry.find(task)
  if spec is None or not spec.is_grader:
    raise ValueError(f"unknown reward task {task!r}; known tasks: {', '.join(graders())}")
  return spec


def _extra(extra: Any) -> dict:
  if extra is None:
    return {}
  if not isinstance(extra, dict):
    raise TypeError(f"extra must be a dict (the row's extra_info), got {type(extra).__name__}")
  return extra


_REASONING_ANSWER_RE = re.compile(
    r"<reasoning>.+?</reasoning>\s*<answer>.+?</answer>", re.DOTALL | re.IGNORECASE)


def has_answer_layout(completion: str) -> bool:
  """Whether the completion holds d1's `<reasoning>...</reasoning>` then `<answer>...</answer>`."""
  return _REASONING_ANSWER_RE.search(completion) is not None


def answer_format_score(completion: str) -> float:
  """d1's layout: 1.0 for reasoning then answer tags, 0.5 for an answer tag alone, else 0 (the
  format score of a task whose spec gives none)."""
  if has_answer_layout(completion):
    return 1.0
  return 0.5 if answer_tag(completion) is not None else 0.0


def format_score(task: str, completion: str) -> float:
  """Well-formedness of the answer layout in [0, 1] (see the module docstring): the task
  spec's format_score of the completion cut at its end of response."""
  spec = _grader(task)
  return (spec.format_score or answer_format_score)(end_of_response(completion))


def _grade(spec: registry.TaskSpec, completion: str, ground_truth: Any, extra: dict,
           verifier: MathVerifier | None, chosen: dict) -> tuple[bool, float, float]:
  """(correct, published score, recipe reward) of a row an answer grader grades here."""
  if spec.grade is None:
    raise ValueError(f"{spec.name!r} is graded in the sandbox")
  return spec.grade(completion, ground_truth, extra, recipe=chosen.get(spec.name, ""),
                    verifier=verifier)


def _make(task: str, completion: str, parts: tuple[bool, float, float],
          format_reward: float) -> Grade:
  ok, sc, reward = parts
  if format_reward:
    reward += format_reward * format_score(task, completion)
  return Grade(float(reward), bool(ok), float(sc))


def grade(task: str, completion: str, ground_truth: Any, extra: dict | None = None, *,
          recipes: dict | None = None, format_reward: float = 0.0,
          code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
          code_memory_mb: int = DEFAULT_CODE_MEMORY_MB) -> Grade:
  """The Grade of one completion (code tasks run in a one-off sandbox, no pool self-test)."""
  spec = _grader(task)
  recipes = check_recipes(recipes)
  if not isinstance(completion, str):
    return Grade(0.0, False, 0.0, "non_string")
  if spec.code_case is not None:
    try:
      solution, test = spec.code_case(completion, ground_truth, _extra(extra))
    except Unrewritable:
      return Grade(0.0, False, 0.0, "unrewritable")
    verdict = _judge.judge_isolated(solution, test, code_timeout_s, code_memory_mb)
    if verdict.status == "unrewritable":
      return Grade(0.0, False, 0.0, "unrewritable")
    ok = verdict.passed
    parts = (ok, float(ok), float(ok))
  else:
    parts = _grade(spec, completion, ground_truth, _extra(extra), None, recipes)
  return _make(task, completion, parts, format_reward)


def score(task: str, completion: str, ground_truth: Any, extra: dict | None = None, *,
          format_reward: float = 0.0, code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
          code_memory_mb: int = DEFAULT_CODE_MEMORY_MB, recipes: dict | None = None) -> float:
  """Training reward of one completion: recipe reward (+ format_reward * format_score)."""
  return grade(task, completion, ground_truth, extra, recipes=recipes,
               format_reward=format_reward, code_timeout_s=code_timeout_s,
               code_memory_mb=code_memory_mb).reward


def code_result(task: str, completion: str, ground_truth: Any, extra: dict | None = None, *,
                timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
                memory_mb: int = DEFAULT_CODE_MEMORY_MB) -> "_judge.Verdict":
  """The judge's full verdict (status, why, the sandbox's stdout/stderr tails) of a code
  completion: for debugging. Raises Unrewritable when the row's test cannot be judged."""
  spec = _grader(task)
  if spec.code_case is None:
    code = [s.name for s in registry.specs() if s.code_case is not None]
    raise ValueError(f"{task!r} is not a code task ({', '.join(code)})")
  solution, test = spec.code_case(completion, ground_truth, _extra(extra))
  return _judge.judge_isolated(solution, test, timeout_s, memory_mb)


@process_wide
def default_pool() -> SandboxPool:
  """The process-wide sandbox pool (SandboxPool's default size), created on first use."""
  return SandboxPool()


def grade_batch(tasks: Sequence[str] | str, completions: Sequence[str],
                ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None, *,
                pool: SandboxPool | None = None, format_reward: float = 0.0,
                code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
                code_memory_mb: int = DEFAULT_CODE_MEMORY_MB,
                verifier: MathVerifier | None = None, recipes: dict | None = None) -> list[Grade]:
  """Grades of a batch. `tasks` is one task name for all rows or one per row.

  Code rows are submitted to `pool` (default: `default_pool()`) first, so they run while the
  other rows are graded here; the pool's self-test runs before its first program, and raises
  `SandboxError` if the sandbox cannot run code. Thread-safe; blocks until all are known.
  """
  n = len(completions)
  tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
  extras = [None] * n if extras is None else list(extras)
  if not (len(tasks) == len(ground_truths) == len(extras) == n):
    raise ValueError(f"batch lengths differ: {len(tasks)} tasks, {n} completions, "
                     f"{len(ground_truths)} ground truths, {len(extras)} extras")
  specs = {t: _grader(t) for t in set(tasks)}
  recipes = check_recipes(recipes)
  parts: list = [None] * n
  flags = ["non_string" if not isinstance(c, str) else "" for c in completions]
  futures: dict[int, concurrent.futures.Future] = {}
  for i in range(n):
    code_case = specs[tasks[i]].code_case
    if code_case is not None and not flags[i]:
      try:
        solution, test = code_case(completions[i], ground_truths[i], _extra(extras[i]))
      except Unrewritable:
        flags[i] = "unrewritable"
        continue
      pool = pool or default_pool()
      futures[i] = pool.submit_fn(_judge.judge_isolated, solution, test, code_timeout_s, code_memory_mb)
  for i in range(n):
    if i not in futures and not flags[i]:
      parts[i] = _grade(specs[tasks[i]], completions[i], ground_truths[i], _extra(extras[i]),
                        verifier, recipes)
  for i, f in futures.items():
    verdict = f.result()
    if verdict.status == "unrewritable":
      flags[i] = "unrewritable"
    else:
      parts[i] = (verdict.passed, float(verdict.passed), float(verdict.passed))
  return [Grade(0.0, False, 0.0, flags[i]) if flags[i] else
          _make(tasks[i], completions[i], parts[i], format_reward) for i in range(n)]


def score_batch(tasks: Sequence[str] | str, completions: Sequence[str],
                ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None,
                **kwargs) -> list[float]:
  """Training rewards of a batch (`grade_batch(...)[i].reward`); same arguments."""
  return [g.reward for g in grade_batch(tasks, completions, ground_truths, extras, **kwargs)]


@process_wide
def _executor() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bgpo-rewards")


def _listed(tasks, completions, ground_truths, extras):
  return (list(tasks) if not isinstance(tasks, str) else tasks, list(completions),
          list(ground_truths), None if extras is None else list(extras))


def submit_grades(tasks: Sequence[str] | str, completions: Sequence[str],
                  ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None,
                  **kwargs) -> concurrent.futures.Future:
  """`grade_batch` in a background thread; returns a Future of the Grade list, so the caller
  can overlap reward computation with device work."""
  return _executor().submit(grade_batch, *_listed(tasks, completions, ground_truths, extras),
                            **kwargs)


def submit_batch(tasks: Sequence[str] | str, completions: Sequence[str],
                 ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None,
                 **kwargs) -> concurrent.futures.Future:
  """`score_batch` in a background thread; returns a Future of the reward list."""
  return _executor().submit(score_batch, *_listed(tasks, completions, ground_truths, extras),
                            **kwargs)
