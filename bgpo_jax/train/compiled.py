"""The run's compiled programs: one train step per phase and batch shape, and the old / reference
terms, each compiled once (ahead of time for the train step, with its memory logged)."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import jax

from bgpo_jax.models import transformer
from bgpo_jax.train import step as step_lib


def _shape_key(batch: dict) -> tuple:
  return tuple((k, v.shape) for k, v in sorted(batch.items()))


class CompiledSteps:
  """Compiled train steps and terms functions of one run, keyed by phase and batch shapes.

  Args:
    model_cfg, mesh, optimizer, schedule, shardings: the run's (shardings: the train state's).
    step_config: phase ("sft" / "rl") -> step.StepConfig.
    base, base_shardings: a LoRA run's frozen base params and their shardings (the state holds the
      adapters); None for full fine-tuning.
  """

  def __init__(self, model_cfg, mesh, optimizer, schedule, shardings, step_config: Callable[[str], step_lib.StepConfig],
               base: Any = None, base_shardings: Any = None):
    self.model_cfg, self.mesh, self.optimizer, self.schedule = model_cfg, mesh, optimizer, schedule
    self.shardings, self.step_config = shardings, step_config
    self.base, self.base_shardings = base, base_shardings
    self._cache: dict = {}

  def train_step(self, phase: str, state: Any, batch: dict) -> tuple[Any, dict]:
    """(compiled step, its per-device memory report) for this phase and batch (shapes and keys,
    old / reference terms included); compiled ahead of time on first use. The step is called as
    step(state, batch) -> (state, metrics) (a LoRA run's frozen base is bound here)."""
    key = (phase, _shape_key(batch))
    if key not in self._cache:
      fn = step_lib.jit_train_step(self.model_cfg, self.step_config(phase), self.optimizer, self.schedule,
                                   self.mesh, self.shardings, batch, self.base_shardings)
      t0 = time.time()
      base = () if self.base is None else (self.base,)
      compiled = fn.lower(state, batch, *base).compile()
      mem = step_lib.memory_report(compiled)
      if base:
        compiled = functools.partial(_with_base, compiled, self.base)
      logging.info("compiled the %s step in %.1f s; per device: %.1f MiB (temporaries %.1f MiB)", phase,
                   time.time() - t0, mem.get("total_bytes", 0) / 2**20, mem.get("temp_bytes", 0) / 2**20)
      self._cache[key] = (compiled, mem)
    return self._cache[key]

  def terms(self, params: Any, batch: dict) -> jax.Array:
    """Old-policy or reference terms of `params` on this RL batch's masks (no gradient): a full
    fine-tuning run's params, or in a LoRA run the base alone or a transformer.Adapted view."""
    adapted = isinstance(params, transformer.Adapted)
    key = ("terms", _shape_key(batch), tuple(x.dtype for x in jax.tree.leaves(params)[:1]), adapted)
    if key not in self._cache:
      if self.base_shardings is None:
        shardings = self.shardings.params
      elif adapted:
        shardings = transformer.Adapted(self.base_shardings, self.shardings.params, params.scale)
      else:
        shardings = self.base_shardings
      self._cache[key] = step_lib.jit_old_terms(self.model_cfg, self.step_config("rl"), self.mesh, shardings, batch)
    return self._cache[key](params, batch)


def _with_base(compiled, base, state, batch):
  return compiled(state, batch, base)
