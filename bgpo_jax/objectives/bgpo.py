"""BGPO: the lower bound R_lb = sum_j g_j of VRPO-OL's exp(mean_j d_j) * A, a sum of per-MC-sample
terms, so the train step scans the n samples one at a time (memory flat in n).

g_j = (1 + d_j) * A / n for A >= 0 (tangent bound), exp(d_j) * A / n for A < 0 (Jensen);
R_lb <= R always, and R_lb == R, grad R_lb == grad R on-policy (all d_j = 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import ElboObjective, register
from bgpo_jax.objectives.common import _capped_exp, _check_clip, _dual_clip, _float, _log_ratios, _ppo_clip, k3
from bgpo_jax.objectives.common import log_ratio, ref_log_ratio


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
  return k3(ref_log_ratio(elbo_new, elbo_ref, lengths)) / num_samples


def bgpo_objective(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array, *,
                   lengths: jax.Array | None = None, clip_eps: float | None = None, dual_clip: float | None = None,
                   elbo_ref: jax.Array | None = None, kl_beta: float = 0.0) -> jax.Array:
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


@dataclasses.dataclass(frozen=True)
class ElboHparams:
  """Hyper-parameters of the ELBO objectives (BGPO, VRPO-OL)."""
  normalize_length: bool = True  # d_j = (l_new - l_old) / L, L = gen_length (SPEC section 2)
  clip_eps: float | None = None  # PPO clip of the per-sample ratio (None = off)
  dual_clip: float | None = None  # dual clip c > 1 for A < 0 (None = off)


class BGPO(ElboObjective):
  name = "bgpo"
  per_sample = True
  # One sample's graph at a time: saving its activations (no matmul recomputed) stays small.
  remat_policy = "activations"
  Hparams = ElboHparams
  flat_hparams = True  # config.rl.normalize_length / clip_eps / dual_clip

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """Sample u's terms g_u (minus kl_beta times its k3 KL) summed over the micro-batch rows."""
    from bgpo_jax.diffusion import elbo
    hp, L, n = cfg.hparams, cfg.gen_length, cfg.num_mc_samples
    norm = L if hp.normalize_length else None
    zero = jnp.zeros(())
    l = elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"], mb["mc_masks"][u],
                       mb["mc_weights"][u])  # [mb]
    d = log_ratio(l, mb["old_elbo"][u] if cfg.off_policy else l, norm)
    g = bgpo_sample_terms(d, mb["advantages"], num_samples=n, clip_eps=hp.clip_eps, dual_clip=hp.dual_clip)
    kl = zero
    if cfg.kl_beta > 0:
      # Per sample, like g_j: the scan over j keeps memory flat in n.
      k = elbo_kl_sample_terms(l, mb["ref_elbo"][u], num_samples=n, lengths=norm)
      g = g - cfg.kl_beta * k
      kl = jnp.sum(jax.lax.stop_gradient(k)) * n  # summed over rows; / (B n) in the step: mean per sample
    return jnp.sum(g), {"elbo": jnp.sum(jax.lax.stop_gradient(l)),
                        "abs_d": jnp.sum(jnp.abs(jax.lax.stop_gradient(d))), "kl": kl}


register(BGPO())
