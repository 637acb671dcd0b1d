"""The frozen reference policy of the KL term (rl.kl_beta > 0): made, saved and restored here.

The reference is the policy at RL start. Without an SFT warm-up that is the initial weights,
copied before any checkpoint is restored over them; after a warm-up it is the policy at the
hand-over, copied then and saved to WORKDIR/reference so that a run resumed later in RL finds it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bgpo_jax import checkpoint as ckpt_lib


class ReferencePolicy:
  """Holds the frozen params (`params`, None until made) in rl.reference_dtype.

  Args:
    workdir: the run's directory; the reference lives in WORKDIR/reference.
    dtype: rl.reference_dtype.
    shardings: the params' shardings (the copy is laid out like the policy).
    needed: whether the run uses a KL term at all (rl mode and rl.kl_beta > 0).
  """

  def __init__(self, workdir: str, dtype: str, shardings: Any, needed: bool):
    self.path = workdir.rstrip("/") + "/reference"
    self.dtype = jnp.dtype(dtype)
    self.shardings = shardings
    self.needed = needed
    self.params = None

  def copy_of(self, params: Any) -> Any:
    """A frozen copy of `params` in the reference dtype on the params' shardings (a new buffer:
    the train step donates the state's)."""
    fn = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x.astype(self.dtype)), p),
                 out_shardings=self.shardings)
    return fn(params)

  def start(self, params: Any) -> None:
    """Before any restore, without a warm-up: the initial weights are the reference."""
    if self.needed:
      self.params = self.copy_of(params)

  def at_rl_step(self, step: int, sft_steps: int, params: Any) -> None:
    """Called before each RL step: at the SFT -> RL hand-over the reference is the policy now
    (saved, so that resumes restore it)."""
    if self.needed and self.params is None:
      self.params = self.copy_of(params)
      if step == sft_steps and sft_steps:
        ckpt_lib.save_tree(self.path, self.params)  # staged for s3://, az://, ...

  def restore(self, like_params: Any) -> Any:
    """The reference saved at the hand-over, laid out like `like_params` (the policy's)."""
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, self.dtype, sharding=sh),
                            like_params, self.shardings)
    if not ckpt_lib.tree_exists(self.path):
      raise FileNotFoundError(f"resuming an RL run with rl.kl_beta > 0 after an SFT warm-up needs the frozen "
                              f"reference saved at RL start, {self.path}; it is missing (was kl_beta 0 then?)")
    self.params = ckpt_lib.restore_tree(self.path, abstract)
    return self.params
