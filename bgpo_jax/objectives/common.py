"""Math every objective shares: the capped exp, PPO and dual clips, the k3 KL estimate, group
advantages, the ELBO log-ratio d = (l_new - l_old) [/ L] and the reference's x = (l_ref - l_new)
[/ L]. Notation: bgpo_jax/objectives/__init__.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Beyond this log-ratio exp() is continued by its tangent line (see `_capped_exp`). exp(20) is
# about 4.9e8: far outside any ratio a sane update produces (PPO clipping acts at 1 +- 0.2), yet
# far from float32 overflow (exp(88.7)) even after multiplying by advantages and upstream grads.
LOG_RATIO_CAP = 20.0


def _capped_exp(x: jax.Array, cap: float = LOG_RATIO_CAP) -> jax.Array:
  """exp(x) for x <= cap, continued by its tangent exp(cap) * (1 + x - cap) above.

  The result is finite with a finite gradient for every finite x, and it is still convex and
  above the tangent 1 + x at 0, so both BGPO bounds (tangent and Jensen) hold for it exactly
  as for exp. Double-where: the inner minimum keeps the exp in the untaken branch finite so its
  (zero-weighted) gradient cannot turn into 0 * inf = NaN.
  """
  e = jnp.exp(jnp.minimum(x, cap))
  return jnp.where(x <= cap, e, e * (1.0 + x - cap))


def _float(x: jax.Array) -> jax.Array:
  """Casts to at least float32 (half-precision inputs are upcast; float64 stays)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_clip(clip_eps: float | None, dual_clip: float | None = None) -> None:
  # Only concrete Python numbers are validated; traced values are the caller's business.
  if isinstance(clip_eps, (int, float)) and not 0.0 < clip_eps < 1.0:
    raise ValueError(f"clip_eps {clip_eps} must lie in (0, 1) (typical: 0.2), or be None for no clipping")
  if isinstance(dual_clip, (int, float)) and not dual_clip > 1.0:
    raise ValueError(f"dual_clip {dual_clip} must be > 1 (typical: 3.0), or be None for no dual clip")


def _ppo_clip(ratio: jax.Array, adv: jax.Array, clip_eps: float | None) -> jax.Array:
  """min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A); just ratio * A when clip_eps is None."""
  surrogate = ratio * adv
  if clip_eps is None:
    return surrogate
  return jnp.minimum(surrogate, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)


def _dual_clip(g: jax.Array, adv: jax.Array, dual_clip: float | None) -> jax.Array:
  """For A < 0 only: max(g, c * A) (PPO dual clip); g unchanged when dual_clip is None."""
  if dual_clip is None:
    return g
  return jnp.where(adv >= 0, g, jnp.maximum(g, dual_clip * adv))


def k3(x: jax.Array) -> jax.Array:
  """Schulman's k3 KL estimate exp(x) - x - 1 for the log-ratio x = log p_ref - log p_theta.

  >= 0, and 0 with zero gradient at x = 0 (policy = reference); exp is the capped one, so it stays
  finite (and >= 0: the cap's tangent continuation stays above 1 + x) for any finite x.
  """
  x = _float(x)
  # expm1: near x = 0 (a policy close to its reference) exp(x) - 1 - x would lose every digit.
  small = jnp.expm1(jnp.minimum(x, LOG_RATIO_CAP)) - x
  return jnp.where(x <= LOG_RATIO_CAP, small, _capped_exp(x) - x - 1.0)


def group_advantages(
    rewards: jax.Array,
    normalize_std: bool = True,
    eps: float = 1e-6,
    *,
    ddof: int = 1,
    leave_one_out: bool = False,
) -> jax.Array:
  """Group-relative advantages, one group of G responses per prompt.

  A = (r - mean(r)) / (std(r) + eps) per group, or r - mean(r) when normalize_std=False (d1
  style). `ddof=1` (default) is the unbiased sample std, which is what torch's `Tensor.std()`
  computes in the TRL-based GRPO code that d1 and BGPO build on; `ddof=0` gives the population
  std. A group whose rewards are all equal gets exactly zero advantages (no NaN, no rounding
  residue from the mean).

  Args:
    rewards: [num_prompts, G] rewards.
    normalize_std: divide by the group std (+ eps).
    eps: added to the std before dividing.
    ddof: std degrees of freedom (1 = unbiased, torch default; 0 = population).
    leave_one_out: baseline each reward by the mean of the OTHER G - 1 rewards of its group
      (DiffuCoder's coupled-GRPO, ESPO): r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)),
      then the std division if normalize_std.

  Returns:
    [num_prompts, G] advantages (float32 or wider).
  """
  r = _float(rewards)
  if r.ndim != 2:
    raise ValueError(f"rewards must be [num_prompts, G], got shape {r.shape}; reshape flat rewards "
                     "with rewards.reshape(-1, G)")
  group = r.shape[1]
  if normalize_std and group <= ddof:
    raise ValueError(f"group size G={group} is too small for a std with ddof={ddof}; use G > {ddof}, "
                     "ddof=0, or normalize_std=False")
  # Exact test for constant groups: max == min, immune to rounding in the mean.
  constant = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  if leave_one_out:
    if group < 2:
      raise ValueError(f"group size G={group} has no other responses for a leave-one-out baseline; use G > 1")
    centered = centered * (group / (group - 1))
  if normalize_std:
    centered = centered / (jnp.std(r, axis=1, keepdims=True, ddof=ddof) + eps)
  return jnp.where(constant, 0.0, centered)


def _log_ratios(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array,
                lengths: jax.Array | None) -> jax.Array:
  """d = (elbo_new - stop_gradient(elbo_old)) [/ lengths]; validates shapes. -> [n, B]."""
  new, old = _float(elbo_new), _float(elbo_old)
  if new.ndim != 2 or new.shape != old.shape:
    raise ValueError(f"elbo_new {new.shape} and elbo_old {old.shape} must both be [n, B]")
  adv = jnp.asarray(advantages)
  if adv.shape != (new.shape[1],):
    raise ValueError(f"advantages shape {adv.shape} must be [B] = ({new.shape[1]},)")
  if lengths is not None:
    lengths = jnp.asarray(lengths, new.dtype)
    if lengths.shape not in ((), (new.shape[1],)):
      raise ValueError(f"lengths shape {lengths.shape} must be [B] = ({new.shape[1]},) or a scalar")
  return log_ratio(new, old, lengths)


def log_ratio(new: jax.Array, old: jax.Array, length=None) -> jax.Array:
  """d = (new - stop_gradient(old)) [/ length]: the per-sample ELBO log-ratio of every ELBO
  objective, in the train step (one sample, [B]) and in the whole-batch functions ([n, B])."""
  d = new - jax.lax.stop_gradient(old)
  if length is not None:
    d = d / length
  return d


def ref_log_ratio(elbo_new: jax.Array, elbo_ref: jax.Array, lengths=None) -> jax.Array:
  """x_j = (stop_gradient(l_ref(j)) - l_new(j)) [/ L]: the log-ratio inside the k3 KL to the frozen
  reference, per MC sample. elbo_new / elbo_ref [..., B]; lengths [B], a scalar or None -> [..., B]
  (float32 or wider)."""
  x = jax.lax.stop_gradient(_float(elbo_ref)) - _float(elbo_new)
  if lengths is not None:
    x = x / jnp.asarray(lengths, x.dtype)
  return x
