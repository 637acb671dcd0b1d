"""KV-cached LLaDA forwards for the cached samplers (SPEC section 4b).

The bidirectional model has no causal cache; Fast-dLLM's approximation instead keeps each layer's
keys / values (after RoPE, at their absolute positions) from one full forward and reuses them
while a block is decoded. Two functions, both pure and over llada's parameter tree:

- `prefill(config, params, tokens, attention_mask)`: the full forward, returning the final hidden
  states [B, S, D] and the cache: per layer K and V, each [L, B, S, KV, hd] in the compute dtype.
- `window_forward(config, params, window_tokens, start, cache, attention_mask)`: the model on the
  positions [start, start + W) only. In every layer the window's fresh K / V replace positions
  [start, start + W) of that layer's cached K / V and the window's queries attend over the whole
  (updated) cache. With W = S - start this is Fast-dLLM's prefix cache (the cached [0, start) plus
  the fresh rest); with W = block_length it is the dual cache (prefix and suffix as cached). The
  updated cache is not returned: Fast-dLLM refreshes it with a full forward at every block start.

The math is llada.hidden_states' (same RMSNorm / RoPE / attention / MLP, same float32 islands,
same finite fill for padded keys), so a window covering the whole canvas gives its hidden states.
The same logical-axis constraints pin the layout under a mesh; without one they are no-ops.

The layer is written once for both families: Dream's block is LLaDA's plus q / k / v biases
(added when the layer's parameters hold them), with its own axis names (`model` = the family
module); models/dream_cache.py adds Dream's shifted predictions on top. `window_features` is the
family-level entry the cached sampler calls (models/family.py `cached_forward_for`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from bgpo_jax.models import llada
from bgpo_jax.models import sharding

# (k, v), each [L, B, S, KV, hd] in the compute dtype.
KVCache = tuple[jax.Array, jax.Array]


def cache_bytes(config: llada.LLaDAConfig, batch: int, seq_len: int) -> int:
  """Bytes of one KV cache (K and V of every layer) for `batch` sequences of `seq_len`."""
  itemsize = jnp.dtype(config.compute_jnp_dtype).itemsize
  return 2 * config.n_layers * batch * seq_len * config.n_kv_heads * config.head_dim * itemsize


def attention(config: llada.LLaDAConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              key_mask: jax.Array | None) -> jax.Array:
  """q [B,W,H,hd] over keys k / v [B,S,KV,hd], key_mask bool [B,S] -> context [B,W,H,hd].

  llada's attention (config.attention_impl, W <= S is fine for every implementation) except
  Pallas splash, whose kernel is built for square [S, S] masks: a shorter window runs
  jax.nn.dot_product_attention's XLA path instead."""
  if q.shape[1] != k.shape[1] and llada.attention_impl_for(config) == "splash":
    config = dataclasses.replace(config, attention_impl="jax")
  return llada.attention(config, q, k, v, key_mask)


def _layer(model, config, x: jax.Array, p: Mapping[str, jax.Array], cos, sin,
           key_mask, cached: KVCache | None, start) -> tuple[jax.Array, KVCache]:
  """One block on a window. x [B,W,D]; cached: this layer's (k, v) [B,S,KV,hd] or None (the
  window is the whole sequence). Returns (x, the window's fresh (k, v) [B,W,KV,hd]).
  `model`: the family module (llada or dream), for its parameter axis names."""
  cdt = config.compute_jnp_dtype
  B, W, _ = x.shape
  H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
  act = lambda y, *axes: sharding.constrain(y, ("batch", "seq") + axes)
  param_axes = model.param_logical_axes(config)["blocks"]
  compute_axes = model.compute_weight_axes(config)
  # Already in the compute dtype and gathered when the sampler runs from inference weights
  # (rollout.RolloutSampler.inference_params): then this is a no-op.
  w = {k: sharding.gather_weight(v, param_axes[k][1:], compute_axes[k], cdt)
       for k, v in p.items() if k in compute_axes}

  x = act(x, "act_embed")
  n = llada.rms_norm(x, p["attn_norm"], config.rms_norm_eps).astype(cdt)
  bias = lambda name: w[name] if name in w else 0  # Dream's QKV biases; LLaDA has none
  q = act((n @ w["q_proj"] + bias("q_bias")).reshape(B, W, H, hd), "act_heads", None)
  k = act((n @ w["k_proj"] + bias("k_bias")).reshape(B, W, KV, hd), "act_kv_heads", None)
  v = act((n @ w["v_proj"] + bias("v_bias")).reshape(B, W, KV, hd), "act_kv_heads", None)
  q = llada.apply_rope(q, cos, sin).astype(cdt)
  k = llada.apply_rope(k, cos, sin).astype(cdt)
  if cached is None:
    keys, values = k, v
  else:
    keys = lax.dynamic_update_slice_in_dim(cached[0], k, start, axis=1)
    values = lax.dynamic_update_slice_in_dim(cached[1], v, start, axis=1)
    keys = act(keys, "act_kv_heads", None)
    values = act(values, "act_kv_heads", None)
  ctx = act(attention(config, q, keys, values, key_mask), "act_heads", None)
  x = act(x + (ctx.reshape(B, W, H * hd) @ w["attn_out"]).astype(cdt), "act_embed")
  m = llada.rms_norm(x, p["ff_norm"], config.rms_norm_eps).astype(cdt)
  h = act(jax.nn.silu(m @ w["ff_proj"]) * (m @ w["up_proj"]), "act_mlp")
  return act(x + (h @ w["ff_out"]).astype(cdt), "act_embed"), (k, v)


