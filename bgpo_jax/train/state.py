"""Train state (params, optimizer state, step) placed on the mesh by the logical-axis rules."""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bgpo_jax.models import family, llada
from bgpo_jax.models import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything the step updates. A pytree: checkpointed and sharded as a whole."""
  step: jax.Array
  params: Any
  opt_state: Any


def param_shardings(model_cfg: llada.LLaDAConfig, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = sharding_lib.DEFAULT_LOGICAL_RULES) -> Any:
  """NamedSharding per parameter from its logical axes (FSDP over embed, tensor over heads/MLP)."""
  shapes = jax.eval_shape(lambda: family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
  return sharding_lib.logical_to_sharding(family.module_for(model_cfg).param_logical_axes(model_cfg), mesh, rules, shapes)


def state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                    params_sharding: Any, mesh: Mesh) -> TrainState:
  """Optimizer moments follow their parameter's sharding; counters are replicated."""
  rep = NamedSharding(mesh, P())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, params_sharding,
                              transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=params_sharding, opt_state=opt)


def abstract_train_state(model_cfg: llada.LLaDAConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules=sharding_lib.DEFAULT_LOGICAL_RULES) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs with shardings, shardings) of the train state: no memory is allocated.

  Used to compile ahead of time and to restore checkpoints straight onto their shardings.
  """
  p_shard = param_shardings(model_cfg, mesh, rules)
  params = jax.eval_shape(lambda: family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
  opt_state = jax.eval_shape(optimizer.init, params)
  shardings = state_shardings(optimizer, opt_state, p_shard, mesh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_train_state(model_cfg: llada.LLaDAConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       *, rng: jax.Array | None = None, params: Any = None,
                       rules=sharding_lib.DEFAULT_LOGICAL_RULES) -> tuple[TrainState, TrainState]:
  """A fresh train state on the mesh, from `params` (e.g. imported weights) or a random init."""
  _, shardings = abstract_train_state(model_cfg, optimizer, mesh, rules)
  if params is None:
    if rng is None:
      raise ValueError("create_train_state needs rng (random init) or params")
    # Each device initializes only its own shard.
    params = jax.jit(lambda r: family.module_for(model_cfg).init_params(model_cfg, r), out_shardings=shardings.params)(rng)
  else:
    params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings
