"""The transformer layer shared by every model family: RMSNorm, RoPE, the matmul helpers, the remat
policy table and one pre-norm block (SPEC section 1), used by the families' forwards (transformer.py)
and by the KV-cached forwards (llada_cache.py, dream_cache.py).

Block: `n = RMSNorm(x)`; `x += attn_out(Attention(RoPE(q_proj n + q_b), RoPE(k_proj n + k_b),
v_proj n + v_b))`; `m = RMSNorm(x)`; `x += ff_out(silu(ff_proj m) * up_proj m)`. The biases exist
in a family whose parameters hold them (Dream); LLaDA has none. RMSNorm, RoPE and softmax run in
float32, the matmuls in the compute dtype. With LoRA adapters (models/lora.py) a targeted matmul
`x @ W` becomes `x @ W + scale * (x @ A) @ B`, unmerged (`lora_dense`).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bgpo_jax.models import attention, sharding

# Remat policy names -> jax.checkpoint policy (None = save nothing, i.e. full recompute); the
# layer scan wraps each block in it (remat_policy "none": no jax.checkpoint at all).
_SAVE_ATTN_NAMES = ("q", "k", "v", "attn_ctx")
# What remat_policy="activations" saves per layer: q / k / v (after RoPE), the attention's output
# and row statistics (so the backward needs no attention forward; cuDNN's and splash's too, see
# below), the context (attn_out's weight gradient), the mid-block residual
# stream (the MLP norm's input) and the SwiGLU's inputs: ~[B, S, 7 D + 2 mlp] in the compute dtype.
# The LLaDA-8B math plan grows 22.3 -> 28.7 GB per device on 8 devices against "full".
ACTIVATION_NAMES = _SAVE_ATTN_NAMES + ("attn_out", "attn_max", "attn_inv_sum", "resid_mid", "mlp_gate", "mlp_up")
# The fused kernels' own residuals: splash names its output and log-sum-exp "attn_out"
# (_splash_attention); cuDNN's, the outputs of jax.nn's forward primitive below (the context and
# the softmax statistics), carry no name and are saved by primitive. Without them the backward
# would run each layer's attention forward again.
_FUSED_ATTENTION_FORWARDS = ("dot_product_attention_fwd_wrapper",)


def _save_fused_attention_forward(prim, *_, **__) -> bool:
  return prim.name in _FUSED_ATTENTION_FORWARDS


CHECKPOINT_POLICIES = {
  "full": None,
  # Keeps q, k, v and the attention context (small: [B,S,D] each), recomputes the MLP.
  "save_attn": jax.checkpoint_policies.save_only_these_names(*_SAVE_ATTN_NAMES),
  # Keeps every activation the block's backward reads and recomputes no matmul: only the norms'
  # and SwiGLU's elementwise work and (under FSDP) the weight gathers, which are not saved (a
  # layer's gathered bf16 weights are 436 MB on LLaDA-8B). See ACTIVATION_NAMES.
  "activations": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(*ACTIVATION_NAMES), _save_fused_attention_forward),
}
REMAT_POLICIES = ("none",) + tuple(CHECKPOINT_POLICIES)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32 (weight only); returns float32 [..., D]."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * weight.astype(jnp.float32)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [S, head_dim] for positions 0..S-1 (rotate-half layout: freqs repeated)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,S,H,hd] -> rotated float32 [B,S,H,hd] (non-interleaved "rotate half")."""
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  # Per half (the tables repeat over the halves): the same products and sums as
  # x * cos + concat(-x2, x1) * sin, in a form whose autodiff is one elementwise pass per half.
  x1, x2 = x[..., :half], x[..., half:]
  c, s = cos[None, :, None, :half], sin[None, :, None, :half]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def dense(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] as one 2-D matmul over the flattened rows [prod(...), K].

  Same products as x @ w; the difference is the backward. Autodiff of a [B, S, K] x [K, N] dot
  gives the weight gradient as a dot contracting two dims (B and S), which XLA canonicalises by
  writing one operand transposed ([N, B*S]): on CPU a strided loop fusion that recomputes the
  elementwise producer (the SwiGLU derivative) in the transposed layout, ~30% of the MLP's
  backward. Over 2-D rows the weight gradient is x^T dy contracting one dim: no copy.
  """
  y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
  return y.reshape(*x.shape[:-1], w.shape[-1])


# One targeted weight's LoRA factors for a matmul: (A [K, r], scale * B [r, N]) in the compute
# dtype, optionally with a third entry (rate, keys [R]): dropout on the adapter's input, one mask
# per row key; or None (no adapter on that weight).
LoraFactors = tuple | None


def dropout_rows(x: jax.Array, keys: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout with one independent mask per row: x [R*T, K] or [R, T, K] (rows first),
  keys [R] -> x with each entry zeroed with probability `rate`, the rest scaled by 1 / (1 - rate).
  A row's mask depends only on its key, so it is the same on any sharding or micro-batching."""
  shape = x.shape
  xr = x.reshape(keys.shape[0], -1, shape[-1])
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, xr.shape[1:]))(keys)
  return jnp.where(keep, xr / (1.0 - rate), 0).astype(x.dtype).reshape(shape)


