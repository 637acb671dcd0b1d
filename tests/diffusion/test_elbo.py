"""ELBO terms (SPEC section 2) and d1 one-step log-probs on the tiny LLaDA."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.diffusion import elbo, masking
from bgpo_jax.models import llada

CFG = llada.LLaDAConfig.preset("tiny")
P, L, B = 5, 8, 2


@functools.lru_cache(maxsize=None)
def params(context_free: bool = False):
  p = llada.init_params(CFG, jax.random.key(0))
  if context_free:
    # With no attention / MLP output every position's hidden state is a function of its own
    # token only, so all masked positions predict the same categorical q.
    p = jax.tree_util.tree_map(lambda x: x, p)
    p["blocks"]["attn_out"] = jnp.zeros_like(p["blocks"]["attn_out"])
    p["blocks"]["ff_out"] = jnp.zeros_like(p["blocks"]["ff_out"])
  return p


def batch(seed=0):
  r = np.random.default_rng(seed)
  toks = r.integers(6, CFG.vocab_size, size=(B, P + L)).astype(np.int32)
  attn = np.ones((B, P + L), np.int32)
  toks[1, :2] = CFG.pad_token_id  # left padding
  attn[1, :2] = 0
  return jnp.asarray(toks), jnp.asarray(attn)


def manual_term(p, toks, attn, mask, weight):
  """The textbook version: full-sequence forward, log_softmax, gather."""
  noisy = toks.at[:, -L:].set(jnp.where(mask, CFG.mask_token_id, toks[:, -L:]))
  logits = llada.forward(CFG, p, noisy, attn)[:, -L:]
  logp = jax.nn.log_softmax(logits, -1)
  tok = jnp.take_along_axis(logp, toks[:, -L:, None], -1)[..., 0]
  return weight * jnp.sum(jnp.where(mask, tok, 0.0), -1)


# Few distinct programs: on a 2-core CPU each compile of the tiny model costs seconds.
NUM_MC = 256
_terms = jax.jit(elbo.elbo_terms, static_argnums=0, static_argnames="normalize_length")


@jax.jit
def _check_terms(p, toks, attn, masks, weights):
  """Our terms, normalized, and the textbook version, for the first 3 samples."""
  ours = elbo.elbo_terms(CFG, p, toks, attn, masks[:3], weights[:3])
  norm = elbo.elbo_term(CFG, p, toks, attn, masks[0], weights[0], normalize_length=True)
  manual = jax.lax.map(lambda mw: manual_term(p, toks, attn, *mw), (masks[:3], weights[:3]))
  return ours, norm, manual


def test_masked_sequence():
  toks, _ = batch()
  mask = jnp.zeros((B, L), bool).at[0, 3].set(True).at[1, 0].set(True)
  out = np.asarray(elbo.masked_sequence(toks, mask, 2))
  want = np.asarray(toks).copy()
  want[0, P + 3] = want[1, P] = 2
  np.testing.assert_array_equal(out, want)


def test_elbo_term_matches_full_forward():
  toks, attn = batch()
  masks, weights = masking.sample_masks(jax.random.key(1), B, L, NUM_MC)
  ours, norm, manual = _check_terms(params(), toks, attn, masks, weights)
  chex.assert_shape(ours, (3, B))
  chex.assert_trees_all_close(ours, manual, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(ours) < 0)
  chex.assert_trees_all_close(norm, ours[0] / L, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["stratified", "continuous"])
def test_unbiased_for_context_independent_model(estimator):
  """For a context-free model log p(y) = sum_i log q(y_i) exactly, and both estimators are
  unbiased for it: the MC mean must fall within 5 standard errors."""
  p = params(context_free=True)
  toks, attn = batch(seed=2)
  all_masked = jnp.full((1, P + L), CFG.mask_token_id, jnp.int32)
  logq = jax.nn.log_softmax(llada.forward(CFG, p, all_masked)[0, 0])
  exact = np.asarray(jnp.sum(logq[toks[:, -L:]], -1))

  n = NUM_MC
  masks, weights = masking.sample_masks(jax.random.key(3), B, L, n, estimator=estimator)
  terms = np.asarray(_terms(CFG, p, toks, attn, masks, weights))  # [n, B]
  mean, se = terms.mean(0), terms.std(0, ddof=1) / np.sqrt(n)
  assert np.all(se > 0)
  assert np.all(np.abs(mean - exact) < 5 * se), (mean, exact, se)


def test_gradient_and_logits_chunking():
  toks, attn = batch()
  masks, weights = masking.sample_masks(jax.random.key(4), B, L, NUM_MC)

  def loss(p, chunk, cfg=CFG):
    return jnp.sum(elbo.elbo_term(cfg, p, toks, attn, masks[0], weights[0], logits_chunk=chunk))

  # L = 8: chunks of 4 (two equal chunks), of 3 (3 + 3 + a remainder of 2), and the config's
  # logits_chunk (None = config.logits_chunk = 3): the same ELBO terms and gradients as one block.
  chunked_cfg = dataclasses.replace(CFG, logits_chunk=3)
  both = jax.jit(lambda p: (jax.value_and_grad(loss)(p, 0), jax.value_and_grad(loss)(p, 4),
                            jax.value_and_grad(loss)(p, 3),
                            jax.value_and_grad(functools.partial(loss, cfg=chunked_cfg))(p, None)))
  (v, g), *chunked = both(params())
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))
  assert float(optax_global_norm(g)) > 0
  for vc, gc in chunked:
    chex.assert_trees_all_close(vc, v, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(gc, g, rtol=1e-5, atol=1e-7)
  # Per-position log-probs too (the terms sum them): a chunk boundary bug cannot cancel out.
  lp = lambda chunk: elbo.response_token_logps(CFG, params(), toks, attn, toks[:, -L:],  # noqa: E731
                                               logits_chunk=chunk)
  chex.assert_trees_all_close(lp(3), lp(0), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="logits_chunk -1 must be >= 0"):
    jax.eval_shape(functools.partial(loss, chunk=-1), params())
  with pytest.raises(ValueError, match="logits_chunk -2 must be >= 0"):
    dataclasses.replace(CFG, logits_chunk=-2)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


_one_step_masked = jax.jit(elbo.one_step_masked_tokens,
                          static_argnames=("gen_length", "prompt_mask_prob", "mask_id"))


def test_one_step_masking_and_logps():
  toks, attn = batch()
  # Masking: a bigger batch to check the rate; padding never masked; response fully masked.
  r = np.random.default_rng(5)
  big = jnp.asarray(r.integers(6, 120, size=(64, 40)), jnp.int32)
  big_attn = jnp.ones((64, 40), jnp.int32).at[:, :10].set(0)
  kw = dict(gen_length=8, prompt_mask_prob=0.3, mask_id=2)
  m = np.asarray(_one_step_masked(big, big_attn, rng=jax.random.key(6), **kw))
  assert (m[:, -8:] == 2).all()
  np.testing.assert_array_equal(m[:, :10], np.asarray(big[:, :10]))
  rate = (m[:, 10:32] == 2).mean()
  assert abs(rate - 0.3) < 5 * np.sqrt(0.3 * 0.7 / m[:, 10:32].size)
  m2 = _one_step_masked(big, big_attn, rng=jax.random.key(6), **kw)
  np.testing.assert_array_equal(m, np.asarray(m2))

  @jax.jit
  def ours_and_manual(p, key):
    got = elbo.one_step_token_logps(CFG, p, toks, attn, gen_length=L, rng=key)
    noisy = elbo.one_step_masked_tokens(toks, attn, gen_length=L, rng=key,
                                        prompt_mask_prob=0.15, mask_id=CFG.mask_token_id)
    logp = jax.nn.log_softmax(llada.forward(CFG, p, noisy, attn)[:, -L:], -1)
    return got, jnp.take_along_axis(logp, toks[:, -L:, None], -1)[..., 0]

  got, want = ours_and_manual(params(), jax.random.key(7))
  chex.assert_shape(got, (B, L))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
