"""Verifiable rewards (SPEC section 5): math, countdown, sudoku and sandboxed code tests.

    score(task, completion, ground_truth, extra=None, *, format_reward=0.0) -> float
    score_batch(tasks, completions, ground_truths, extras=None, *, pool=None, ...) -> list[float]
    submit_batch(...) -> concurrent.futures.Future[list[float]]   (non-blocking)
    format_score(task, completion) -> float in [0, 1]

Tasks: gsm8k, math, math500, countdown, sudoku, humaneval, mbpp. Correctness is 1.0 / 0.0
(sudoku: the fraction of originally empty cells solved). `extra` is the row's `extra_info`
(countdown: `numbers`; sudoku: `puzzle`) plus, for humaneval, `prompt` (see `rewards.code`).

Format reward (off by default): `score(..., format_reward=w)` adds `w * format_score(...)`,
where format_score is 1.0 for the d1 layout `<reasoning>...</reasoning>` followed by
`<answer>...</answer>` (math: with a `\\boxed{}` inside the answer), 0.5 for an answer tag or
box alone, 0 otherwise; code tasks: 1.0 for a fenced Python block (or MBPP's [BEGIN]...[DONE]).

`score_batch` is what the trainer calls: code programs run in parallel in a `SandboxPool`,
MATH comparisons in math-verify worker processes, the rest inline. It is thread-safe and holds
no GIL-heavy work (children do the running), so it can run in a background thread while the
device computes; `submit_batch` does exactly that and returns a future.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from typing import Any, Sequence

from bgpo_jax.rewards import code as _code
from bgpo_jax.rewards.countdown import countdown_reward
from bgpo_jax.rewards.extract import answer_tag, code_blocks, last_boxed
from bgpo_jax.rewards.math_reward import MathVerifier, default_verifier, gsm8k_reward, math_reward
from bgpo_jax.rewards.sandbox import SandboxPool, SandboxResult, run_program
from bgpo_jax.rewards.sudoku import sudoku_reward

TASKS = ("gsm8k", "math", "math500", "countdown", "sudoku", "humaneval", "mbpp")
CODE_TASKS = ("humaneval", "mbpp")
MATH_TASKS = ("math", "math500")

DEFAULT_CODE_TIMEOUT_S = 5.0
DEFAULT_CODE_MEMORY_MB = 1024

__all__ = [
    "TASKS", "score", "score_batch", "submit_batch", "format_score", "code_result",
    "SandboxPool", "SandboxResult", "run_program", "MathVerifier", "default_pool",
    "default_verifier",
]


def _check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"unknown reward task {task!r}; known tasks: {', '.join(TASKS)}")
  return task


def _extra(extra: Any) -> dict:
  if extra is None:
    return {}
  if not isinstance(extra, dict):
    raise TypeError(f"extra must be a dict (the row's extra_info), got {type(extra).__name__}")
  return extra


_REASONING_ANSWER_RE = re.compile(
    r"<reasoning>.+?</reasoning>\s*<answer>.+?</answer>", re.DOTALL | re.IGNORECASE)


def format_score(task: str, completion: str) -> float:
  """Well-formedness of the answer layout in [0, 1] (see the module docstring)."""
  _check_task(task)
  if task in CODE_TASKS:
    if code_blocks(completion) or ("[DONE]" in completion and task == "mbpp"):
      return 1.0
    return 0.0
  tag = answer_tag(completion)
  full = _REASONING_ANSWER_RE.search(completion) is not None
  if task in MATH_TASKS:
    boxed_in_tag = tag is not None and last_boxed(tag) is not None
    if full and boxed_in_tag:
      return 1.0
    return 0.5 if (tag is not None or last_boxed(completion) is not None) else 0.0
  if full:
    return 1.0
  return 0.5 if tag is not None else 0.0


def _correctness(task: str, completion: str, ground_truth: Any, extra: dict,
                 verifier: MathVerifier | None, code_timeout_s: float,
                 code_memory_mb: int) -> float:
  if task == "gsm8k":
    return gsm8k_reward(completion, ground_truth)
  if task in MATH_TASKS:
    return math_reward(completion, ground_truth, verifier)
  if task == "countdown":
    if "numbers" not in extra:
      raise ValueError("countdown needs extra['numbers'] (e.g. '[30, 100, 93]')")
    return countdown_reward(completion, ground_truth, extra["numbers"])
  if task == "sudoku":
    return sudoku_reward(completion, ground_truth, extra.get("puzzle"))
  program = _code.code_program(task, completion, ground_truth, extra)
  return float(run_program(program, code_timeout_s, code_memory_mb).passed)


def score(task: str, completion: str, ground_truth: Any, extra: dict | None = None, *,
          format_reward: float = 0.0, code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
          code_memory_mb: int = DEFAULT_CODE_MEMORY_MB) -> float:
  """Reward of one completion: correctness (+ format_reward * format_score)."""
  _check_task(task)
  r = _correctness(task, completion, ground_truth, _extra(extra), None, code_timeout_s,
                   code_memory_mb)
  if format_reward:
    r += format_reward * format_score(task, completion)
  return r


def code_result(task: str, completion: str, ground_truth: Any, extra: dict | None = None, *,
                timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
                memory_mb: int = DEFAULT_CODE_MEMORY_MB) -> SandboxResult:
  """The full sandbox result (status, stdout/stderr tails) of a code completion: for debugging."""
  program = _code.code_program(_check_task(task), completion, ground_truth, _extra(extra))
  return run_program(program, timeout_s, memory_mb)


_DEFAULT_POOL: SandboxPool | None = None
_BATCH_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
  """The process-wide sandbox pool (SandboxPool's default size), created on first use."""
  global _DEFAULT_POOL
  with _LOCK:
    if _DEFAULT_POOL is None:
      _DEFAULT_POOL = SandboxPool()
    return _DEFAULT_POOL


def score_batch(tasks: Sequence[str] | str, completions: Sequence[str],
                ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None, *,
                pool: SandboxPool | None = None, format_reward: float = 0.0,
                code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
                code_memory_mb: int = DEFAULT_CODE_MEMORY_MB,
                verifier: MathVerifier | None = None) -> list[float]:
  """Rewards of a batch. `tasks` is one task name for all rows or one per row.

  Code rows are submitted to `pool` (default: `default_pool()`) first, so they run while the
  other rows are scored here. Thread-safe; blocks until all rewards are known.
  """
  n = len(completions)
  tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
  extras = [None] * n if extras is None else list(extras)
  if not (len(tasks) == len(ground_truths) == len(extras) == n):
    raise ValueError(f"batch lengths differ: {len(tasks)} tasks, {n} completions, "
                     f"{len(ground_truths)} ground truths, {len(extras)} extras")
  for t in set(tasks):
    _check_task(t)
  rewards = [0.0] * n
  futures: dict[int, concurrent.futures.Future] = {}
  code_rows = [i for i in range(n) if tasks[i] in CODE_TASKS]
  if code_rows:
    pool = pool or default_pool()
    for i in code_rows:
      program = _code.code_program(tasks[i], completions[i], ground_truths[i], _extra(extras[i]))
      futures[i] = pool.submit(program, code_timeout_s, code_memory_mb)
  for i in range(n):
    if i not in futures:
      rewards[i] = _correctness(tasks[i], completions[i], ground_truths[i], _extra(extras[i]),
                                verifier, code_timeout_s, code_memory_mb)
  for i, f in futures.items():
    rewards[i] = float(f.result().passed)
  if format_reward:
    for i in range(n):
      rewards[i] += format_reward * format_score(tasks[i], completions[i])
  return rewards


def submit_batch(tasks: Sequence[str] | str, completions: Sequence[str],
                 ground_truths: Sequence[Any], extras: Sequence[dict | None] | None = None,
                 **kwargs) -> concurrent.futures.Future:
  """`score_batch` in a background thread; returns a Future of the reward list, so the
  caller can overlap reward computation with device work."""
  global _BATCH_EXECUTOR
  with _LOCK:
    if _BATCH_EXECUTOR is None:
      _BATCH_EXECUTOR = concurrent.futures.ThreadPoolExecutor(
          max_workers=2, thread_name_prefix="bgpo-rewards")
    ex = _BATCH_EXECUTOR
  return ex.submit(score_batch, list(tasks) if not isinstance(tasks, str) else tasks,
                   list(completions), list(ground_truths),
                   None if extras is None else list(extras), **kwargs)
