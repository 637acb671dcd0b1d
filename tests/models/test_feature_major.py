"""models/feature_major.py: the narrow cached window computed feature-major gives the row-major
window forward's outputs (both families: Dream's q / k / v biases and GQA, padding, a traced
start), and the dual-cache sampler that uses it on a CPU gives the same tokens as without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.diffusion import sampler
from bgpo_jax.models import dream, feature_major, llada, transformer

CONFIGS = [
  llada.LLaDAConfig.preset("tiny", n_layers=3, init_std=0.2),
  dream.DreamConfig.preset("tiny", n_layers=2, init_std=0.2),  # GQA: 4 query / 2 kv heads
]


def _params(config):
  params = transformer.init_params(config, jax.random.key(0))
  if config.qkv_bias:  # init gives zero biases: random ones, so that the test sees them
    keys = iter(jax.random.split(jax.random.key(7), 3))
    params["blocks"].update({k: 0.3 * jax.random.normal(next(keys), params["blocks"][k].shape)
                             for k in ("q_bias", "k_bias", "v_bias")})
  return params


@pytest.mark.parametrize("config", CONFIGS, ids=["llada", "dream"])
@pytest.mark.parametrize("rows", [1, 2])
def test_feature_major_window_gives_the_row_major_outputs(config, rows):
  params = _params(config)
  toks = jax.random.randint(jax.random.key(1), (rows, 40), 3, config.vocab_size).astype(jnp.int32)
  attn = jnp.ones((rows, 40), jnp.int32).at[0, :5].set(0)  # row 0 left-padded
  _, kv = jax.jit(lambda p: transformer.prefill(config, p, toks, attn))(params)
  # A stale cache (other tokens in the window than the prefill saw), as in a dual-cache step.
  window = jax.random.randint(jax.random.key(2), (rows, 8), 3, config.vocab_size).astype(jnp.int32)
  win = jax.jit(lambda p, start: transformer.window_forward(config, p, window, start, kv, attn))
  want = win(params, jnp.int32(16))
  for source in (params, transformer.unstack_blocks(params)):  # stacked or per-layer input
    fm = feature_major.weights(config, source)
    assert fm.blocks[0]["gate_up"].shape == (2 * config.mlp_hidden_size, config.d_model)
    got = win(fm, jnp.int32(16))
    assert got.shape == want.shape == (rows, 8, config.d_model)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # The window moved: the fresh K / V land at the new positions.
  np.testing.assert_allclose(win(feature_major.weights(config, params), jnp.int32(24)),
                             win(params, jnp.int32(24)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=["llada", "dream"])
def test_dual_cache_sampler_tokens_equal_with_and_without_the_feature_major_window(config, monkeypatch):
  params = _params(config)
  prompt = jax.random.randint(jax.random.key(3), (1, 12), 3, config.vocab_size).astype(jnp.int32)
  mask = jnp.ones_like(prompt).at[0, :3].set(0)
  settings = sampler.SamplerSettings(gen_length=32, steps=16, block_length=8, temperature=0.0,
                                     cache="dual")
  calls = []
  real = feature_major.window_forward
  monkeypatch.setattr(feature_major, "window_forward", lambda *a: calls.append(1) or real(*a))
  run = lambda: np.asarray(sampler.generate(config, params, prompt, mask, settings, jax.random.key(4)))  # noqa: E731
  got = run()
  assert calls, "a one-prompt dual-cache window on a CPU should run feature-major"
  monkeypatch.setattr(feature_major, "MAX_COLUMNS", 0)  # the row-major window
  calls.clear()
  want = run()
  assert not calls
  np.testing.assert_array_equal(got, want)
  assert not np.any(got == config.mask_token_id)
