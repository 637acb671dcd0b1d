"""The sharded train step: gradient accumulation by `lax.scan` over micro-batches and MC samples.

BGPO's bound is a sum of per-sample terms g_j, so its gradient is the sum of per-sample
gradients: the step scans over micro-batches and, inside, over the n MC samples; each
iteration runs one forward/backward of one sample and adds its gradient to a float32
accumulator. Only one sample's activations are alive at a time, so peak memory is flat in n
and in the number of micro-batches. One optax update follows.

The step knows no objective by name: it asks the registry (bgpo_jax/objectives) for the
objective's terms. An objective that is a sum of per-sample terms (`per_sample`: bgpo, sft) is
scanned one sample at a time; the others (vrpo_ol: exp(mean_j d_j) * A needs every sample's
graph at once; diffu_grpo: one-step mean-field token log-probs, d1) run once per micro-batch.

Old and reference terms come from `compute_old_terms` (no gradient) on the same masks: with the
params before the first update (old) or the frozen reference params (ref). diffu_grpo's prompt
masks are drawn from `row_seeds` (one key per row): the trainer passes new seeds, and the old
and reference log-probs computed with them, for every inner update.

Batch layout (global arrays; B = rollout batch = prompts * G, S = P + L prompt and response
positions, L = gen_length, n = MC samples), from `objectives.batch_layout`:
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bgpo_jax import objectives
from bgpo_jax.models import llada
from bgpo_jax.models import lora as lora_lib
from bgpo_jax.models import sharding as sharding_lib
from bgpo_jax.objectives.diffu_grpo import _row_keys  # noqa: F401  (tests draw diffu_grpo's masks)
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train.state import TrainState

if __doc__:  # None under python -OO
  __doc__ += objectives.describe_layout()
# Arrays whose batch axis is not the first one (every registered objective's fields).
BATCH_AXIS = objectives.BATCH_AXIS
# A LoRA run with lora.dropout > 0: [B] uint32, each row's dropout seed for this update.
DROPOUT_SEEDS = objectives.base.LORA_DROPOUT_FIELD.name


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of one train step (hashable: part of the compiled program).

  The step's own knobs, and `hparams`: the objective's hyper-parameters, an instance of its
  frozen `Hparams` dataclass (None = its defaults; `objectives.get(name).hparams(values)` fills
  one by field name, as the run builder does from config.rl).
  """
  objective: str = "bgpo"
  num_mc_samples: int = 16
  micro_batch_size: int = 0  # global rows per micro-batch; 0 = the whole batch at once
  gen_length: int = 256
  off_policy: bool = False  # old terms come from the batch instead of stop_gradient
  kl_beta: float = 0.0  # k3 KL weight (needs the objective's reference terms in the batch)
  hparams: Any = None
  # models.lora.LoraSpec of a LoRA run (state.params are the adapters, the frozen base an argument
  # of the step), or None: full fine-tuning.
  lora: Any = None

  def __post_init__(self):
    impl = objectives.get(self.objective)  # unknown names fail here, listing the registered ones
    if self.num_mc_samples < 1:
      raise ValueError(f"num_mc_samples {self.num_mc_samples} must be >= 1")
    if self.hparams is None:
      object.__setattr__(self, "hparams", impl.Hparams())
    elif not isinstance(self.hparams, impl.Hparams):
      raise TypeError(f"hparams of objective {self.objective!r} must be a {impl.Hparams.__name__}, "
                      f"got {type(self.hparams).__name__}; build it with objectives.get(name).hparams(values)")

  @property
  def impl(self) -> objectives.Objective:
    return objectives.get(self.objective)


def _split_micro(x: jax.Array, axis: int, num_micro: int) -> jax.Array:
  """[..., B, ...] -> [num_micro, ..., B/num_micro, ...], micro-batch k = rows k, k+M, k+2M, ...

  Interleaving (rather than contiguous chunks) keeps every micro-batch spread over all the
  devices that hold the batch axis, so no data moves and no device idles.
  """
  if num_micro == 1:
    return x[None]
  shape = x.shape
  mb = shape[axis] // num_micro
  x = x.reshape(shape[:axis] + (mb, num_micro) + shape[axis + 1:])
  return jnp.moveaxis(x, axis + 1, 0)


def _num_micro(cfg: StepConfig, batch_size: int) -> int:
  mb = cfg.micro_batch_size or batch_size
  if batch_size % mb:
    raise ValueError(
        f"batch size {batch_size} is not a multiple of micro_batch_size {mb}; "
        "pick a micro-batch size that divides the rollout batch (prompts * group_size)")
  return batch_size // mb


