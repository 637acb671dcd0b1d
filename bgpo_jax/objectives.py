"""RL objectives for masked diffusion LLMs: group advantages, BGPO, VRPO-OL and diffu-GRPO.

Every objective is a value to MAXIMIZE (the loss is its negative), averaged over the batch of
responses. The math, and how each line here follows from it, is in docs/objectives.md
(SPEC.md section 3 is the contract).

Notation: n Monte-Carlo (MC) samples of the ELBO per response, B responses. For sample j of
response b, `l_new[j, b]` / `l_old[j, b]` are the per-sample ELBO terms under the current and
the old policy computed with the SAME mask (see diffusion/elbo.py), and
`d[j, b] = (l_new - l_old) / L_b` (the division only when lengths are given).

- VRPO-OL:   R    = exp(mean_j d_j) * A.
- BGPO:      R_lb = sum_j g_j,  g_j = (1 + d_j) * A / n  (A >= 0, tangent bound)
                                g_j = exp(d_j) * A / n   (A < 0, Jensen),
             with R_lb <= R always and R_lb == R, grad R_lb == grad R on-policy (all d_j = 0).

`elbo_old`, `logp_old` and `logp_ref` are wrapped in `stop_gradient` here, so the on-policy
case can pass the same array twice (`bgpo_objective(l, l, A)`): the value is then R(d=0) = A
and the gradient is A/n * sum_j grad l_j, exactly as with a separately stored old value.
"""

from __future__ import annotations

from typing import Literal

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


def elbo_kl_sample_terms(elbo_new: jax.Array, elbo_ref: jax.Array, *, num_samples: int,
                         lengths: jax.Array | None = None) -> jax.Array:
  """BGPO's per-MC-sample KL terms k3(x_j) / n, x_j = (l_ref(j) - l_theta(j)) [/ L].

  Each term depends on one sample, like g_j, so `R_lb - beta * sum_j` of them is still a sum of
  per-sample terms (memory flat in n). By Jensen, mean_j k3(x_j) >= k3(mean_j x_j) (k3 is
  convex), so the penalized bound stays below VRPO-OL's penalized objective
  exp(mean d) A - beta k3(mean x) (docs/objectives.md).

  Args:
    elbo_new: [..., B] per-sample ELBO terms under the current policy (differentiable).
    elbo_ref: [..., B] the same samples (same masks) under the frozen reference (stop-gradiented).
    num_samples: n, the total number of samples the terms are summed over.
    lengths: [B] or scalar L to divide the log-ratio by (rl.normalize_length), or None.

  Returns:
    [..., B] terms; summing over the sample axis gives the KL estimate.
  """
  x = jax.lax.stop_gradient(_float(elbo_ref)) - _float(elbo_new)
  if lengths is not None:
    x = x / jnp.asarray(lengths, x.dtype)
  return k3(x) / num_samples


