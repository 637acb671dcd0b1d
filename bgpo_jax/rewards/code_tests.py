"""Code tests rewritten so that their verdict is computed where the candidate cannot reach it.

A HumanEval `check(candidate)` body or an MBPP assert list is trusted text from the dataset.
`humaneval_test` / `mbpp_test` turn it into a `TrustedTest`: the test's own code (its helpers,
loops, comparisons and expected values) runs in the grading process, and each name the test
calls that the SOLUTION defines (the function under test; MBPP's helper classes) is bound there
to a stub that ships the call's arguments to the sandbox and gets the result back as plain data
(rewards.judge). So the expected values never enter the sandbox and no assert runs inside it.

Which names are the solution's is decided from the test alone, never from the solution (a
solution that defines `abs` or `sorted` must not take over the test's own calls):
- HumanEval: the `candidate` argument of `check`, bound to the entry point;
- MBPP: the names called in every assert line, preferring names that are neither builtins nor
  standard-library modules (a task whose function is named `sum` still tests its `sum`), plus
  every other called name that is neither a builtin, nor a standard-library module, nor defined
  by the test itself.
Standard-library modules the test uses without importing them (MBPP leaned on the solution's
`import math`) are imported in the grading process. A test that cannot be rewritten this way
(it does not parse, checks nothing, or reads the solution's attributes or globals) raises
`Unrewritable`: it fails closed and is counted, never run the old way.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import sys

# Names whose use would let the test see the grading process's namespace instead of the
# solution's: such a test depended on sharing the solution's namespace.
_NAMESPACE_PEEKS = frozenset({"globals", "locals", "vars", "eval", "exec", "__import__", "dir"})


class Unrewritable(ValueError):
  """The test's shape cannot be graded without running it inside the sandbox."""


@dataclasses.dataclass(frozen=True)
class TrustedTest:
  """A test set as the judge runs it.

  code: the compiled test (trusted helpers + the test's statements), run in the grading
    process with `remote` names bound to sandbox calls and `imports` already imported.
  remote: names of the solution's functions or classes that the test calls.
  check: for HumanEval, the function `code` defines that is called with the entry point's stub
    (`check(candidate)`); None when the statements themselves are the test (MBPP).
  entry: the remote name passed to `check`.
  """
  code: object
  remote: tuple[str, ...]
  imports: tuple[str, ...] = ()
  check: str | None = None
  entry: str | None = None


def _parse(source: str, what: str) -> ast.Module:
  try:
    return ast.parse(source)
  except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
    raise Unrewritable(f"the {what} do not parse: {type(e).__name__}: {e}") from None


def _bound_names(tree: ast.AST) -> set[str]:
  """Every name the code binds anywhere (assignments, loop and comprehension targets, defs,
  classes, imports, arguments, except / with targets)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
      out.add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      out.add(node.name)
    elif isinstance(node, ast.arg):
      out.add(node.arg)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      out.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      out.add(node.name)
  return out


def _loaded_names(tree: ast.AST) -> set[str]:
  return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _called_names(tree: ast.AST) -> set[str]:
  return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _trusted_name(name: str) -> bool:
  return hasattr(builtins, name) or name in sys.stdlib_module_names


def _check_shape(tree: ast.AST, remote: set[str]) -> None:
  """Refuses what the rewrite cannot keep meaning the same."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Name) and node.id in _NAMESPACE_PEEKS:
      raise Unrewritable(f"the tests call {node.id}(), which read the solution's namespace")
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in remote):
      raise Unrewritable(f"the tests read attribute {node.attr!r} of the solution's "
                         f"{node.value.id!r}, which stays in the sandbox")
    if isinstance(node, (ast.Global, ast.Nonlocal)):
      raise Unrewritable("the tests rebind names with global / nonlocal")


def _stdlib_imports(names: set[str]) -> tuple[str, ...]:
  """`import m` for each free name that is a standard-library module (not a builtin)."""
  return tuple(f"import {n}" for n in sorted(names)
               if n in sys.stdlib_module_names and not hasattr(builtins, n))


@functools.lru_cache(maxsize=4096)
def mbpp_test(asserts: tuple[str, ...], setup: str = "") -> TrustedTest:
  """The TrustedTest of an MBPP row: its assert lines (and test_setup_code)."""
  if not any(a.strip() for a in asserts):
    raise Unrewritable("the row has no assert lines: a test that checks nothing passes anything")
  lines = [_parse(a.strip(), "assert lines") for a in asserts if a.strip()]
  if not any(isinstance(n, ast.Assert) for t in lines for n in ast.walk(t)):
    raise Unrewritable("the tests hold no assert statement")
  _parse(setup, "test setup code")
  source = setup + "\n" + "\n".join(a.strip() for a in asserts if a.strip()) + "\n"
  tree = _parse(source, "assert lines")
  bound = _bound_names(tree)
  free_calls = _called_names(tree) - bound
  common = set.intersection(*[_called_names(t) for t in lines]) - bound
  subjects = {n for n in common if not _trusted_name(n)} or common
  remote = subjects | {n for n in free_calls if not _trusted_name(n)}
  if not remote:
    raise Unrewritable("the asserts call no function of the solution")
  _check_shape(tree, remote)
  free = _loaded_names(tree) - bound - remote
  return TrustedTest(code=compile(tree, "tests.py", "exec"), remote=tuple(sorted(remote)),
                     imports=_stdlib_imports(free))


@functools.lru_cache(maxsize=4096)
def humaneval_test(prompt_code: str, check_source: str, entry: str) -> TrustedTest:
  """The TrustedTest of a HumanEval row: the prompt's code (its helpers, e.g. `poly`, trusted
  as the dataset wrote them) + the test code defining `check(candidate)`, called with the
  entry point `entry` of the solution."""
  if not entry.isidentifier():
    raise Unrewritable(f"the entry point {entry!r} is not a name")
  _parse(prompt_code, "prompt's code")
  source = prompt_code + "\n\n" + check_source + "\n"
  tree = _parse(source, "tests")
  checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
  if not checks or not checks[-1].args.args:
    raise Unrewritable("the tests define no check(candidate) function")
  param = checks[-1].args.args[0].arg
  if not _called_names(checks[-1]) & {param}:
    raise Unrewritable("check() never calls the candidate")
  _check_shape(tree, {param, entry})
  free = _loaded_names(tree) - _bound_names(tree)
  # The entry point's name is the solution's too (a test may call it by name, not as candidate).
  return TrustedTest(code=compile(tree, "tests.py", "exec"), remote=(entry,),
                     imports=_stdlib_imports(free), check="check", entry=entry)