def model_params(cfg: StepConfig, params, base=None):
  """What the objectives hand the model: `params` (full fine-tuning), or for a LoRA run
  (cfg.lora) the frozen `base` with the adapters `params` as one transformer.Adapted view."""
  if cfg.lora is None:
    if base is not None:
      raise ValueError("a frozen base was given to a full fine-tuning step; set StepConfig.lora to its LoraSpec")
    return params
  if base is None:
    raise ValueError(f"StepConfig.lora={cfg.lora} trains adapters on a frozen base: pass base=<the base params>")
  return lora_lib.adapted(base, params, cfg.lora)


def accumulate_gradients(model_cfg: llada.LLaDAConfig, cfg: StepConfig, params, batch: dict,
                         constrain: Callable[[dict], dict] = lambda mb: mb, base=None):
  """Objective and its gradient, summed over micro-batches and MC samples by `lax.scan`.

  params: the trained tree (all weights; the adapters of a LoRA run, cfg.lora, whose frozen base
  is `base`: no gradient or accumulator for it).
  Returns (objective, grads float32, aux) with objective and grads already divided by the
  global batch size B, i.e. the gradient of the batch-mean objective.
  """
  B = batch["tokens"].shape[0]
  num_micro = _num_micro(cfg, B)
  micro = {k: _split_micro(v, BATCH_AXIS.get(k, 0), num_micro) for k, v in batch.items()}
  units = cfg.impl.units(cfg)
  dropout = cfg.lora is not None and cfg.lora.dropout > 0
  if dropout and DROPOUT_SEEDS not in batch:
    raise ValueError(f"a LoRA step with dropout {cfg.lora.dropout} needs batch[{DROPOUT_SEEDS!r}], one uint32 "
                     "seed per row (train.rng.lora_dropout_seeds)")

  def terms(p, mb, u):
    model = model_params(cfg, p, base)
    if dropout:  # the trained forward only: fresh masks per row, step, update and unit (MC sample)
      keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), u))(mb[DROPOUT_SEEDS])
      model = model.with_dropout(cfg.lora.dropout, keys)
    return cfg.impl.unit_terms(model_cfg, cfg, model, mb, u)

  unit_fn = jax.value_and_grad(terms, has_aux=True)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (zeros, jnp.zeros((), jnp.float32), {"elbo": jnp.zeros(()), "abs_d": jnp.zeros(()), "kl": jnp.zeros(())})

  def micro_body(carry, mb):
    mb = constrain(mb)

    def unit_body(carry, u):
      grads, obj, aux = carry
      (o, a), g = unit_fn(params, mb, u)
      grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
      aux = jax.tree.map(jnp.add, aux, a)
      return (grads, obj + o, aux), None

    carry, _ = jax.lax.scan(unit_body, carry, jnp.arange(units))
    return carry, None

  (grads, obj, aux), _ = jax.lax.scan(micro_body, init, micro)
  grads = jax.tree.map(lambda g: g / B, grads)
  denom = B * units
  aux = {k: v / denom for k, v in aux.items()}
  return obj / B, grads, aux


def compute_old_terms(model_cfg: llada.LLaDAConfig, cfg: StepConfig, params, batch: dict,
                      constrain: Callable[[dict], dict] = lambda mb: mb) -> jax.Array:
  """No-grad pass: the terms of `params` on the batch's masks, for the old policy (before
  off-policy updates) or the frozen reference (any dtype: params are cast at use).

  Laid out as the objective's old_field: bgpo / vrpo_ol ELBO terms [n, B] (n scalars per
  sequence, scanned one sample at a time); diffu_grpo token log-probs [B, L] under the prompt
  masks of `row_seeds`.
  """
  B = batch["tokens"].shape[0]
  num_micro = _num_micro(cfg, B)
  micro = {k: _split_micro(v, BATCH_AXIS.get(k, 0), num_micro) for k, v in batch.items()}
  params = jax.lax.stop_gradient(params)

  def micro_body(_, mb):
    return None, cfg.impl.old_terms(model_cfg, cfg, params, constrain(mb))

  _, out = jax.lax.scan(micro_body, None, micro)
  # Undo the interleaved split: out[k] holds rows k, k+M, ... of its micro-batch axis.
  axis = (cfg.impl.old_field or cfg.impl.ref_field).batch_axis  # laid out alike where both exist
  out = jnp.moveaxis(out, 0, axis + 1)  # [..., mb, M, ...]
  return out.reshape(out.shape[:axis] + (B,) + out.shape[axis + 2:])


