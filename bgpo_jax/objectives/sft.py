"""The masked-diffusion SFT loss as an objective of the same step: the mean per-token ELBO over
the MC samples (continuous-time, 1/t weights); the masks cover the response, never the prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import ElboObjective, register


class SFT(ElboObjective):
  name = "sft"
  per_sample = True
  remat_policy = "activations"  # one sample's graph at a time, as BGPO
  rl = False  # the warm-up / mode=sft loss, not a config.rl.objective
  old_field = ref_field = None  # no old policy, no reference

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """Sample u's ELBO summed over the rows, / (L n): the step's sum over u is the mean."""
    from bgpo_jax.diffusion import elbo
    L, n = cfg.gen_length, cfg.num_mc_samples
    l = elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"], mb["mc_masks"][u],
                       mb["mc_weights"][u])  # [mb]
    zero = jnp.zeros(())
    return jnp.sum(l) / (L * n), {"elbo": jnp.sum(jax.lax.stop_gradient(l)), "abs_d": zero, "kl": zero}


register(SFT())
