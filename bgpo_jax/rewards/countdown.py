"""Countdown reward: an arithmetic expression over the given numbers that hits the target.

The expression is the last `<answer>...</answer>` content (its lines joined), else the last
non-empty line of the completion that consists only of digits, spaces, `+ - * / ( ) =` and the
operator spellings below. `×`, `·`, `\\times`, `\\cdot` map to `*`; `÷`, `\\div` to `/`; `$`,
`\\(`, `\\)` are dropped (a letter `x` is not a multiplication). A trailing "= <number>"
(e.g. "30 + 93 - 100 = 23") is ignored; any other `=` makes the answer wrong.

Rules (as in the d1 / TinyZero countdown reward): every given number is used exactly once (the
integer literals of the expression equal `numbers` as a multiset), only `+ - * /`, unary minus
and parentheses appear (checked on the `ast`; names, calls, powers, attributes, floats,
comparisons... are rejected), and the value equals the target within 1e-5. Evaluation uses
exact fractions; division by zero is simply wrong. Expressions longer than 200 characters are
rejected before parsing, so no input can make this slow.
"""

from __future__ import annotations

import ast
import collections
import json
import re
from fractions import Fraction
from typing import Any, Sequence

from bgpo_jax.rewards.extract import answer_tag

MAX_EXPR_CHARS = 200
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


def extract_expression(completion: str) -> str | None:
  tag = answer_tag(completion)
  if tag is not None:
    lines = [l for l in tag.splitlines() if l.strip()]
    return _clean(" ".join(lines)) if lines else None
  for line in reversed(completion.splitlines()):
    if line.strip() and _EXPR_LINE_RE.match(line.strip()) and re.search(r"\d", line):
      return _clean(line)
  return None


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


def countdown_reward(completion: str, target: Any, numbers: Sequence[int] | str) -> float:
  expr = extract_expression(completion)
  if expr is None:
    return 0.0
  res = evaluate(expr)
  if res is None:
    return 0.0
  value, used = res
  if collections.Counter(used) != collections.Counter(parse_numbers(numbers)):
    return 0.0
  return float(abs(float(value) - float(target)) < 1e-5)
