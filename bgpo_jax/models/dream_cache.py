"""KV-cached Dream forwards for the cached samplers (SPEC section 4b): the families' shared cached
forward (transformer.prefill / window_forward, see llada_cache.py), plus Dream's shifted
predictions.

Dream predicts the token at position i from its output at i - 1 (models/dream.py). A window over
the canvas positions [start, start + W) therefore needs the output at start - 1, which sits in
the cached prefix. `window_features` runs the model on [start - 1, start + W) (one position more
than LLaDA's window): position start - 1 is recomputed like the window's others (its query over
the cache, its fresh K / V in place of its cached ones) and the W outputs at
[start - 1, start + W - 1) are the features for [start, start + W). So with a cache that is fresh
(refreshed this step) the features equal `dream.hidden_states`' and the cached sampler gives the
exact sampler's tokens; with a stale cache the first window position sees the block's current
tokens like the rest of the window. (Fast-dLLM's Dream code instead shifts inside the window and
scores the first block position from its own output; we keep Dream's trained layout.)

`start` must be >= 1: the sampler's windows start at or after the prompt, which is never empty.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from bgpo_jax.models import dream, transformer
from bgpo_jax.models.transformer import KVCache, cache_bytes  # noqa: F401  (K and V per layer)


def prefill(config: dream.DreamConfig, params: Any, tokens: jax.Array,
            attention_mask: jax.Array | None, *, return_cache: bool = True
            ) -> tuple[jax.Array, KVCache | None]:
  """Full forward: tokens int32 [B,S] -> (features [B,S,D] as `dream.hidden_states`: feature i
  predicts token i, shift applied; cache (k, v) each [L,B,S,KV,hd], or None)."""
  out, kv = transformer.prefill(config, params, tokens, attention_mask, return_cache=return_cache)
  return transformer.shift_right(out), kv


def window_features(config: dream.DreamConfig, params: Any, tokens: jax.Array, start, width: int,
                    cache: KVCache, attention_mask: jax.Array | None) -> jax.Array:
  """tokens int32 [B, S] (the whole canvas rows), start int (>= 1) or traced scalar, static
  width (start + width <= S) -> features predicting [start, start + width), [B, width, D]: the
  model's outputs at [start - 1, start + width - 1) from a window of width + 1 positions."""
  if isinstance(start, int) and start < 1:
    raise ValueError(f"Dream's cached window needs start >= 1 (the output at start - 1 predicts "
                     f"position start), got start={start}; prompts must not be empty")
  win = lax.dynamic_slice_in_dim(tokens, start - 1, width + 1, axis=1)
  out = transformer.window_forward(config, params, win, start - 1, cache, attention_mask)
  return out[:, :width]
