"""Bidirectional GQA attention kernels and their selection (`attention_impl`, ATTENTION_IMPLS).

Every kernel takes q [B,T,H,hd] (RoPE applied, compute dtype), k / v [B,S,KV,hd] and a key mask
bool [B,S] (True = a real key) or None, and returns the context [B,T,H,hd] in the compute dtype.
The transformer block (layers.py) reaches them through `attention` (T = S) or `window_attention`
(T <= S: the cached sampler's window of queries over the whole cache).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from bgpo_jax.models import sharding

# "auto": the fastest implementation for the platform (attention_impl_for); "xla": the original
# grouped einsum (kept as the exact reference); "bmm": head-major batched matmuls with a
# hand-written backward (the CPU default); "jax": jax.nn.dot_product_attention's XLA path;
# "cudnn": its cuDNN flash kernel (GPU, bf16/fp16); "splash": Pallas splash attention (TPU).
ATTENTION_IMPLS = ("auto", "xla", "bmm", "jax", "cudnn", "splash")


def attention_impl_for(config, platform: str | None = None) -> str:
  """The attention implementation `config.attention_impl` resolves to on `platform` ("cpu",
  "tpu", "cuda", "rocm"; "gpu" means CUDA; default: the default backend's). auto: TPU ->
  "splash" (Pallas kernel), CUDA GPU with bf16/fp16 compute -> "cudnn" (flash), anything else
  -> "bmm" (batched matmuls: float32 cuDNN flash does not exist, and ROCm has no cuDNN)."""
  impl = config.attention_impl
  if impl != "auto":
    return impl
  platform = platform or _default_platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda") and config.compute_dtype != "float32":
    return "cudnn"
  return "bmm"


def _default_platform() -> str:
  """jax.default_backend(), with a GPU told apart as "cuda" or "rocm" (both report "gpu")."""
  backend = jax.default_backend()
  if backend == "gpu":
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return backend


def attention(config, q: jax.Array, k: jax.Array, v: jax.Array,
              key_mask: jax.Array | None) -> jax.Array:
  """Bidirectional GQA attention (config.attention_impl): q [B,S,H,hd], k/v [B,S,KV,hd], key_mask
  bool [B,S] or None -> context [B,S,H,hd] (compute dtype)."""
  cdt = config.compute_jnp_dtype
  B, S, H, hd = q.shape
  KV = k.shape[2]
  scale = 1.0 / math.sqrt(hd)
  impl = attention_impl_for(config)
  if impl == "bmm":
    return _bmm_attention(q, k, v, key_mask, scale)
  if impl == "splash":
    return _splash_attention(q, k, v, key_mask, scale).astype(cdt)
  if impl == "cudnn":
    return _key_length_attention(q, k, v, key_mask, scale, "cudnn")
  if impl == "jax":
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
  G = H // KV
  qg = q.reshape(B, S, KV, G, hd)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
  scores = sharding.constrain(scores, ("batch", "act_kv_heads", None, None, None))
  if key_mask is not None:
    # A finite fill (not -inf) keeps rows whose keys are all padding finite (uniform softmax).
    scores = jnp.where(key_mask[:, None, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
  ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return ctx.reshape(B, S, H, hd).astype(cdt)


def window_attention(config, q: jax.Array, k: jax.Array, v: jax.Array,
                     key_mask: jax.Array | None) -> jax.Array:
  """q [B,W,H,hd] over keys k / v [B,S,KV,hd], key_mask bool [B,S] -> context [B,W,H,hd].

  `attention` (config.attention_impl, W <= S is fine for every implementation) except Pallas
  splash, whose kernel is built for square [S, S] masks: a shorter window runs
  jax.nn.dot_product_attention's XLA path instead."""
  if q.shape[1] != k.shape[1] and attention_impl_for(config) == "splash":
    config = dataclasses.replace(config, attention_impl="jax")
  return attention(config, q, k, v, key_mask)


# --- "bmm": attention as plain batched matmuls in a head-major layout.
# Query head h reads kv head h // G, so the G query heads of one kv head are stacked along the
# query axis: q [B, KV, G*S, hd] x k [B, KV, S, hd] is one batched matmul per kv head (no 5-D
# grouped einsum, no k/v repeat). The backward is written out (dV = P^T dO, dP = dO V^T,
# dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q): XLA's autodiff of softmax + where
# costs several extra [.., S, S] passes and transposes that dominate the CPU backward.
# As in flash attention, the forward keeps only the row max and 1 / row sum ([.., G*S, 1]) and
# the backward recomputes P (one more q k^T matmul): saving P itself meant a float32
# [B, H, S, S] residual per layer, which the layer scan stacks into a zero-initialised
# [L, B, H, S, S] buffer (268 MB for benchmarks/forward.py's "m30" model) written in the forward
# and read back.


def _bmm_scores(qh: jax.Array, kh: jax.Array, mask4: jax.Array | None) -> jax.Array:
  """qh [B,KV,GS,hd] (pre-scaled), kh [B,KV,S,hd], mask4 bool [B,1,1,S] -> masked scores f32."""
  s = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
  s = sharding.constrain(s, ("batch", "act_kv_heads", None, None))
  if mask4 is not None:
    # A finite fill (not -inf) keeps rows whose keys are all padding finite (uniform softmax).
    # (A where, not an additive bias: on XLA:CPU the bias lets the score matmul, softmax and
    # PV matmul fuse into one YNNPACK graph that runs 30% slower than the three apart.)
    s = jnp.where(mask4, s, jnp.finfo(jnp.float32).min)
  return s


def _bmm_core_fwd(qh, kh, vh, mask4):
  s = _bmm_scores(qh, kh, mask4)
  mx = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - mx)
  inv = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
  # (Normalising after the PV product, on [.., GS, hd], is 25% slower on XLA:CPU: fusion.)
  o = jnp.einsum("bkqs,bksd->bkqd", (e * inv).astype(vh.dtype), vh,
                 preferred_element_type=jnp.float32).astype(qh.dtype)
  # The row max and 1 / sum, not their log-sum-exp: for a row whose keys are all padding
  # (every score float32 min) min + log(S) rounds back to min and exp(s - lse) would be 1, not 1/S.
  # (Named for remat_policy="activations": saved, the backward needs no attention forward.)
  o = checkpoint_name(o, "attn_out")
  mx, inv = checkpoint_name(mx, "attn_max"), checkpoint_name(inv, "attn_inv_sum")
  return o, (qh, kh, vh, mask4, mx, inv, o)  # o is the output itself: no extra residual memory


