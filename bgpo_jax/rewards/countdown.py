"""Countdown reward: an arithmetic expression over the given numbers that hits the target.

The completion is cut at its first end-of-turn token. The expression is, in this order: the last
`\\boxed{...}` inside the last `<answer>...</answer>` (LLaDA's usual answer is
`<answer>\\boxed{49 + 55 - 53}</answer>`), else that answer tag's content (its lines joined),
else the last `\\boxed{...}` anywhere, else the last non-empty line of the completion that
consists only of digits, spaces, `+ - * / ( ) =` and the operator spellings below. `×`, `·`,
`\\times`, `\\cdot` map to `*`; `÷`, `\\div` to `/`; `$`, `\\(`, `\\)` are dropped (a letter `x`
is not a multiplication). A trailing "= <number>" (e.g. "30 + 93 - 100 = 23") is ignored, as in
d1's evaluation; any other `=` makes the answer wrong.

Rules (as in the d1 / TinyZero countdown reward): every given number is used exactly once (the
integer literals of the expression equal `numbers` as a multiset), only `+ - * /`, unary minus
and parentheses appear (checked on the `ast`; names, calls, powers, attributes, floats,
comparisons... are rejected), and the value equals the target within 1e-5. Evaluation uses
exact fractions; division by zero is simply wrong. Expressions longer than 200 characters are
rejected before parsing, so no input can make this slow.

Training reward recipes (`countdown_reward(..., recipe=)`, config `rewards.countdown`):
"d1" (d1 / TinyZero): 1.0 correct, `FORMAT_SCORE` = 0.1 for a well-formed answer that is wrong
(an answer tag or a `\\boxed{}` was found), 0.0 without one; "binary": 1.0 / 0.0.
"""

from __future__ import annotations

import ast
import collections
import json
import re
from fractions import Fraction
from typing import Any, Sequence

from bgpo_jax.rewards.extract import answer_tag, end_of_response, last_boxed

MAX_EXPR_CHARS = 200
FORMAT_SCORE = 0.1  # d1 / TinyZero compute_score(format_score=0.1)
RECIPES = ("d1", "binary")
_EXPR_LINE_RE = re.compile(r"^[\d\s+\-*/().=×÷·]+$")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def parse_numbers(numbers: Any) -> list[int]:
  """`numbers` as a list of ints: a list / tuple / array, or a string like "[30, 100, 93]"."""
  if isinstance(numbers, str):
    try:
      numbers = json.loads(numbers)
    except json.JSONDecodeError:
      numbers = re.findall(r"-?\d+", numbers)
  out = []
  for n in list(numbers):
    f = float(n)
    if f != int(f):
      raise ValueError(f"countdown number {n!r} is not an integer")
    out.append(int(f))
  return out


def _clean(expr: str) -> str:
  expr = expr.strip().strip("`").strip()
  for a, b in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"),
               ("÷", "/"), ("\u2212", "-"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
               ("$", "")):
    expr = expr.replace(a, b)
  if "=" in expr:
    lhs, *rest = expr.split("=")
    if not all(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", r) for r in rest):
      return ""  # "=" only allowed as a trailing "= target"
    expr = lhs
  return expr.strip()


def _answer_text(completion: str) -> tuple[str | None, bool]:
  """(raw answer text or None, whether it came from an answer tag or a box)."""
  text = end_of_response(completion)
  tag = answer_tag(text)
  if tag is not None:
    box = last_boxed(tag)
    return (box if box is not None else tag), True
  box = last_boxed(text)
  if box is not None:
    return box, True
  for line in reversed(text.splitlines()):
    if line.strip() and _EXPR_LINE_RE.match(line.strip()) and re.search(r"\d", line):
      return line, False
  return None, False


def extract_expression(completion: str) -> str | None:
  """The cleaned expression of a completion (module docstring), or None."""
  raw, _ = _answer_text(completion)
  if raw is None:
    return None
  lines = [l for l in raw.splitlines() if l.strip()]
  return _clean(" ".join(lines)) if lines else None


def _eval(node: ast.AST, literals: list[int]) -> Fraction:
  if isinstance(node, ast.Expression):
    return _eval(node.body, literals)
  if isinstance(node, ast.Constant) and type(node.value) is int:
    literals.append(node.value)
    return Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    left, right = _eval(node.left, literals), _eval(node.right, literals)
    return _OPS[type(node.op)](left, right)  # ZeroDivisionError for x / 0
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    v = _eval(node.operand, literals)
    return -v if isinstance(node.op, ast.USub) else v
  raise ValueError(f"disallowed syntax {type(node).__name__}")


def evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
  """(exact value, integer literals used) of a safe arithmetic expression, or None when the
  expression is too long, malformed, uses anything but + - * / ( ) or divides by zero."""
  if not expr or len(expr) > MAX_EXPR_CHARS:
    return None
  try:
    tree = ast.parse(expr, mode="eval")
    literals: list[int] = []
    value = _eval(tree, literals)
  except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
    return None
  return value, literals


def countdown_grade(completion: str, target: Any, numbers: Sequence[int] | str) -> tuple[bool, bool]:
  """(correct, well_formed): well_formed means an answer tag or a box held the answer."""
  raw, formed = _answer_text(completion)
  expr = extract_expression(completion) if raw is not None else None
  if not expr:
    return False, formed
  res = evaluate(expr)
  if res is None:
    return False, formed
  value, used = res
  if collections.Counter(used) != collections.Counter(parse_numbers(numbers)):
    return False, formed
  return abs(float(value) - float(target)) < 1e-5, formed


def countdown_reward(completion: str, target: Any, numbers: Sequence[int] | str,
                     recipe: str = "binary") -> float:
  """Training reward under `recipe` ("d1": 1 / 0.1 / 0, "binary": 1 / 0)."""
  if recipe not in RECIPES:
    raise ValueError(f"countdown reward recipe {recipe!r} is unknown; use one of {RECIPES}")
  correct, formed = countdown_grade(completion, target, numbers)
  if correct:
    return 1.0
  return FORMAT_SCORE if (recipe == "d1" and formed) else 0.0
