"""transformer.unstack_blocks: per-layer weights run the same forwards as the layer scan (the
samplers use them on a CPU), for both families, with and without a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.models import dream, llada, transformer


@pytest.mark.parametrize("config", [
  llada.LLaDAConfig.preset("tiny", n_layers=3, init_std=0.2),
  dream.DreamConfig.preset("tiny", n_layers=2, init_std=0.2),
], ids=["llada", "dream"])
def test_unstacked_blocks_give_the_scans_outputs(config):
  params = transformer.init_params(config, jax.random.key(0))
  flat = transformer.unstack_blocks(params)
  assert len(flat["blocks"]) == config.n_layers
  assert flat["blocks"][1]["q_proj"].shape == params["blocks"]["q_proj"].shape[1:]
  toks = jax.random.randint(jax.random.key(1), (2, 24), 3, config.vocab_size).astype(jnp.int32)
  attn = jnp.ones((2, 24), jnp.int32).at[0, :5].set(0)
  hs = jax.jit(lambda p: transformer.hidden_states(config, p, toks, attn))
  np.testing.assert_allclose(hs(flat), hs(params), rtol=1e-6, atol=1e-6)
  pre = jax.jit(lambda p: transformer.prefill(config, p, toks, attn))
  (h0, kv0), (h1, kv1) = pre(params), pre(flat)
  np.testing.assert_allclose(h1, h0, rtol=1e-6, atol=1e-6)
  for a, b in zip(kv0, kv1):
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  win = jax.jit(lambda p: transformer.window_forward(config, p, toks[:, 8:16], 8, kv0, attn))
  np.testing.assert_allclose(win(flat), win(params), rtol=1e-6, atol=1e-6)
