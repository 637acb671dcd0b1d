"""Masked diffusion core: the forward (noising) process and ELBO terms, and the reverse sampler.

masking.sample_masks -> per-sample masks/weights (SPEC section 2), elbo.elbo_term -> one
Monte Carlo ELBO sample, elbo.one_step_token_logps -> d1 log-probs, sampler.generate -> LLaDA
reverse process (SPEC section 4).
"""

from bgpo_jax.diffusion import elbo, masking, sampler
from bgpo_jax.diffusion.elbo import elbo_term, elbo_terms, masked_sequence, one_step_token_logps
from bgpo_jax.diffusion.masking import sample_masks
from bgpo_jax.diffusion.sampler import generate

__all__ = [
  "elbo",
  "masking",
  "sampler",
  "elbo_term",
  "elbo_terms",
  "masked_sequence",
  "one_step_token_logps",
  "sample_masks",
  "generate",
]
