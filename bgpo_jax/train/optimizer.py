"""Optimizer from config: AdamW with decoupled weight decay, warmup + schedule, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from bgpo_jax.config import SCHEDULES


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Learning rate per update step: linear warmup from 0, then `optim.schedule`."""
  lr = float(optim.learning_rate)
  warmup = int(optim.warmup_steps)
  name = optim.schedule
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule {name!r} is unknown; use one of {SCHEDULES}")
  decay_steps = max(int(total_steps) - warmup, 1)
  if name == "constant":
    after = optax.constant_schedule(lr)
  elif name == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.final_lr_fraction))
  else:
    after = optax.linear_schedule(lr, lr * float(optim.final_lr_fraction), decay_steps)
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
  # Norm scales are not decayed (they are 1-D per layer: [layers, d] or [d]).
  def is_matrix(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    return not any("norm" in n or n == "ln_f" for n in names)

  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optim: Any, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """AdamW behind global-norm clipping; `optim` is config.optim, `schedule` overrides its learning rate."""
  schedule = schedule or make_schedule(optim, total_steps)
  chain = []
  if optim.grad_clip_norm and float(optim.grad_clip_norm) > 0:
    chain.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
  chain.append(
      optax.adamw(
          schedule,
          b1=float(optim.b1),
          b2=float(optim.b2),
          eps=float(optim.eps),
          weight_decay=float(optim.weight_decay),
          mask=_decay_mask,
      )
  )
  return optax.chain(*chain)


def reset_moments(opt_state: Any) -> Any:
  """AdamW's moments and bias-correction count set to zero; the schedule's count is kept.

  RL after the SFT warm-up starts from fresh moments, as RL from a released checkpoint would:
  the second moments of SFT gradients (several times larger than RL's) would otherwise shrink
  every RL update for ~1/(1 - b2) steps. Keeping the schedule's count keeps the learning rate a
  function of the global step. `x * 0` keeps each leaf's dtype and sharding.
  """
  def reset(s):
    if isinstance(s, optax.ScaleByAdamState):
      return jax.tree.map(lambda x: x * 0, s)
    return s

  return jax.tree.map(reset, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
