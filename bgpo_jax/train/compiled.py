"""The run's compiled programs: one train step per phase and batch shape, and the old / reference
terms, each compiled once (ahead of time for the train step, with its memory logged)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax

from bgpo_jax.train import step as step_lib


def _shape_key(batch: dict) -> tuple:
  return tuple((k, v.shape) for k, v in sorted(batch.items()))


class CompiledSteps:
  """Compiled train steps and terms functions of one run, keyed by phase and batch shapes.

  Args:
    model_cfg, mesh, optimizer, schedule, shardings: the run's (shardings: the train state's).
    step_config: phase ("sft" / "rl") -> step.StepConfig.
  """

  def __init__(self, model_cfg, mesh, optimizer, schedule, shardings, step_config: Callable[[str], step_lib.StepConfig]):
    self.model_cfg, self.mesh, self.optimizer, self.schedule = model_cfg, mesh, optimizer, schedule
    self.shardings, self.step_config = shardings, step_config
    self._cache: dict = {}

  def train_step(self, phase: str, state: Any, batch: dict) -> tuple[Any, dict]:
    """(compiled step, its per-device memory report) for this phase and batch (shapes and keys,
    old / reference terms included); compiled ahead of time on first use."""
    key = (phase, _shape_key(batch))
    if key not in self._cache:
      fn = step_lib.jit_train_step(self.model_cfg, self.step_config(phase), self.optimizer, self.schedule,
                                   self.mesh, self.shardings, batch)
      t0 = time.time()
      compiled = fn.lower(state, batch).compile()
      mem = step_lib.memory_report(compiled)
      logging.info("compiled the %s step in %.1f s; per device: %.1f MiB (temporaries %.1f MiB)", phase,
                   time.time() - t0, mem.get("total_bytes", 0) / 2**20, mem.get("temp_bytes", 0) / 2**20)
      self._cache[key] = (compiled, mem)
    return self._cache[key]

  def terms(self, params: Any, batch: dict) -> jax.Array:
    """Old-policy or reference terms of `params` on this RL batch's masks (no gradient)."""
    key = ("terms", _shape_key(batch), tuple(x.dtype for x in jax.tree.leaves(params)[:1]))
    if key not in self._cache:
      self._cache[key] = step_lib.jit_old_terms(self.model_cfg, self.step_config("rl"), self.mesh,
                                                self.shardings.params, batch)
    return self._cache[key](params, batch)
