"""The KV-cached window forward computed feature-major, for narrow windows on a CPU.

Why: a dual-cache sampler step on one prompt runs the model on block_length (32) positions. On a
CPU the matmuls of such a window, x [32, K] @ W [K, N], run at about a third of the GEMM peak in
both XLA (YNNPACK) and torch (MKL): measured on the 2-core EPYC of BENCHMARKS.md, 55-65 GFLOP/s
against 165-190 at 320 rows. The same products written with the weights as the row operand,
W^T [N, K] @ x^T [K, 32], run at 115-140. So here the activations flow through every layer as
x^T [D, B*W] (features on the leading axis, one column per position) and every weight is kept
transposed, [out, in] (gate and up stacked into one [2 mlp, D] matmul). The window forward of
the m30 benchmark model (benchmarks/forward.py) at batch 1, vocab head included, went from 36-38
to 22-28 ms over several runs (1.3-1.6x); at 48 columns (rows x positions) 1.15-1.38x, at 64
0.92-1.07x, from 96 on no gain. So the sampler uses this only for windows of at most
`MAX_COLUMNS` columns (diffusion/sampler.py): one prompt's block of 32.

The math is `transformer.window_forward`'s (layers.block): the same RMSNorm, RoPE (rotate half),
GQA attention over the cache with the window's fresh K / V written in, the same finite fill for
padded keys, SwiGLU, q / k / v biases when the family has them; float32 norms and softmax. Only
the order of the sums inside each matmul differs (tests: equal to the row-major window within
float32 rounding, equal sampler tokens). Float32 compute only (the CPU's case: XLA:CPU has no
bf16 x bf16 -> f32 dot for these layouts), without LoRA adapters and without a mesh: the sampler
builds these weights from plain params once, before its loops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bgpo_jax.models import layers

# Windows of at most this many columns (rows x positions) run feature-major (the speedups above).
MAX_COLUMNS = 48
_MATRICES = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_out")


@jax.tree_util.register_pytree_node_class
class Weights:
  """A model's weights laid out for the feature-major window: wte [E, D] (row-major, for the
  lookup), ln_f [D], and per layer a dict of attn_norm / ff_norm [D], q_proj [H*hd, D],
  k_proj / v_proj [KV*hd, D], attn_out [D, H*hd], gate_up [2 mlp, D] (gate rows first),
  ff_out [D, mlp] and the family's biases. A pytree, so it passes through jit like params."""

  def __init__(self, wte, ln_f, blocks: tuple):
    self.wte, self.ln_f, self.blocks = wte, ln_f, tuple(blocks)

  def tree_flatten(self):
    return (self.wte, self.ln_f, self.blocks), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


def weights(config, params: dict) -> Weights:
  """The feature-major copy of plain params (a dict; blocks stacked [L, ...] or a tuple of
  per-layer dicts, transformer.unstack_blocks), in the compute dtype. Costs one more copy of the
  block weights (the sampler keeps the row-major ones for its full forwards)."""
  cdt = config.compute_jnp_dtype
  blocks = params["blocks"]
  if isinstance(blocks, dict):
    n = jax.tree.leaves(blocks)[0].shape[0]
    blocks = tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n))
  out = []
  for p in blocks:
    layer = {k: p[k].astype(cdt).T for k in _MATRICES}
    layer["gate_up"] = jnp.concatenate([p["ff_proj"], p["up_proj"]], axis=1).astype(cdt).T
    layer.update({k: p[k] for k in ("attn_norm", "ff_norm", "q_bias", "k_bias", "v_bias") if k in p})
    out.append(layer)
  return Weights(params["wte"], params["ln_f"], tuple(out))


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """layers.rms_norm over the leading (feature) axis: x [D, N] -> float32 [D, N]."""
  x = x.astype(jnp.float32)
  x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=0, keepdims=True) + eps)
  return x * weight.astype(jnp.float32)[:, None]


