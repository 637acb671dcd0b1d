"""Confidence rules of the block sampler: which masked candidates a step commits first.

`confidence(logits, cand, rule) -> [B, L]`, higher = committed earlier:

- low_confidence (LLaDA): softmax(logits)[cand], the probability of the candidate under the
  untempered distribution (as LLaDA's reference, which samples on Gumbel-perturbed logits but
  ranks by the plain softmax).
- random: uniform noise (needs `rng`).
- Dream's `alg` rules, on p = softmax(logits / T) (T > 0; softmax(logits) at T = 0), the same
  distribution the candidate was drawn from (Dream's `sample_tokens`):
  - maskgit_plus: p[cand];
  - topk_margin: p_top1 - p_top2;
  - entropy: sum_v p_v log(p_v + 1e-10), the negative entropy (RL frameworks roll Dream out with
    this one).

Masked-out vocabulary entries (logit -inf, e.g. the mask token) have p = 0 and add nothing.
Everything is elementwise or a reduction over the vocabulary axis (no gather), so it stays
cheap on a vocab-sharded axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

RULES = ("low_confidence", "random", "maskgit_plus", "topk_margin", "entropy")
DREAM_RULES = ("maskgit_plus", "topk_margin", "entropy")
_ENTROPY_EPS = 1e-10  # Dream's epsilon inside the log


def check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f"unknown remasking / confidence rule {rule!r}; use one of {RULES}")


def confidence(logits: jax.Array, cand: jax.Array, rule: str, *, temperature: float = 0.0,
               rng: jax.Array | None = None) -> jax.Array:
  """Confidence of each position's candidate.

  Args:
    logits: float [B, L, V] (already with the sampler's -inf entries).
    cand: int [B, L], the proposed tokens.
    rule: one of RULES (static).
    temperature: static float >= 0; Dream's rules use softmax(logits / T) when T > 0.
    rng: PRNG key, required for "random".
  Returns:
    float32 [B, L].
  """
  check_rule(rule)
  logits = logits.astype(jnp.float32)
  if rule == "random":
    if rng is None:
      raise ValueError("the random rule needs rng")
    return jax.random.uniform(rng, cand.shape, jnp.float32)
  if rule in DREAM_RULES and temperature > 0:
    logits = logits / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  if rule in ("low_confidence", "maskgit_plus"):
    vocab = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.exp(jnp.max(jnp.where(vocab == cand[..., None], logp, -jnp.inf), axis=-1))
  p = jnp.exp(logp)
  if rule == "topk_margin":
    top2 = lax.top_k(p, 2)[0]
    return top2[..., 0] - top2[..., 1]
  return jnp.sum(p * jnp.log(p + _ENTROPY_EPS), axis=-1)  # entropy


def rank_last_offset(rule: str, vocab_size: int) -> float:
  """A shift that puts a lowered confidence below every unshifted one of the same rule (the
  sampler's suppress_eos_confidence): 2 for the [0, 1] rules, log(V) + 2 for entropy
  (its range is [-log V, 0])."""
  check_rule(rule)
  return math.log(vocab_size) + 2.0 if rule == "entropy" else 2.0