def _lora_term(x: jax.Array, lora: tuple) -> jax.Array:
  """(dropout(x) @ A) @ B: the low-rank path (PEFT's lora_B(lora_A(dropout(x))) * scaling)."""
  if len(lora) == 3:
    rate, keys = lora[2]
    x = dropout_rows(x, keys, rate)
  return dense(dense(x, lora[0]), lora[1])


def lora_dense(x: jax.Array, w: jax.Array, lora: LoraFactors = None) -> jax.Array:
  """x [..., K] @ w [K, N] (+ (x @ A) @ B for lora = (A [K, r], B [r, N][, dropout])) -> [..., N].

  Unmerged: the low-rank path costs 2 r (K + N) FLOPs per row against the matmul's 2 K N, and
  with a frozen W the backward needs no [K, N] weight gradient (a merged W + A @ B would)."""
  y = dense(x, w)
  return y if lora is None else y + _lora_term(x, lora)


def _project(n: jax.Array, w: jax.Array, b: jax.Array | None = None, lora: LoraFactors = None) -> jax.Array:
  # The base layer's output (bias included), then the LoRA term: PEFT's order of the sums.
  y = dense(n, w) if b is None else dense(n, w) + b
  return y if lora is None else y + _lora_term(n, lora)


# The block's two halves begin with "rms_norm, then matmuls" and the MLP ends with "SwiGLU, then a
# matmul". Under plain autodiff each keeps its elementwise intermediates for the backward: the
# norm's x * rsqrt and its weighted output (two [B, S, D] float32 buffers per norm), one flattened
# copy of the normalised activations per matmul that reads them (three for q / k / v, two for
# gate / up: each `dense` reshapes its own), and the SwiGLU product [B, S, mlp]. The layer scan
# stacks every one of them per layer (written in the forward, copied out in the backward). Under
# jax.checkpoint the residuals are the inputs only (x; gate and up) and the backward recomputes the
# elementwise part (one pass); the matmul outputs are not recomputed (nothing in the backward reads
# them). On the benchmark model (benchmarks/forward.py "m30") a layer's residuals fall from ~98 MB
# to ~51 MB.


@functools.partial(jax.checkpoint, static_argnums=(3, 4), prevent_cse=False)
def norm_dense(x: jax.Array, norm_weight: jax.Array, weights: tuple, eps: float, cdt) -> tuple:
  """rms_norm(x) @ w (+ b) (+ the LoRA term) for each (w, b) or (w, b, lora) in weights, from one
  flattened copy of the normalised activations. x [B,S,D]; w [D,N_i]; b [N_i] or None; lora
  (A [D, r], B [r, N_i]) or None (LoraFactors) -> tuple of [B*S, N_i] in cdt."""
  n = rms_norm(x, norm_weight, eps).astype(cdt).reshape(-1, x.shape[-1])
  return tuple(_project(n, *entry) for entry in weights)


def swiglu_dense(gate: jax.Array, up: jax.Array, w_out: jax.Array, constrain=None,
                 lora: LoraFactors = None) -> jax.Array:
  """(silu(gate) * up) @ w_out with the product recomputed in the backward. gate / up [..., mlp],
  w_out [mlp, D] -> [..., D]; constrain: applied to the product (its sharding) or None; lora:
  w_out's LoRA factors (A [mlp, r], B [r, D]) or None."""
  return _swiglu_dense(gate, up, w_out, constrain, lora)


@functools.partial(jax.checkpoint, static_argnums=(3,), prevent_cse=False)
def _swiglu_dense(gate, up, w_out, constrain, lora):
  h = jax.nn.silu(gate) * up
  return lora_dense(h if constrain is None else constrain(h), w_out, lora)


