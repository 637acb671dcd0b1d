"""ELBO terms of a masked diffusion LM (SPEC section 2) and d1's one-step log-probs (section 3).

`elbo_term` is one Monte Carlo sample: the unit a BGPO train step scans over, so it holds one
sample's activations. The vocabulary head runs only on the L response positions (the prompt is
never masked, so its logits are never needed), in float32 for log_softmax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bgpo_jax.models import family, llada

Params = Any


def masked_sequence(tokens: jax.Array, mask: jax.Array, mask_id: int) -> jax.Array:
  """Replaces the masked response tokens with `mask_id`.

  Args:
    tokens: int [B, P+L].
    mask: bool [B, L] over the response (the last L positions).
  Returns:
    int32 [B, P+L].
  """
  L = mask.shape[-1]
  resp = jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens[:, -L:])
  return lax.dynamic_update_slice_in_dim(tokens, resp, tokens.shape[1] - L, axis=1).astype(
      jnp.int32)


def _target_logps(config: llada.LLaDAConfig, params: Params, hidden: jax.Array,
                  targets: jax.Array) -> jax.Array:
  """hidden [B, C, D], targets [B, C] -> log p(target) float32 [B, C]."""
  logits = family.module_for(config).lm_head(config, params, hidden).astype(jnp.float32)
  # Select the target logit by comparison, not gather: stays elementwise (fusable, and no
  # all-gather when the vocab axis is sharded).
  vocab = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  tgt = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  return tgt - jax.nn.logsumexp(logits, axis=-1)


def response_token_logps(config: llada.LLaDAConfig, params: Params, tokens: jax.Array,
                         attention_mask: jax.Array | None, targets: jax.Array, *,
                         logits_chunk: int | None = None) -> jax.Array:
  """log p_theta(targets | tokens) at the last L positions.

  Args:
    tokens: int [B, P+L] model input (already masked).
    attention_mask: [B, P+L] (1 = real key) or None.
    targets: int [B, L] the true response tokens.
    logits_chunk: if > 0, the head + log_softmax run over chunks of that many positions (the
      last chunk takes the remainder of L) under jax.checkpoint, so only one chunk's
      [B, chunk, vocab] float32 logits is alive (forward and backward), at the cost of one more
      head matmul in the backward; for large vocabularies. None = config.logits_chunk.
  Returns:
    float32 [B, L].
  """
  L = targets.shape[-1]
  if logits_chunk is None:
    logits_chunk = config.logits_chunk
  if logits_chunk < 0:
    raise ValueError(f"logits_chunk {logits_chunk} must be >= 0 (0 = no chunking)")
  hidden = family.module_for(config).hidden_states(config, params, tokens, attention_mask)[:, -L:]
  if not logits_chunk or logits_chunk >= L:
    return _target_logps(config, params, hidden, targets)
  nc, rest = divmod(L, logits_chunk)
  main = nc * logits_chunk
  B, _, D = hidden.shape
  hs = jnp.moveaxis(hidden[:, :main].reshape(B, nc, logits_chunk, D), 1, 0)
  ts = jnp.moveaxis(targets[:, :main].reshape(B, nc, logits_chunk), 1, 0)
  fn = jax.checkpoint(lambda ht: _target_logps(config, params, *ht))
  out = jnp.moveaxis(lax.map(fn, (hs, ts)), 0, 1).reshape(B, main)  # [B, main]
  if rest:
    out = jnp.concatenate([out, fn((hidden[:, main:], targets[:, main:]))], axis=1)
  return out


def elbo_term(config: llada.LLaDAConfig, params: Params, tokens: jax.Array,
              attention_mask: jax.Array | None, mask: jax.Array, weight: jax.Array, *,
              normalize_length: bool = False, logits_chunk: int | None = None) -> jax.Array:
  """One Monte Carlo sample of the ELBO: l = weight * sum_{i masked} log p(y_i | y_t, x).

  Args:
    tokens: int [B, P+L] prompt + response y (clean).
    attention_mask: [B, P+L], 1 = real key (prompt padding 0).
    mask: bool [B, L], response positions masked in this sample.
    weight: float [B], 1/t or L/l_j (masking.sample_masks).
    normalize_length: divide by L.
    logits_chunk: see response_token_logps.
  Returns:
    float32 [B].
  """
  L = mask.shape[-1]
  noisy = masked_sequence(tokens, mask, config.mask_token_id)
  logp = response_token_logps(config, params, noisy, attention_mask, tokens[:, -L:],
                              logits_chunk=logits_chunk)
  out = weight.astype(jnp.float32) * jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)
  return out / L if normalize_length else out


def elbo_terms(config: llada.LLaDAConfig, params: Params, tokens: jax.Array,
               attention_mask: jax.Array | None, masks: jax.Array, weights: jax.Array, *,
               normalize_length: bool = False, logits_chunk: int | None = None) -> jax.Array:
  """All n samples, one at a time (lax.map): masks bool [n, B, L], weights [n, B] -> [n, B].

  For terms that need no gradient through all samples at once (old / reference policy).
  """
  return lax.map(
      lambda mw: elbo_term(config, params, tokens, attention_mask, mw[0], mw[1],
                           normalize_length=normalize_length, logits_chunk=logits_chunk),
      (masks, weights))


def one_step_masked_tokens(tokens: jax.Array, attention_mask: jax.Array | None, *,
                           gen_length: int, rng: jax.Array, prompt_mask_prob: float,
                           mask_id: int) -> jax.Array:
  """d1's input: every response token masked, each real prompt token masked w.p. p.

  Args:
    tokens: int [B, P+L]; attention_mask [B, P+L] (padding, 0, is never masked) or None.
    rng: one PRNG key, or a [B] array of typed keys (jax.random.key), one per row: a row's
      mask then depends on its own key only, whatever micro-batch it lands in.
  Returns:
    int32 [B, P+L].
  """
  B, S = tokens.shape
  P = S - gen_length
  real = (jnp.ones((B, P), bool) if attention_mask is None
          else attention_mask[:, :P] != 0)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:
    u = jax.vmap(lambda k: jax.random.uniform(k, (P,)))(rng)
  else:
    u = jax.random.uniform(rng, (B, P))
  hit = real & (u < prompt_mask_prob)
  prompt = jnp.where(hit, mask_id, tokens[:, :P])
  return jnp.concatenate(
      [prompt, jnp.full_like(tokens[:, P:], mask_id)], axis=1).astype(jnp.int32)


def one_step_token_logps(config: llada.LLaDAConfig, params: Params, tokens: jax.Array,
                         attention_mask: jax.Array | None, *, gen_length: int, rng: jax.Array,
                         prompt_mask_prob: float = 0.15,
                         logits_chunk: int | None = None) -> jax.Array:
  """diffu-GRPO per-token log-probs log p(y_i | masked input), float32 [B, gen_length].

  The prompt masking is a pure function of `rng`: pass the same key for the current, old and
  reference policies.
  """
  noisy = one_step_masked_tokens(tokens, attention_mask, gen_length=gen_length, rng=rng,
                                 prompt_mask_prob=prompt_mask_prob,
                                 mask_id=config.mask_token_id)
  return response_token_logps(config, params, noisy, attention_mask, tokens[:, -gen_length:],
                              logits_chunk=logits_chunk)
