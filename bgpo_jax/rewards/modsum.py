"""modsum reward: the fraction of the written-out running-sum steps that are right.

The answer (data.procedural.generate_modsum) is the running sum modulo 10 of a digit string,
one "a+b=c" step per addition, steps separated by whitespace; the ground truth is that text, and
the digits are read back from it (the first step's a, then every step's b). The completion, cut at
its first end-of-turn token, is split on whitespace and its i-th piece is step i. Step i is right
when it reads "a+b=c" with a = the previous written step's c (the first digit for i = 0), b =
digit i+1 and c = (a + b) mod 10: each step is checked as a reader checks a chain, locally, so one
slip costs one step, not every step after it (a wrong running sum carried on correctly still
earns the later steps). Scoring:
- score = reward = right steps / true steps (pieces after the last step earn nothing);
- correct = every step right and nothing after them (then the written chain is the true one).
"""

from __future__ import annotations

import re

from bgpo_jax.rewards.extract import end_of_response

_STEP = re.compile(r"^(\d)\+(\d)=(\d)$")


def modsum_digits(steps: str) -> str:
  """The digits a ground truth's steps add: the first step's a, then each step's b."""
  parsed = [_STEP.match(s) for s in str(steps).split()]
  if not parsed or not all(parsed):
    raise ValueError(f"modsum ground truth {str(steps)[:40]!r} must be 'a+b=c' steps separated by spaces, "
                     "e.g. '7+3=0 0+9=9'")
  return parsed[0].group(1) + "".join(m.group(2) for m in parsed)


def modsum_grade(completion: str, steps: str) -> tuple[bool, float]:
  """(correct, fraction of steps right) of `completion` against the true `steps`."""
  digits = modsum_digits(steps)
  n = len(digits) - 1
  got = end_of_response(completion).split()
  right, prev = 0, int(digits[0])
  for i, piece in enumerate(got[:n]):
    m = _STEP.match(piece)
    if m is None:
      prev = None  # an unreadable step: the next one has no running sum to continue
      continue
    a, b, c = (int(x) for x in m.groups())
    right += (prev is not None and a == prev and b == int(digits[i + 1]) and c == (a + b) % 10)
    prev = c
  frac = right / n
  return frac == 1.0 and len(got) == n, frac