def _embed(config: llada.LLaDAConfig, params: Any, tokens: jax.Array) -> jax.Array:
  cdt = config.compute_jnp_dtype
  x = sharding.constrain(jnp.take(params["wte"], tokens, axis=0).astype(cdt), ("batch_dp", "seq", "embed"))
  return sharding.constrain(x, ("batch", "seq", "act_embed"))


def prefill(config: llada.LLaDAConfig, params: Any, tokens: jax.Array,
            attention_mask: jax.Array | None, *, return_cache: bool = True
            ) -> tuple[jax.Array, KVCache | None]:
  """Full forward: tokens int32 [B,S] -> (hidden after ln_f [B,S,D] in the compute dtype,
  cache (k, v) each [L,B,S,KV,hd], or None with return_cache=False)."""
  return family_prefill(llada, config, params, tokens, attention_mask, return_cache=return_cache)


def family_prefill(model, config, params: Any, tokens: jax.Array,
                   attention_mask: jax.Array | None, *, return_cache: bool = True
                   ) -> tuple[jax.Array, KVCache | None]:
  """`prefill` for the family module `model` (llada or dream): the outputs after the final norm
  at each position (no shift), and the cache."""
  S = tokens.shape[1]
  cos, sin = llada.rope_tables(S, config.head_dim, config.rope_theta)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)

  def body(x, p):
    x, kv = _layer(model, config, x, p, cos, sin, key_mask, None, 0)
    return x, (kv if return_cache else None)

  x, kv = lax.scan(body, _embed(config, params, tokens), params["blocks"], unroll=config.scan_unroll)
  hidden = llada.rms_norm(x, params["ln_f"], config.rms_norm_eps).astype(config.compute_jnp_dtype)
  return hidden, kv


def window_forward(config: llada.LLaDAConfig, params: Any, window_tokens: jax.Array, start,
                   cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """The model on positions [start, start + W) against a cache (module docstring).

  Args:
    window_tokens: int32 [B, W], the canvas positions [start, start + W).
    start: int or int32 scalar (traced is fine; W is static).
    cache: (k, v) each [L, B, S, KV, hd] from `prefill`.
    attention_mask: [B, S] key padding mask of the whole sequence (1 = real).
  Returns:
    hidden states after ln_f [B, W, D] in the compute dtype.
  """
  return family_window_forward(llada, config, params, window_tokens, start, cache, attention_mask)


def family_window_forward(model, config, params: Any, window_tokens: jax.Array, start,
                          cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """`window_forward` for the family module `model`: the outputs after the final norm at the
  window's positions [start, start + W) (no shift)."""
  W = window_tokens.shape[1]
  S = cache[0].shape[2]
  cos, sin = llada.rope_tables(S, config.head_dim, config.rope_theta)
  cos = lax.dynamic_slice_in_dim(cos, start, W, axis=0)
  sin = lax.dynamic_slice_in_dim(sin, start, W, axis=0)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)

  def body(x, layer):
    p, k, v = layer
    x, _ = _layer(model, config, x, p, cos, sin, key_mask, (k, v), start)
    return x, None

  x, _ = lax.scan(body, _embed(config, params, window_tokens), (params["blocks"],) + tuple(cache),
                  unroll=config.scan_unroll)
  return llada.rms_norm(x, params["ln_f"], config.rms_norm_eps).astype(config.compute_jnp_dtype)


# --- the family-level cached forward (models/family.py `cached_forward_for`): features that
# predict positions, as the family's `hidden_states` returns them.


def window_features(config: llada.LLaDAConfig, params: Any, tokens: jax.Array, start, width: int,
                    cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """tokens int32 [B, S] (the whole canvas rows), start int or traced scalar, static width ->
  the features that predict positions [start, start + width), [B, width, D]: for LLaDA the
  window's own hidden states."""
  win = lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
  return window_forward(config, params, win, start, cache, attention_mask)