# (k, v) -> (keys, values): how a block's fresh K / V [B,W,KV,hd] become the keys and values its
# queries attend, [B,S,KV,hd] (the KV cache writes them into its cached ones).
KVUpdate = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _lora_factors(ab: Mapping[str, jax.Array], axes: tuple, compute_axes: tuple, scale, cdt) -> LoraFactors:
  """One layer's adapter {"a": [in, r], "b": [r, out]} of a weight with logical axes (in, out) ->
  (A, scale * B) in cdt, laid out like the weight's compute copy (A keeps its input axis, B its
  output axis; FSDP's "embed" gathered). The scale multiplies B before the cast: one rounding."""
  a = sharding.gather_weight(ab["a"], (axes[0], None), (compute_axes[0], None), cdt)
  b = sharding.gather_weight(ab["b"] * scale, (None, axes[1]), (None, compute_axes[1]), cdt)
  return a, b


def block(config, x: jax.Array, p: Mapping[str, jax.Array], cos, sin, key_mask, *,
          param_axes: Mapping[str, tuple], compute_axes: Mapping[str, tuple],
          update_kv: KVUpdate | None = None, lora: Mapping[str, Mapping[str, jax.Array]] | None = None,
          lora_scale: float = 1.0, lora_dropout: tuple | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """One pre-norm block on W positions, for every family.

  x [B,W,D] compute dtype; p this layer's (unstacked) weights, q / k / v biases added when p
  holds them ("q_bias", ...); cos / sin [W, hd] the positions' RoPE tables; key_mask bool [B,S]
  or None; param_axes / compute_axes: the family's logical axes of the stacked block weights and
  of their compute copies; update_kv: None (the window is the whole sequence, S = W: the keys are
  its own) or the KV cache's update (KVUpdate); lora: this layer's LoRA adapters {weight key:
  {"a": [in, r], "b": [r, out]}} (models/lora.py) or None, each targeted matmul adding
  lora_scale * (x @ A) @ B; lora_dropout: (rate, keys [B]) for dropout on the adapters' inputs
  (this layer's keys; each targeted weight folds in its own index) or None. Returns (x [B,W,D],
  this block's fresh (k, v) [B,W,KV,hd] after RoPE, for a cache)."""
  cdt = config.compute_jnp_dtype
  B, S, D = x.shape
  H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
  act = lambda y, *axes: sharding.constrain(y, ("batch", "seq") + axes)
  # FSDP: cast, then gather over the embed axis; the backward reduce-scatters the gradient.
  # (Already in the compute dtype and gathered when the sampler runs from inference weights,
  # rollout.RolloutSampler.inference_params: then this is a no-op.)
  w = {k: sharding.gather_weight(v, param_axes[k][1:], compute_axes[k], cdt)
       for k, v in p.items() if k in compute_axes}
  lw = {k: _lora_factors(ab, param_axes[k][1:], compute_axes[k], lora_scale, cdt) for k, ab in (lora or {}).items()}
  if lora_dropout is not None and lora:
    rate, keys = lora_dropout
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    lw = {k: f + ((rate, fold(keys, i)),) for i, (k, f) in enumerate(sorted(lw.items()))}

  def projections(names: tuple, norm: str) -> tuple:  # rms_norm(x) @ W (+ the family's bias, + LoRA)
    weights = tuple((w[f"{nm}_proj"], w.get(f"{nm}_bias"), lw.get(f"{nm}_proj")) for nm in names)
    return norm_dense(x, p[norm], weights, config.rms_norm_eps, cdt)

  x = act(x, "act_embed")
  q, k, v = projections(("q", "k", "v"), "attn_norm")
  q = act(q.reshape(B, S, H, hd), "act_heads", None)
  k = act(k.reshape(B, S, KV, hd), "act_kv_heads", None)
  v = act(v.reshape(B, S, KV, hd), "act_kv_heads", None)
  q = checkpoint_name(apply_rope(q, cos, sin).astype(cdt), "q")
  k = checkpoint_name(apply_rope(k, cos, sin).astype(cdt), "k")
  v = checkpoint_name(v, "v")
  keys, values = (k, v) if update_kv is None else update_kv(k, v)
  ctx = act(attention.window_attention(config, q, keys, values, key_mask), "act_heads", None)
  ctx = checkpoint_name(ctx.reshape(B, S, H * hd), "attn_ctx")
  x = checkpoint_name(act(x + lora_dense(ctx, w["attn_out"], lw.get("attn_out")).astype(cdt), "act_embed"),
                      "resid_mid")

  gate, up = projections(("ff", "up"), "ff_norm")  # [B*S, mlp]
  gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
  mlp_act = lambda h: act(h.reshape(B, S, -1), "act_mlp")  # noqa: E731  (-> y [B, S, D])
  y = swiglu_dense(gate, up, w["ff_out"], mlp_act, lw.get("ff_out"))
  return act(x + y.astype(cdt), "act_embed"), (k, v)
