"""The frozen reference policy of the KL term (rl.kl_beta > 0): made, saved and restored here.

The reference is the policy at RL start. Without an SFT warm-up that is the initial weights,
copied before any checkpoint is restored over them; after a warm-up it is the policy at the
hand-over, copied then and saved to WORKDIR/reference so that a run resumed later in RL finds it.

A LoRA run (config.lora.rank > 0) copies no base weights: its base is frozen. Starting from fresh
adapters (B = 0) the reference IS the frozen base (the same buffers, run without adapters); from
init.adapter, or after a warm-up, it is the base with a copy of the adapters at RL start (only the
adapters are copied and saved).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax.models import transformer


class ReferencePolicy:
  """Holds the frozen params (`params`, None until made) in rl.reference_dtype.

  Args:
    workdir: the run's directory; the reference lives in WORKDIR/reference.
    dtype: rl.reference_dtype.
    shardings: the params' shardings (the copy is laid out like the policy).
    needed: whether the run uses a KL term at all (rl mode and rl.kl_beta > 0).
    base, spec: a LoRA run's frozen base params and models.lora.LoraSpec (then the state's params
      are the adapters, `shardings` theirs, and only adapters are copied, in their own dtype);
      None for full fine-tuning.
    fresh_adapters: a LoRA run whose adapters start at B = 0 (no init.adapter): the reference at
      RL start without a warm-up is the base itself.
  """

  def __init__(self, workdir: str, dtype: str, shardings: Any, needed: bool, *, base: Any = None,
               spec: Any = None, fresh_adapters: bool = True):
    self.path = workdir.rstrip("/") + "/reference"
    self.dtype = jnp.dtype(dtype)
    self.shardings = shardings
    self.needed = needed
    self.base, self.spec, self.fresh_adapters = base, spec, fresh_adapters
    self.params = None

  def copy_of(self, params: Any) -> Any:
    """A frozen copy of `params` in the reference dtype on the params' shardings (a new buffer:
    the train step donates the state's); a LoRA run's adapters keep their dtype."""
    cast = (lambda x: x) if self.base is not None else (lambda x: x.astype(self.dtype))
    fn = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(cast(x)), p), out_shardings=self.shardings)
    return fn(params)

  def _wrap(self, copied: Any) -> Any:
    return copied if self.base is None else transformer.Adapted(self.base, copied, self.spec.scale)

  def start(self, params: Any) -> None:
    """Before any restore, without a warm-up: the initial weights are the reference (a LoRA run
    from fresh adapters: the frozen base itself, no copy)."""
    if not self.needed:
      return
    if self.base is not None and self.fresh_adapters:
      self.params = self.base
    else:
      self.params = self._wrap(self.copy_of(params))

  def at_rl_step(self, step: int, sft_steps: int, params: Any) -> None:
    """Called before each RL step: at the SFT -> RL hand-over the reference is the policy now
    (saved, so that resumes restore it)."""
    if self.needed and self.params is None:
      copied = self.copy_of(params)
      self.params = self._wrap(copied)
      if step == sft_steps and sft_steps:
        ckpt_lib.save_tree(self.path, copied)  # staged for s3://, az://, ...

  def restore(self, like_params: Any) -> Any:
    """The reference saved at the hand-over, laid out like `like_params` (the policy's)."""
    dtype = (lambda x: x.dtype) if self.base is not None else (lambda x: self.dtype)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype(x), sharding=sh),
                            like_params, self.shardings)
    if not ckpt_lib.tree_exists(self.path):
      raise FileNotFoundError(f"resuming an RL run with rl.kl_beta > 0 after an SFT warm-up needs the frozen "
                              f"reference saved at RL start, {self.path}; it is missing (was kl_beta 0 then?)")
    self.params = self._wrap(ckpt_lib.restore_tree(self.path, abstract))
    return self.params
