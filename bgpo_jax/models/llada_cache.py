"""KV-cached LLaDA forwards for the cached samplers (SPEC section 4b).

The bidirectional model has no causal cache; Fast-dLLM's approximation instead keeps each layer's
keys / values (after RoPE, at their absolute positions) from one full forward and reuses them
while a block is decoded. Two functions, both pure and over the family's parameter tree:

- `prefill(config, params, tokens, attention_mask)`: the full forward, returning the final hidden
  states [B, S, D] and the cache: per layer K and V, each [L, B, S, KV, hd] in the compute dtype.
- `window_forward(config, params, window_tokens, start, cache, attention_mask)`: the model on the
  positions [start, start + W) only. In every layer the window's fresh K / V replace positions
  [start, start + W) of that layer's cached K / V and the window's queries attend over the whole
  (updated) cache. With W = S - start this is Fast-dLLM's prefix cache (the cached [0, start) plus
  the fresh rest); with W = block_length it is the dual cache (prefix and suffix as cached). The
  updated cache is not returned: Fast-dLLM refreshes it with a full forward at every block start.

Both run the families' one block (layers.block, the cache's K / V update passed in) through the
shared layer scan (transformer.prefill / window_forward), so the math is hidden_states' (same
RMSNorm / RoPE / attention / MLP, same float32 islands, same finite fill for padded keys) and a
window covering the whole canvas gives its hidden states. The same logical-axis constraints pin
the layout under a mesh; without one they are no-ops. models/dream_cache.py adds Dream's shifted
predictions on top. `window_features` is the family-level entry the cached sampler calls
(models/family.py `cached_forward_for`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from bgpo_jax.models import llada, transformer
from bgpo_jax.models.attention import window_attention as attention  # noqa: F401  (W <= S queries)
from bgpo_jax.models.transformer import KVCache, cache_bytes, prefill, window_forward  # noqa: F401


def family_prefill(model, config, params: Any, tokens: jax.Array,
                   attention_mask: jax.Array | None, *, return_cache: bool = True
                   ) -> tuple[jax.Array, KVCache | None]:
  """`prefill` for the family module `model` (llada or dream; its config says everything the
  shared forward needs): the outputs after the final norm at each position (no shift), and the
  cache."""
  del model
  return transformer.prefill(config, params, tokens, attention_mask, return_cache=return_cache)


def family_window_forward(model, config, params: Any, window_tokens: jax.Array, start,
                          cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """`window_forward` for the family module `model`: the outputs after the final norm at the
  window's positions [start, start + W) (no shift)."""
  del model
  return transformer.window_forward(config, params, window_tokens, start, cache, attention_mask)


# --- the family-level cached forward (models/family.py `cached_forward_for`): features that
# predict positions, as the family's `hidden_states` returns them.


def window_features(config: llada.LLaDAConfig, params: Any, tokens: jax.Array, start, width: int,
                    cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """tokens int32 [B, S] (the whole canvas rows), start int or traced scalar, static width ->
  the features that predict positions [start, start + width), [B, width, D]: for LLaDA the
  window's own hidden states."""
  win = lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
  return window_forward(config, params, win, start, cache, attention_mask)