def train_step(model_cfg: llada.LLaDAConfig, cfg: StepConfig, optimizer: optax.GradientTransformation,
               schedule: Callable, state: TrainState, batch: dict,
               constrain: Callable[[dict], dict] = lambda mb: mb, base=None):
  """One optimizer update from one rollout batch. Returns (new_state, metrics). A LoRA step
  (cfg.lora) updates the adapters state.params on the frozen `base` (read, never returned)."""
  objective, grads, aux = accumulate_gradients(model_cfg, cfg, state.params, batch, constrain, base)
  # optax minimizes: descend the loss = -objective.
  grads = jax.tree.map(jnp.negative, grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Keep every dtype of the state (gradients are float32 even for bf16 params): a drifting dtype
  # would defeat buffer donation and recompile the step on its second call.
  params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
  opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
  # A NaN/Inf loss or gradient norm skips the update: params, moments and step stay as they were
  # (the step counts applied updates, as optax's schedule count in opt_state does). An
  # elementwise select, not lax.cond: it fuses into the update's elementwise pass and needs no
  # predicate on the host (a GPU conditional would sync on it), and a finite update is
  # bit-for-bit the unselected one.
  finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, params, state.params)
  opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  metrics = {
      "train/loss": -objective,
      "train/objective": objective,
      "train/grad_norm": grad_norm,
      "train/lr": schedule(state.step),
      "train/param_norm": optax.global_norm(params),
      "train/elbo_per_sample": aux["elbo"],
      "train/abs_d": aux["abs_d"],
      "train/kl": aux["kl"],
      # 1.0 when this update was skipped (the trainer counts them: train/nonfinite_steps).
      "train/update_skipped": 1.0 - finite.astype(jnp.float32),
  }
  step = state.step + finite.astype(state.step.dtype)
  return TrainState(step=step, params=params, opt_state=opt_state), metrics


# ----------------------------------------------------------------------------- sharded jit


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  """NamedSharding per batch key: the batch axis over (data, fsdp), the rest replicated."""
  return {k: mesh_lib.batch_sharding(mesh, np.ndim(v) if not hasattr(v, "ndim") else v.ndim,
                                     BATCH_AXIS.get(k, 0)) for k, v in batch.items()}


def _micro_constraint(mesh: Mesh) -> Callable[[dict], dict]:
  def constrain(mb: dict) -> dict:
    return {k: jax.lax.with_sharding_constraint(v, mesh_lib.batch_sharding(mesh, v.ndim, BATCH_AXIS.get(k, 0)))
            for k, v in mb.items()}
  return constrain


def jit_train_step(model_cfg: llada.LLaDAConfig, cfg: StepConfig, optimizer, schedule, mesh: Mesh,
                   shardings: TrainState, batch_example: dict, base_shardings: Any = None):
  """`train_step` compiled with explicit in/out shardings; the state's buffers are donated.

  The step is traced under `mesh` (sharding_lib.under_mesh), so the model's constraints lay it out
  as FSDP: batch-split activations, each layer's weights gathered before use. A LoRA step
  (cfg.lora) is called as step(state, batch, base), the frozen base (on `base_shardings`) not
  donated: it serves every step.
  """
  constrain = _micro_constraint(mesh)
  rep = NamedSharding(mesh, P())
  in_shardings = (shardings, batch_shardings(mesh, batch_example))
  if cfg.lora is None:
    fn = functools.partial(train_step, model_cfg, cfg, optimizer, schedule, constrain=constrain)
  else:
    if base_shardings is None:
      raise ValueError("a LoRA step (StepConfig.lora set) needs base_shardings, the frozen base's shardings")
    fn = lambda state, batch, base: train_step(model_cfg, cfg, optimizer, schedule, state, batch,  # noqa: E731
                                               constrain=constrain, base=base)
    in_shardings += (base_shardings,)
  return jax.jit(sharding_lib.under_mesh(fn, mesh), in_shardings=in_shardings,
                 out_shardings=(shardings, rep), donate_argnums=(0,))


def jit_old_terms(model_cfg: llada.LLaDAConfig, cfg: StepConfig, mesh: Mesh, param_shardings,
                  batch_example: dict):
  fn = functools.partial(compute_old_terms, model_cfg, cfg, constrain=_micro_constraint(mesh))
  field = cfg.impl.old_field or cfg.impl.ref_field
  out = mesh_lib.batch_sharding(mesh, len(field.dims), field.batch_axis)
  return jax.jit(sharding_lib.under_mesh(fn, mesh), in_shardings=(param_shardings, batch_shardings(mesh, batch_example)),
                 out_shardings=out)


def memory_report(compiled) -> dict:
  """XLA's memory analysis of a compiled executable, in bytes (per device)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  rep = {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0)) for k in keys}
  # Donated arguments alias outputs: count them once.
  rep["total_bytes"] = rep["temp_bytes"] + rep["argument_bytes"] + rep["output_bytes"] - rep["alias_bytes"]
  return rep
