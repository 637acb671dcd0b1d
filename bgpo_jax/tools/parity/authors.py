"""Runs the authors' own code from their checkout, for the parity fixture scripts in this folder.

A fixture must come from the authors' code exactly as published, so it is never copied into this
repository: `load` cuts the named top-level functions and class methods out of their file with `ast`
and executes them in a fresh namespace. What their file imports from TRL / accelerate is stood in
for on a CPU-only torch (`set_seed`, `nanmin`, `nanmax`); decorators are dropped, as the only ones on
these methods are TRL's profiling_decorator (timing only).

Torch and numpy only: the scripts run in a torch environment without jax.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def set_seed(seed) -> None:
  """accelerate.utils.set_seed on a CPU-only machine (its CUDA / XLA seeding has nothing to seed)."""
  seed = int(seed)
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def nanmin(t: torch.Tensor) -> torch.Tensor:
  """trl.trainer.utils.nanmin: the minimum over the non-NaN entries, NaN if there are none."""
  return torch.min(t[~torch.isnan(t)]) if (~torch.isnan(t)).any() else torch.tensor(float("nan"))


def nanmax(t: torch.Tensor) -> torch.Tensor:
  """trl.trainer.utils.nanmax: the maximum over the non-NaN entries, NaN if there are none."""
  return torch.max(t[~torch.isnan(t)]) if (~torch.isnan(t)).any() else torch.tensor(float("nan"))


def load(path: Path, *, functions: Iterable[str] = (), cls: str | None = None, methods: Iterable[str] = (),
         extra: dict | None = None) -> dict:
  """Executes the top-level `functions` and the `methods` of class `cls` from the authors' file `path`,
  decorators stripped, as plain functions in one namespace, and returns that namespace.

  The namespace holds torch, F (torch.nn.functional), np and `set_seed`, then `extra` (the other
  names their code reads). The functions' globals are that namespace, so a caller may swap an entry
  (e.g. a module-level function a method calls) after loading. A method takes `self` as usual: bind
  it to a stand-in trainer, e.g. type("Authors", (), {m: ns[m] for m in methods}).

  Raises SystemExit naming the file and what it lacks (a wrong --repo, or a changed upstream file).
  """
  functions, methods = tuple(functions), tuple(methods)
  if methods and cls is None:
    raise ValueError("methods need their class: pass cls")
  if set(functions) & set(methods):  # one namespace: a method would silently replace the function
    raise ValueError(f"names both a function and a method: {sorted(set(functions) & set(methods))}")
  path = Path(path)
  if not path.is_file():
    raise SystemExit(f"{path} not found; is --repo the authors' checkout?")
  tree = ast.parse(path.read_text(), filename=str(path))
  funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions]
  missing = sorted(set(functions) - {f.name for f in funcs})
  if cls is not None:
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    found = [] if node is None else [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in methods]
    missing += [f"{cls}.{m}" for m in sorted(set(methods) - {f.name for f in found})]
    if node is None:
      missing.insert(0, f"class {cls}")
    funcs += found
  if missing:
    raise SystemExit(f"{path} lacks {', '.join(missing)}; is --repo the authors' checkout at the right commit?")
  for f in funcs:
    f.decorator_list = []  # TRL's profiling_decorator: it only times the call
  ns = {"torch": torch, "F": F, "np": np, "set_seed": set_seed, **(extra or {})}
  module = ast.fix_missing_locations(ast.Module(body=funcs, type_ignores=[]))
  exec(compile(module, str(path), "exec"), ns)  # noqa: S102 - the point: their code, as published
  return ns


def rounded(o):
  """`o` (JSON-able) with every float written to 9 significant digits (float32 round-trips), keeping
  a fixture small."""
  if isinstance(o, float):
    return float(f"{o:.9g}")
  if isinstance(o, list):
    return [rounded(v) for v in o]
  if isinstance(o, dict):
    return {k: rounded(v) for k, v in o.items()}
  return o