def group_advantages(
    rewards: jax.Array,
    normalize_std: bool = True,
    eps: float = 1e-6,
    *,
    ddof: int = 1,
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
  if normalize_std:
    centered = centered / (jnp.std(r, axis=1, keepdims=True, ddof=ddof) + eps)
  return jnp.where(constant, 0.0, centered)


def bgpo_sample_terms(
    d: jax.Array,
    advantages: jax.Array,
    *,
    num_samples: int,
    clip_eps: float | None = None,
    dual_clip: float | None = None,
) -> jax.Array:
  """Per-MC-sample BGPO terms g_j; summing over the sample axis gives the lower bound R_lb.

  Each g_j depends on one MC sample only, so the gradient of R_lb is the sum of the gradients
  of the g_j: compute them one sample at a time (a scan over j) and accumulate.

  The per-sample "ratio" is rho_j = 1 + d_j for A >= 0 (tangent bound) and exp(d_j) for A < 0
  (Jensen); g_j = rho_j * A / n. With clip_eps (PPO, as in the BGPO reference code):
  g_j = min(rho_j * A, clip(rho_j, 1 - eps, 1 + eps) * A) / n. With dual_clip c, for A < 0
  only: g_j = max(that, c * A) / n. Both clips are inactive on-policy (rho_j = 1).

  Args:
    d: [..., B] per-sample log-ratios (l_new - l_old), already length-normalized if wanted;
      typically [B] (one sample j) or [n, B].
    advantages: [B] advantages, broadcast against the last axis of d.
    num_samples: n, the TOTAL number of MC samples the terms will be summed over.
    clip_eps: PPO clip range eps, or None.
    dual_clip: dual-clip constant c > 1 for negative advantages, or None.

  Returns:
    [..., B] terms g_j (same shape as d).
  """
  if not (isinstance(num_samples, int) and num_samples > 0):
    raise ValueError(f"num_samples {num_samples!r} must be a positive int (the n of the MC estimate)")
  _check_clip(clip_eps, dual_clip)
  d = _float(d)
  adv = jnp.asarray(advantages, d.dtype)
  if adv.ndim != 1 or d.ndim < 1 or adv.shape[0] != d.shape[-1]:
    raise ValueError(f"advantages shape {adv.shape} must be [B] matching the last axis of d {d.shape}")
  positive = adv >= 0
  # Both branches are finite for any finite d (capped exp), so the where's gradient is clean.
  rho = jnp.where(positive, 1.0 + d, _capped_exp(d))
  g = _dual_clip(_ppo_clip(rho, adv, clip_eps), adv, dual_clip)
  return g / num_samples


def _log_ratios(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array,
                lengths: jax.Array | None) -> jax.Array:
  """d = (elbo_new - stop_gradient(elbo_old)) [/ lengths]; validates shapes. -> [n, B]."""
  new, old = _float(elbo_new), _float(elbo_old)
  if new.ndim != 2 or new.shape != old.shape:
    raise ValueError(f"elbo_new {new.shape} and elbo_old {old.shape} must both be [n, B]")
  adv = jnp.asarray(advantages)
  if adv.shape != (new.shape[1],):
    raise ValueError(f"advantages shape {adv.shape} must be [B] = ({new.shape[1]},)")
  d = new - jax.lax.stop_gradient(old)
  if lengths is not None:
    lengths = jnp.asarray(lengths, d.dtype)
    if lengths.shape not in ((), (new.shape[1],)):
      raise ValueError(f"lengths shape {lengths.shape} must be [B] = ({new.shape[1]},) or a scalar")
    d = d / lengths
  return d


def bgpo_objective(
    elbo_new: jax.Array,
    elbo_old: jax.Array,
    advantages: jax.Array,
    *,
    lengths: jax.Array | None = None,
    clip_eps: float | None = None,
    dual_clip: float | None = None,
    elbo_ref: jax.Array | None = None,
    kl_beta: float = 0.0,
) -> jax.Array:
  """BGPO objective R_lb = sum_j g_j (see `bgpo_sample_terms`), averaged over responses;
  with elbo_ref and kl_beta, minus kl_beta * sum_j `elbo_kl_sample_terms`.

  Args:
    elbo_new: [n, B] per-sample ELBO terms under the current policy (differentiable).
    elbo_old: [n, B] the same terms (same masks) under the old policy; stop-gradiented here.
    advantages: [B].
    lengths: [B] (or scalar) response lengths L; when given d_j = (l_new - l_old) / L.
    clip_eps: PPO clip eps for the per-sample ratio, or None.
    dual_clip: dual clip c for A < 0, or None.
    elbo_ref: [n, B] the same samples under a frozen reference policy, or None (no KL).
    kl_beta: weight of the k3 KL to the reference.

  Returns:
    scalar objective to maximize.
  """
  d = _log_ratios(elbo_new, elbo_old, advantages, lengths)
  g = bgpo_sample_terms(d, advantages, num_samples=d.shape[0], clip_eps=clip_eps,
                        dual_clip=dual_clip)
  if elbo_ref is not None and kl_beta:
    g = g - kl_beta * elbo_kl_sample_terms(elbo_new, elbo_ref, num_samples=d.shape[0], lengths=lengths)
  return jnp.mean(jnp.sum(g, axis=0))


def vrpo_objective(
    elbo_new: jax.Array,
    elbo_old: jax.Array,
    advantages: jax.Array,
    *,
    lengths: jax.Array | None = None,
    clip_eps: float | None = None,
    dual_clip: float | None = None,
    elbo_ref: jax.Array | None = None,
    kl_beta: float = 0.0,
) -> jax.Array:
  """VRPO-OL objective R = exp(mean_j d_j) * A (optionally PPO-clipped and dual-clipped), minus
  kl_beta * k3(mean_j x_j) with x_j = (l_ref(j) - l_new(j)) [/ L] when elbo_ref is given,
  averaged over responses.

  Non-linear in the samples: its gradient needs all n sample graphs at once.

  Args:
    elbo_new: [n, B] per-sample ELBO terms under the current policy (differentiable).
    elbo_old: [n, B] the same terms under the old policy; stop-gradiented here.
    advantages: [B].
    lengths: [B] (or scalar) response lengths; when given d_j = (l_new - l_old) / L.
    clip_eps: PPO clip eps for the ratio exp(mean d), or None.
    dual_clip: dual clip c > 1 for A < 0, or None.
    elbo_ref: [n, B] the same samples under a frozen reference policy, or None (no KL).
    kl_beta: weight of the k3 KL to the reference.

  Returns:
    scalar objective to maximize.
  """
  _check_clip(clip_eps, dual_clip)
  d = _log_ratios(elbo_new, elbo_old, advantages, lengths)
  ratio = _capped_exp(jnp.mean(d, axis=0))
  adv = jnp.asarray(advantages, d.dtype)
  r = _dual_clip(_ppo_clip(ratio, adv, clip_eps), adv, dual_clip)
  if elbo_ref is not None and kl_beta:
    x = jax.lax.stop_gradient(_float(elbo_ref)) - _float(elbo_new)
    if lengths is not None:
      x = x / jnp.asarray(lengths, x.dtype)
    r = r - kl_beta * k3(jnp.mean(x, axis=0))
  return jnp.mean(r)


def diffu_grpo_objective(
    logp_new: jax.Array,
    logp_old: jax.Array,
    logp_ref: jax.Array | None,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_eps: float | None = 0.2,
    beta: float = 0.04,
    token_average: Literal["sequence", "batch"] = "sequence",
    dual_clip: float | None = None,
) -> jax.Array:
  """diffu-GRPO (d1) objective: token-level PPO surrogate minus beta * k3 KL to a reference.

  Per token i of response b: ratio = exp(new - old),
  s = min(ratio * A_b, clip(ratio, 1 - eps, 1 + eps) * A_b) - beta * (exp(ref - new) - (ref - new) - 1)
  (the KL term only when logp_ref is given and beta != 0).

  Aggregation over the masked-in tokens (`response_mask`):
  - "sequence" (default): mean over each response's tokens, then mean over B. Matches the
    "averaged over B" contract of every objective here, so micro-batch gradient accumulation
    is exact. A response with no tokens contributes 0.
  - "batch": one mean over all tokens of the batch (sum / total count), which is what d1's
    trainer computes per (micro-)batch.

  Args:
    logp_new: [B, L] per-token log-probs under the current policy (differentiable).
    logp_old: [B, L] under the old policy (stop-gradiented here; pass logp_new on-policy).
    logp_ref: [B, L] under the frozen reference (stop-gradiented), or None for no KL.
    advantages: [B].
    response_mask: [B, L], nonzero/True for tokens that count (treated as boolean).
    clip_eps: PPO clip eps, or None for no clipping.
    beta: KL coefficient.
    token_average: "sequence" or "batch", see above.
    dual_clip: per-token dual clip c > 1 for A < 0 (max(s, c * A) before the KL), or None.

  Returns:
    scalar objective to maximize.
  """
  _check_clip(clip_eps, dual_clip)
  new = _float(logp_new)
  if new.ndim != 2 or jnp.shape(logp_old) != new.shape or jnp.shape(response_mask) != new.shape:
    raise ValueError(f"logp_new {new.shape}, logp_old {jnp.shape(logp_old)} and response_mask "
                     f"{jnp.shape(response_mask)} must all be [B, L]")
  if logp_ref is not None and jnp.shape(logp_ref) != new.shape:
    raise ValueError(f"logp_ref {jnp.shape(logp_ref)} must be [B, L] = {new.shape}")
  adv = jnp.asarray(advantages, new.dtype)
  if adv.shape != (new.shape[0],):
    raise ValueError(f"advantages shape {adv.shape} must be [B] = ({new.shape[0]},)")
  if token_average not in ("sequence", "batch"):
    raise ValueError(f"token_average {token_average!r} must be 'sequence' or 'batch'")

  old = jax.lax.stop_gradient(jnp.asarray(logp_old, new.dtype))
  ratio = _capped_exp(new - old)
  per_token = _dual_clip(_ppo_clip(ratio, adv[:, None], clip_eps), adv[:, None], dual_clip)
  # Skip the KL only for a concrete beta == 0 (a traced beta is fine and always included).
  if logp_ref is not None and not (isinstance(beta, (int, float)) and beta == 0.0):
    x = jax.lax.stop_gradient(jnp.asarray(logp_ref, new.dtype)) - new
    per_token = per_token - beta * k3(x)

  mask = jnp.asarray(response_mask).astype(bool)
  count = mask.astype(new.dtype)
  # where(), not multiply: a non-finite value on a masked-out token must not leak in as 0 * inf.
  masked = jnp.where(mask, per_token, 0.0)
  if token_average == "batch":
    return jnp.sum(masked) / jnp.maximum(jnp.sum(count), 1.0)
  per_seq = jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(count, axis=1), 1.0)
  return jnp.mean(per_seq)
