"""VRPO-OL: R = exp(mean_j d_j) * A over the n MC samples of the ELBO, optionally PPO-clipped.

Non-linear in the samples: its gradient needs every sample's graph at once, so the train step
runs the n samples as one vmapped graph per micro-batch and its memory grows with n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import ElboObjective, register
from bgpo_jax.objectives.bgpo import ElboHparams
from bgpo_jax.objectives.common import (
  _capped_exp, _check_clip, _dual_clip, _log_ratios, _ppo_clip, k3, ref_log_ratio)


def vrpo_objective(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array, *,
                   lengths: jax.Array | None = None, clip_eps: float | None = None, dual_clip: float | None = None,
                   elbo_ref: jax.Array | None = None, kl_beta: float = 0.0) -> jax.Array:
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
    r = r - kl_beta * k3(jnp.mean(ref_log_ratio(elbo_new, elbo_ref, lengths), axis=0))
  return jnp.mean(r)


class VRPO_OL(ElboObjective):
  name = "vrpo_ol"
  # Every sample's graph is alive until the end of the step: save only each layer's input.
  remat_policy = "full"
  Hparams = ElboHparams
  flat_hparams = True

  def check_config(self, config) -> None:
    if config.model.remat_policy == "activations" and config.rl.num_mc_samples > 1:
      from bgpo_jax.config import ConfigError
      raise ConfigError(
          f"config.model.remat_policy 'activations' with rl.objective 'vrpo_ol' saves the activations of "
          f"all rl.num_mc_samples={config.rl.num_mc_samples} samples at once (LLaDA-8B math, n = 16: 146 GB "
          "per device on 8 devices); set --config.model.remat_policy=full (42 GB) or auto, or none on a "
          "small model")

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """The micro-batch's whole objective (u is always 0): all n samples in one vmapped graph."""
    from bgpo_jax.diffusion import elbo
    hp, L, n = cfg.hparams, cfg.gen_length, cfg.num_mc_samples
    term = lambda m, w: elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"], m, w)
    l = jax.vmap(term)(mb["mc_masks"], mb["mc_weights"])  # [n, mb]
    old = mb["old_elbo"] if cfg.off_policy else jax.lax.stop_gradient(l)
    lengths = jnp.full(l.shape[1:], L, jnp.float32) if hp.normalize_length else None
    ref = mb["ref_elbo"] if cfg.kl_beta > 0 else None
    obj = vrpo_objective(l, old, mb["advantages"], lengths=lengths, clip_eps=hp.clip_eps,
                         dual_clip=hp.dual_clip, elbo_ref=ref, kl_beta=cfg.kl_beta)
    l_ = jax.lax.stop_gradient(l)
    d = _log_ratios(l_, old, mb["advantages"], lengths)
    kl = jnp.zeros(()) if ref is None else jnp.sum(k3(jnp.mean(ref_log_ratio(l_, ref, lengths), axis=0)))
    return obj * l.shape[1], {"elbo": jnp.sum(l_) / n, "abs_d": jnp.sum(jnp.abs(d)) / n, "kl": kl}


register(VRPO_OL())