def _project(w: jax.Array, n: jax.Array, bias: jax.Array | None) -> jax.Array:
  """w [N, K] @ n [K, C] (+ bias [N]) -> [N, C]."""
  y = jnp.matmul(w, n)
  return y if bias is None else y + bias[:, None].astype(y.dtype)


def window_forward(config, w: Weights, window_tokens: jax.Array, start, cache: tuple,
                   attention_mask: jax.Array | None) -> jax.Array:
  """`transformer.window_forward` on feature-major weights: window_tokens int32 [B, W], start int
  or traced scalar, cache (k, v) each [L, B, S, KV, hd], attention_mask [B, S] or None -> the
  outputs after ln_f [B, W, D] in the compute dtype (row-major again, for the vocab head)."""
  cdt = config.compute_jnp_dtype
  B, W = window_tokens.shape
  H, KV, hd, D = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model
  G, S = H // KV, cache[0].shape[2]
  eps = config.rms_norm_eps
  x = jnp.take(w.wte, window_tokens.reshape(-1), axis=0).astype(cdt).T  # [D, B*W]
  cos, sin = layers.rope_tables(S, hd, config.rope_theta)
  # [hd / 2, 1, W]: the tables repeat over the two halves (layers.apply_rope).
  cos = lax.dynamic_slice_in_dim(cos, start, W, axis=0).T[: hd // 2, None, :]
  sin = lax.dynamic_slice_in_dim(sin, start, W, axis=0).T[: hd // 2, None, :]

  def rope(a: jax.Array, heads: int) -> jax.Array:  # [heads * hd, B*W] -> [heads, hd, B, W] cdt
    a = a.astype(jnp.float32).reshape(heads, hd, B, W)
    a1, a2 = a[:, : hd // 2], a[:, hd // 2:]
    return jnp.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=1).astype(cdt)

  def to_cache(a: jax.Array) -> jax.Array:  # [KV, hd, B, W] -> [B, W, KV, hd]
    return jnp.transpose(a, (2, 3, 0, 1))

  keep = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :, None]
  scale = 1.0 / math.sqrt(hd)
  for i, p in enumerate(w.blocks):
    n = _rms_norm(x, p["attn_norm"], eps).astype(cdt)
    q = rope(_project(p["q_proj"], n, p.get("q_bias")), H)
    k = rope(_project(p["k_proj"], n, p.get("k_bias")), KV)
    v = _project(p["v_proj"], n, p.get("v_bias")).astype(cdt).reshape(KV, hd, B, W)
    keys = lax.dynamic_update_slice_in_dim(cache[0][i], to_cache(k), start, axis=1)  # [B, S, KV, hd]
    values = lax.dynamic_update_slice_in_dim(cache[1][i], to_cache(v), start, axis=1)
    qg = (q * jnp.asarray(scale, cdt)).reshape(KV, G, hd, B, W)
    s = jnp.einsum("bskd,kgdbt->bkgst", keys, qg, preferred_element_type=jnp.float32)  # [B, KV, G, S, W]
    if keep is not None:
      s = jnp.where(keep, s, jnp.finfo(jnp.float32).min)  # finite: an all-padding row stays uniform
    probs = jax.nn.softmax(s, axis=3).astype(cdt)
    ctx = jnp.einsum("bskd,bkgst->kgdbt", values, probs, preferred_element_type=jnp.float32)
    x = x + jnp.matmul(p["attn_out"], ctx.astype(cdt).reshape(H * hd, B * W)).astype(cdt)
    n = _rms_norm(x, p["ff_norm"], eps).astype(cdt)
    gate, up = jnp.split(jnp.matmul(p["gate_up"], n), 2, axis=0)
    x = x + jnp.matmul(p["ff_out"], (jax.nn.silu(gate) * up).astype(cdt)).astype(cdt)
  h = _rms_norm(x, w.ln_f, eps).astype(cdt)  # [D, B*W]
  return h.T.reshape(B, W, D)
