"""modsum reward: the fraction of the written-out sums that are right.

The answer (data.procedural.generate_modsum) is, for a digit string d_0 .. d_k, the sum modulo 10
of every adjacent pair, s_i = (d_i + d_{i+1}) mod 10, separated by spaces. The completion, cut at
its first end-of-turn token, is split on whitespace and its i-th piece is sum i: right when it is
the one digit s_i, at its place (a skipped sum shifts, and so costs, every sum after it). Scoring:
- score = reward = right sums / k (pieces after the last sum earn nothing);
- correct = every sum right and nothing after them.
"""

from __future__ import annotations

from bgpo_jax.rewards.extract import end_of_response


def modsum_grade(completion: str, digits: str) -> tuple[bool, float]:
  """(correct, fraction of sums right) of `completion` for the prompt's `digits` (e.g. "739")."""
  digits = str(digits)
  if len(digits) < 2 or not digits.isdigit():
    raise ValueError(f"modsum digits {digits[:40]!r} must be at least 2 decimal digits, e.g. '739'")
  truth = [str((int(a) + int(b)) % 10) for a, b in zip(digits, digits[1:])]
  got = end_of_response(completion).split()
  right = sum(1 for g, t in zip(got, truth) if g == t)
  frac = right / len(truth)
  return frac == 1.0 and len(got) == len(truth), frac
