"""Models: LLaDA (llada.py), Dream (dream.py), one interface over both (family.py), the model they
share (transformer.py: config checks, parameter tree, init, layer scan, head, cached forwards;
layers.py: the block; attention.py: the kernels), checkpoint import/export (hf.py), logical
sharding (sharding.py)."""

from bgpo_jax.models.dream import DreamConfig

from bgpo_jax.models.llada import (
  LLaDAConfig,
  forward,
  hidden_states,
  init_params,
  lm_head,
  param_logical_axes,
)
from bgpo_jax.models.sharding import DEFAULT_LOGICAL_RULES, logical_to_sharding, make_mesh

__all__ = [
  "DreamConfig",
  "LLaDAConfig",
  "forward",
  "hidden_states",
  "init_params",
  "lm_head",
  "param_logical_axes",
  "DEFAULT_LOGICAL_RULES",
  "logical_to_sharding",
  "make_mesh",
]