@jax.custom_vjp
def _bmm_core(qh, kh, vh, mask4):
  return _bmm_core_fwd(qh, kh, vh, mask4)[0]


def _bmm_core_bwd(res, do):
  # Written key-major: S^T = K Q^T is recomputed, so P^T, dP^T = V dO^T and dS^T come out of
  # plain matmuls and dV = P^T dO, dK = dS^T Q read them row-major; only dQ = dS K contracts a
  # transposed operand. (Query-major, both dV and dK did: XLA:CPU runs those as strided Eigen
  # dots at half the YNNPACK rate, 17% of the attention's forward + backward.)
  qh, kh, vh, mask4, mx, inv, o = res
  cdt = qh.dtype
  f32 = jnp.float32
  tr = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731  [.., GS, 1] -> [.., 1, GS] etc.
  sT = jnp.einsum("bksd,bkqd->bksq", kh, qh, preferred_element_type=f32)
  sT = sharding.constrain(sT, ("batch", "act_kv_heads", None, None))
  if mask4 is not None:
    sT = jnp.where(tr(mask4), sT, jnp.finfo(f32).min)
  pT = jnp.exp(sT - tr(mx)) * tr(inv)  # the forward's probabilities, transposed
  dv = jnp.einsum("bksq,bkqd->bksd", pT.astype(cdt), do, preferred_element_type=f32)
  dpT = jnp.einsum("bksd,bkqd->bksq", vh, do, preferred_element_type=f32)
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
  dsT = pT * (dpT - tr(delta))
  if mask4 is not None:  # the where's gradient: masked scores get none (matters for all-pad rows)
    dsT = jnp.where(tr(mask4), dsT, 0.0)
  dsT = dsT.astype(cdt)
  dk = jnp.einsum("bksq,bkqd->bksd", dsT, qh, preferred_element_type=f32)
  dq = jnp.einsum("bksq,bksd->bkqd", dsT, kh, preferred_element_type=f32)
  return dq.astype(cdt), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_bmm_core.defvjp(_bmm_core_fwd, _bmm_core_bwd)


