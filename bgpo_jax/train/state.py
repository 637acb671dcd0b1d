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


# ----------------------------------------------------------------------------------------- LoRA
# With LoRA (config.lora.rank > 0) the TrainState's `params` are the adapters ({weight key:
# {"a": [L,in,r], "b": [L,r,out]}}, models/lora.py): the optimizer state, the gradient accumulator
# and the checkpoints cover them only. The base weights are frozen, outside the state, in
# lora.base_dtype, sharded by the same logical rules as full fine-tuning's params.


def adapter_shardings(model_cfg, spec, mesh: Mesh, rules=sharding_lib.DEFAULT_LOGICAL_RULES) -> Any:
  """NamedSharding per adapter leaf from models.lora.adapter_logical_axes (A like its weight's
  rows, B like its columns, the rank axis never split)."""
  from bgpo_jax.models import lora

  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), lora.adapter_shapes(model_cfg, spec),
                        is_leaf=lambda s: isinstance(s, tuple))
  return sharding_lib.logical_to_sharding(lora.adapter_logical_axes(model_cfg, shapes), mesh, rules, shapes)


def frozen_base(model_cfg, mesh: Mesh, dtype: Any, *, rng: jax.Array | None = None, params: Any = None,
                rules=sharding_lib.DEFAULT_LOGICAL_RULES) -> tuple[Any, Any]:
  """(base params in `dtype` on their shardings, those shardings): `params` (imported weights,
  consumed: their buffers are donated to the cast) or a random init from `rng`, as create_train_state
  makes them (so a LoRA run's base equals the full fine-tuning run's initial weights, cast)."""
  shardings = param_shardings(model_cfg, mesh, rules)
  dtype = jnp.dtype(dtype)
  if params is None:
    if rng is None:
      raise ValueError("frozen_base needs rng (random init) or params")
    init = family.module_for(model_cfg).init_params
    base = jax.jit(lambda r: jax.tree.map(lambda x: x.astype(dtype), init(model_cfg, r)), out_shardings=shardings)(rng)
  else:
    params = jax.device_put(params, shardings)
    base = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings,
                   donate_argnums=(0,))(params)
  return base, shardings


def create_lora_state(model_cfg, spec, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                      rng: jax.Array | None = None, adapters: Any = None,
                      rules=sharding_lib.DEFAULT_LOGICAL_RULES) -> tuple[TrainState, TrainState]:
  """A fresh train state over the adapters of `spec` (models.lora.LoraSpec) in model.param_dtype:
  `adapters` (e.g. models.lora.load_peft's) or fresh ones from `rng` (B = 0: the base model)."""
  from bgpo_jax.models import lora

  a_shard = adapter_shardings(model_cfg, spec, mesh, rules)
  dtype = model_cfg.param_jnp_dtype
  if adapters is None:
    if rng is None:
      raise ValueError("create_lora_state needs rng (fresh adapters) or adapters")
    adapters = jax.jit(lambda r: lora.init_adapters(model_cfg, spec, r, dtype), out_shardings=a_shard)(rng)
  else:
    lora.check_adapters(model_cfg, adapters, spec)
    adapters = jax.jit(lambda a: jax.tree.map(lambda x: x.astype(dtype), a), out_shardings=a_shard)(adapters)
  opt_state = jax.eval_shape(optimizer.init, adapters)
  shardings = state_shardings(optimizer, opt_state, a_shard, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(adapters)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=adapters, opt_state=opt_state), shardings