# Score elements per step of _bmm_looped: 2^18 float32 = 1 MB, one core's L2 on the 2-core
# EPYC this was tuned on (1 MB steps ran the forward 1.7x and forward + backward 1.2x faster than
# one [B, KV, G*S, S] pass; 4 MB steps were as slow as no loop in the backward).
_BMM_STEP_ELEMENTS = 2**18


def _bmm_looped(qh, kh, vh, mask4):
  """_bmm_core over groups of (row, kv head) pairs at a time (lax.map), each group's scores about
  _BMM_STEP_ELEMENTS: the same numbers, but the [.., G*S, S] scores / probabilities stay in the
  CPU's cache through the softmax passes instead of streaming through memory. Small problems
  (the demo's 64 tokens) fit in one group and run unlooped."""
  B, KV, GS, hd = qh.shape
  S = kh.shape[2]
  rows = B * KV
  per = max(1, min(rows, _BMM_STEP_ELEMENTS // (GS * S)))
  while rows % per:  # the largest divisor of rows not above the target
    per -= 1
  if per == rows:
    return _bmm_core(qh, kh, vh, mask4)
  split = lambda a: a.reshape(rows // per, per, 1, *a.shape[2:])  # noqa: E731
  xs = (split(qh), split(kh), split(vh))
  if mask4 is None:
    o = jax.lax.map(lambda t: _bmm_core(*t, None), xs)
  else:
    m = split(jnp.broadcast_to(mask4, (B, KV, 1, S)))
    o = jax.lax.map(lambda t: _bmm_core(*t), xs + (m,))
  return o.reshape(qh.shape)


def _bmm_attention(q, k, v, key_mask, scale):
  """Same contract as `attention` (q already in the compute dtype), head-major batched matmuls."""
  B, S, H, hd = q.shape
  KV = k.shape[2]
  G = H // KV
  axes = ("batch", "act_kv_heads", None, None)
  # The softmax scale goes on q ([.., hd] instead of [.., S, S]; exact when hd is a power of 4).
  qh = sharding.constrain(jnp.transpose((q * scale).astype(q.dtype).reshape(B, S, KV, G, hd),
                                        (0, 2, 3, 1, 4)).reshape(B, KV, G * S, hd), axes)
  kh = sharding.constrain(jnp.transpose(k, (0, 2, 1, 3)), axes)
  vh = sharding.constrain(jnp.transpose(v, (0, 2, 1, 3)), axes)
  mask4 = None if key_mask is None else key_mask[:, None, None, :]
  if sharding.context_mesh_axes() or jax.default_backend() != "cpu":
    # Under a mesh the batch and heads are sharded: a loop over them would gather them. The loop
    # is for a CPU's caches; a GPU / TPU wants the whole batched matmul at once.
    o = _bmm_core(qh, kh, vh, mask4)  # [B, KV, G*S, hd]
  else:
    o = _bmm_looped(qh, kh, vh, mask4)
  return jnp.transpose(o.reshape(B, KV, G, S, hd), (0, 3, 1, 2, 4)).reshape(B, S, H, hd)


def _key_length_attention(q, k, v, key_mask, scale, implementation):
  """jax.nn.dot_product_attention with the key padding given as per-row key counts (cuDNN's
  kv_seqlen). A bool mask would reach cuDNN as a [B, 1, 1, S] additive bias, which it refuses
  (its bias must be [B, 1, T, S]), and a full bias would cost a [B, 1, T, S] tensor and its
  gradient in every layer. Attention treats its keys as a set (RoPE is already in q and k), so
  each row's real keys are moved first (a stable sort) and the rest is trailing padding: any
  key mask, left padding included, with the same result. A row with no real key attends all S
  keys (a finite context where the einsum path's is uniform). q [B,T,H,hd], k / v [B,S,KV,hd]."""
  if key_mask is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  S = k.shape[1]
  order = jnp.argsort(~key_mask, axis=1, stable=True)[:, :, None, None]  # real keys (False) first
  k, v = jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1)
  n = jnp.sum(key_mask, axis=1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=jnp.where(n > 0, n, S),
                                      implementation=implementation)


# None: interpret the splash kernel (Pallas' CPU emulation) unless the default backend is a TPU.
# Tests set False to lower the real Mosaic kernel for a TPU from a CPU host
# (`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`).
SPLASH_INTERPRET: bool | None = None
_SPLASH_BLOCK = 128  # the kernel's default block sizes: the sequence must be a multiple


def _splash_attention(q, k, v, key_mask, scale):
  """Pallas splash attention (TPU): key padding via segment ids (queries 1, keys = the mask),
  so every query attends the real keys only. The kernel's blocks are 128 positions: a sequence
  of another length (a 64-token prompt bucket + 256 generated) is padded up to the next multiple
  with masked keys, and the padded queries' rows are dropped.
  A row whose keys are all padding gives an undefined (zero / NaN-free) context, not uniform.

  Under a mesh the kernel runs in a shard_map, each device on its own rows (and heads, when both
  q and kv heads divide the tensor axis): a Mosaic kernel cannot be partitioned by XLA, and
  lowering it for more than one device fails ("Mosaic kernels cannot be automatically
  partitioned")."""
  B, S, H, hd = q.shape
  KV = k.shape[2]
  qh = jnp.transpose(q * jnp.asarray(scale, q.dtype), (0, 2, 1, 3))  # [B, H, S, hd]
  kh = jnp.transpose(k, (0, 2, 1, 3))
  vh = jnp.transpose(v, (0, 2, 1, 3))
  seg = None if key_mask is None else key_mask.astype(jnp.int32)
  pad = -S % _SPLASH_BLOCK
  if pad:
    qh, kh, vh = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (qh, kh, vh))
    seg = jnp.pad(jnp.ones((B, S), jnp.int32) if seg is None else seg, ((0, 0), (0, pad)))
  if not sharding.context_mesh_axes():
    out = _splash_local(qh, kh, vh, seg)
  else:
    rows = sharding.context_spec(("batch",), (B,))[0]
    heads = sharding.context_spec(("act_heads",), (H,))[0]
    if heads is not None and sharding.context_spec(("act_kv_heads",), (KV,))[0] != heads:
      heads = None  # kv heads not split alike: the kernel's q -> kv head map needs both local
    spec = PartitionSpec(rows, heads, None, None)
    in_specs = (spec, spec, spec, None if seg is None else PartitionSpec(rows, None))
    out = jax.shard_map(_splash_local, in_specs=in_specs, out_specs=spec, check_vma=False)(qh, kh, vh, seg)
  return jnp.transpose(out[:, :, :S], (0, 2, 1, 3))


def _splash_local(qh, kh, vh, seg):
  """The splash kernel over one device's rows: qh [b, h, S, hd], kh / vh [b, kv, S, hd], seg int32
  [b, S] (1 = real key) or None -> [b, h, S, hd]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  _, H, S, _ = qh.shape
  interpret = jax.default_backend() != "tpu" if SPLASH_INTERPRET is None else SPLASH_INTERPRET
  # residual_checkpoint_name: the kernel's output and log-sum-exp (its backward's residuals) carry
  # "attn_out", so remat_policy="activations" saves them and the backward runs no forward kernel.
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((S, S)) for _ in range(H)]),
                              head_shards=1, q_seq_shards=1, residual_checkpoint_name="attn_out",
                              interpret=interpret)
  if seg is None:
    return jax.vmap(kernel)(qh, kh, vh)
  ids = sk.SegmentIds(q=jnp.ones_like(seg), kv=seg)
  return jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
