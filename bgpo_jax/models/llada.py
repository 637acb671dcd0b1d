"""LLaDA: the bidirectional Llama-style Transformer behind masked diffusion LMs (SPEC section 1).

Pure functions over an explicit nested-dict parameter tree. The n_layers blocks are stacked
along a leading layer axis and the forward runs `jax.lax.scan` over them, so an 8B model
compiles as fast as a 1-layer one.

Parameter tree (ours <- Hugging Face tensor name; HF Linear weights are [out, in], ours [in, out]):

  params["wte"]                    [embedding_size, d_model]  <- model.transformer.wte.weight
  params["blocks"]["attn_norm"]    [L, d_model]               <- ...blocks.{i}.attn_norm.weight
  params["blocks"]["q_proj"]       [L, d_model, H*hd]         <- ...blocks.{i}.q_proj.weight.T
  params["blocks"]["k_proj"]       [L, d_model, KV*hd]        <- ...blocks.{i}.k_proj.weight.T
  params["blocks"]["v_proj"]       [L, d_model, KV*hd]        <- ...blocks.{i}.v_proj.weight.T
  params["blocks"]["attn_out"]     [L, H*hd, d_model]         <- ...blocks.{i}.attn_out.weight.T
  params["blocks"]["ff_norm"]      [L, d_model]               <- ...blocks.{i}.ff_norm.weight
  params["blocks"]["ff_proj"]      [L, d_model, mlp]          <- ...blocks.{i}.ff_proj.weight.T (gate)
  params["blocks"]["up_proj"]      [L, d_model, mlp]          <- ...blocks.{i}.up_proj.weight.T
  params["blocks"]["ff_out"]       [L, mlp, d_model]          <- ...blocks.{i}.ff_out.weight.T
  params["ln_f"]                   [d_model]                  <- model.transformer.ln_f.weight
  params["ff_out"]                 [d_model, embedding_size]  <- model.transformer.ff_out.weight.T (head)

Precision: params are stored in `param_dtype` and cast to `compute_dtype` for the matmuls;
RMSNorm, RoPE and softmax run in float32; logits are float32.

Sharding: under a context mesh (`jax.set_mesh`, or the train step's abstract mesh) the forward
pins the FSDP layout with `sharding.constrain`: activations are split over the batch
("data", "fsdp") and, with tensor parallelism, over heads / MLP / vocab ("tensor"); each layer's
weights are cast to the compute dtype and gathered over their "embed" (FSDP) axis right before
use, so the backward reduce-scatters their gradients. The vocab head is vocab-parallel over
("tensor", "fsdp") instead (a [D, V] gather would cost 1 GB per device for LLaDA). Without a mesh
(or on one device) every constraint is a no-op and the program is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from bgpo_jax.models import sharding

Params = dict[str, Any]

# HF config keys whose value we must reject when it differs from LLaDA's (key -> allowed values).
_UNSUPPORTED_HF = {
  "alibi": (False, None),
  "weight_tying": (False, None),
  "include_bias": (False, None),
  "include_qkv_bias": (False, None),
  "bias_for_layer_norm": (False, None),
  "layer_norm_type": ("rms", "rms_norm", "rmsnorm"),
  "layer_norm_with_affine": (True, None),
  "activation_type": ("silu", "swiglu"),
  "block_type": ("llama",),
  "rope": (True, None),
  "attention_layer_norm": (False, None),
  "input_emb_norm": (False, None),
  "scale_logits": (False, None),
  "block_group_size": (1, None),
  "multi_query_attention": (False, None),
  "clip_qkv": (None,),
}

# A complete LLaDA config.json (as shipped with LLaDA-8B-Instruct); to_hf_dict starts from it so
# that an exported checkpoint loads in the reference PyTorch code too.
_HF_TEMPLATE: dict[str, Any] = {
  "activation_type": "silu",
  "alibi": False,
  "alibi_bias_max": 8.0,
  "architectures": ["LLaDAModelLM"],
  "attention_dropout": 0.0,
  "attention_layer_norm": False,
  "attention_layer_norm_with_affine": True,
  "auto_map": {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
  },
  "bias_for_layer_norm": False,
  "block_group_size": 1,
  "block_type": "llama",
  "embedding_dropout": 0.0,
  "flash_attention": False,
  "include_bias": False,
  "include_qkv_bias": False,
  "init_cutoff_factor": None,
  "init_device": "meta",
  "init_fn": "mitchell",
  "init_std": 0.02,
  "input_emb_norm": False,
  "layer_norm_type": "rms",
  "layer_norm_with_affine": True,
  "model_type": "llada",
  "multi_query_attention": None,
  "precision": "amp_bf16",
  "residual_dropout": 0.0,
  "rope": True,
  "rope_full_precision": True,
  "scale_logits": False,
  "use_cache": False,
  "weight_tying": False,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Remat policy names -> jax.checkpoint policy (None = save nothing, i.e. full recompute).
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


_REMAT_POLICIES = {
  "full": None,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
  # Keeps q, k, v and the attention context (small: [B,S,D] each), recomputes the MLP.
  "save_attn": jax.checkpoint_policies.save_only_these_names(*_SAVE_ATTN_NAMES),
  # Keeps every activation the block's backward reads and recomputes no matmul: only the norms'
  # and SwiGLU's elementwise work and (under FSDP) the weight gathers, which are not saved (a
  # layer's gathered bf16 weights are 436 MB on LLaDA-8B). See ACTIVATION_NAMES.
  "activations": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(*ACTIVATION_NAMES), _save_fused_attention_forward),
}
REMAT_POLICIES = ("none",) + tuple(_REMAT_POLICIES)
# "auto": the fastest implementation for the platform (attention_impl_for); "xla": the original
# grouped einsum (kept as the exact reference); "bmm": head-major batched matmuls with a
# hand-written backward (the CPU default); "jax": jax.nn.dot_product_attention's XLA path;
# "cudnn": its cuDNN flash kernel (GPU, bf16/fp16); "splash": Pallas splash attention (TPU).
ATTENTION_IMPLS = ("auto", "xla", "bmm", "jax", "cudnn", "splash")


def read_hf_config(path_or_dict) -> dict[str, Any]:
  """A Hugging Face config as a dict: given a dict, a config.json path or a checkpoint directory
  (local or any etils.epath URI such as gs://)."""
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  from etils import epath
  p = epath.Path(os.fspath(path_or_dict))
  if p.is_dir():
    p = p / "config.json"
  return json.loads(p.read_text())


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
  """Architecture (Hugging Face key names) plus our precision / memory knobs. Frozen and hashable.

  `hf_extra` keeps the original HF config's other keys (as sorted (key, json) pairs) so that
  `to_hf_dict` can write them back; it takes no part in equality or hashing.
  """

  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  mlp_hidden_size: int = 12288
  vocab_size: int = 126464
  embedding_size: int = 126464
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  max_sequence_length: int = 4096
  mask_token_id: int = 126336
  eos_token_id: int = 126081
  pad_token_id: int = 126081
  # ours
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat_policy: str = "none"
  # Layers per iteration of the layer scan: >1 lets XLA fuse across layers (CPU/small models
  # run 15% faster fully unrolled); 1 keeps one layer's code and compile time for big models.
  scan_unroll: int = 1
  attention_impl: str = "auto"  # see ATTENTION_IMPLS; auto = attention_impl_for(platform)
  # Response positions per chunk of the vocabulary head + log_softmax in the ELBO / d1 log-probs
  # (diffusion.elbo.response_token_logps); 0 = one block. Chunks run under jax.checkpoint, so
  # only one [rows, chunk, vocab] float32 block is alive in the forward and the backward.
  logits_chunk: int = 0
  init_std: float = 0.02
  hf_extra: tuple = dataclasses.field(default=(), compare=False, repr=False)

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError(f"head_dim {self.d_model // self.n_heads} must be even for RoPE")
    if self.embedding_size < self.vocab_size:
      raise ValueError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.scan_unroll < 1:  # values >= n_layers all mean "fully unrolled"
      raise ValueError(f"scan_unroll {self.scan_unroll} must be >= 1 (n_layers or more = fully unrolled)")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk {self.logits_chunk} must be >= 0 (0 = no chunking)")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        raise ValueError(f"{name} {v} is outside the vocabulary [0, {self.vocab_size})")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def param_jnp_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def compute_jnp_dtype(self):
    return _DTYPES[self.compute_dtype]

  def num_params(self, embeddings: bool = True) -> int:
    """Parameter count (input embedding and head included unless embeddings=False)."""
    d, hd = self.d_model, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    block = attn + 3 * d * self.mlp_hidden_size + 2 * d
    n = self.n_layers * block + d
    if embeddings:
      n += 2 * self.embedding_size * d
    return n

  # ---------------------------------------------------------------------------------------------
  @classmethod
  def preset(cls, name: str, **overrides) -> "LLaDAConfig":
    """Named configs: "tiny" (~1M params, vocab 128 = CharTokenizer ids), "small" (d 768,
    12 layers, 12 heads, MLP 2048, vocab 32000: 134M params, 85M without embeddings; special ids
    = CharTokenizer's, so it also runs on char data), "llada_8b" (LLaDA-8B exactly, bfloat16,
    logits_chunk 64)."""
    # CharTokenizer special ids (bgpo_jax/tokenizer.py): eos = pad = 0, mask = 2.
    char_ids = dict(mask_token_id=2, eos_token_id=0, pad_token_id=0)
    presets = {
      "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=512,
                   vocab_size=128, embedding_size=128, rope_theta=10000.0,
                   max_sequence_length=512, **char_ids),
      "small": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, mlp_hidden_size=2048,
                    vocab_size=32000, embedding_size=32000, rope_theta=10000.0,
                    max_sequence_length=2048, **char_ids),
      # logits_chunk: the 126k-vocabulary head in chunks of 64 positions (see LLaDAConfig).
      "llada_8b": dict(param_dtype="bfloat16", compute_dtype="bfloat16", logits_chunk=64),
    }
    if name not in presets:
      raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return cls(**{**presets[name], **overrides})

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "LLaDAConfig":
    """Reads a LLaDA HF config (a dict, a config.json path, or a checkpoint dir).

    param_dtype and compute_dtype follow `torch_dtype` (bfloat16 or float32) unless overridden.
    Raises ValueError naming every architecture feature we do not implement.
    """
    hf = read_hf_config(path_or_dict)
    bad = []
    for key, allowed in _UNSUPPORTED_HF.items():
      if key in hf and hf[key] not in allowed:
        bad.append(f"{key}={hf[key]!r} (supported: {allowed[0]!r})")
    if bad:
      raise ValueError("unsupported LLaDA config features: " + ", ".join(bad))
    d = int(hf["d_model"])
    n_heads = int(hf["n_heads"])
    mlp = hf.get("mlp_hidden_size") or int(hf.get("mlp_ratio", 4) * d)
    vocab = int(hf["vocab_size"])
    torch_dtype = hf.get("torch_dtype") or "float32"
    dtype = torch_dtype if torch_dtype in ("bfloat16", "float32") else "float32"
    ours = dict(
      d_model=d,
      n_layers=int(hf["n_layers"]),
      n_heads=n_heads,
      n_kv_heads=int(hf.get("n_kv_heads") or n_heads),
      mlp_hidden_size=int(mlp),
      vocab_size=vocab,
      embedding_size=int(hf.get("embedding_size") or vocab),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      max_sequence_length=int(hf.get("max_sequence_length", 4096)),
      mask_token_id=int(hf.get("mask_token_id", 126336)),
      eos_token_id=int(hf.get("eos_token_id", 126081)),
      pad_token_id=int(hf.get("pad_token_id", hf.get("eos_token_id", 126081))),
      param_dtype=dtype,
      compute_dtype=dtype,
    )
    known = set(ours) | {"torch_dtype", "mlp_ratio"}
    extra = tuple(sorted((k, json.dumps(v)) for k, v in hf.items() if k not in known))
    ours.update(overrides)
    return cls(**ours, hf_extra=extra)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict: LLaDA's defaults, then the original extra keys, then our values."""
    out = dict(_HF_TEMPLATE)
    out.update({k: json.loads(v) for k, v in self.hf_extra})
    out.update(
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      n_kv_heads=self.n_kv_heads,
      mlp_hidden_size=self.mlp_hidden_size,
      mlp_ratio=max(1, self.mlp_hidden_size // self.d_model),
      vocab_size=self.vocab_size,
      embedding_size=self.embedding_size,
      rope_theta=self.rope_theta,
      rms_norm_eps=self.rms_norm_eps,
      max_sequence_length=self.max_sequence_length,
      mask_token_id=self.mask_token_id,
      eos_token_id=self.eos_token_id,
      pad_token_id=self.pad_token_id,
      torch_dtype=self.param_dtype,
    )
    return dict(sorted(out.items()))


# -----------------------------------------------------------------------------------------------
# Parameters


def param_shapes(config: LLaDAConfig) -> dict[str, Any]:
  """Shapes of every parameter, same tree as init_params."""
  c = config
  L, D, hd, M, E = c.n_layers, c.d_model, c.head_dim, c.mlp_hidden_size, c.embedding_size
  return {
    "wte": (E, D),
    "blocks": {
      "attn_norm": (L, D),
      "q_proj": (L, D, c.n_heads * hd),
      "k_proj": (L, D, c.n_kv_heads * hd),
      "v_proj": (L, D, c.n_kv_heads * hd),
      "attn_out": (L, c.n_heads * hd, D),
      "ff_norm": (L, D),
      "ff_proj": (L, D, M),
      "up_proj": (L, D, M),
      "ff_out": (L, M, D),
    },
    "ln_f": (D,),
    "ff_out": (D, E),
  }


def param_logical_axes(config: LLaDAConfig) -> dict[str, Any]:
  """Logical axis names per parameter dimension (same tree as init_params)."""
  del config
  return {
    "wte": ("vocab", "embed"),
    "blocks": {
      "attn_norm": ("layers", "norm"),
      "q_proj": ("layers", "embed", "heads"),
      "k_proj": ("layers", "embed", "kv_heads"),
      "v_proj": ("layers", "embed", "kv_heads"),
      "attn_out": ("layers", "heads", "embed"),
      "ff_norm": ("layers", "norm"),
      "ff_proj": ("layers", "embed", "mlp"),
      "up_proj": ("layers", "embed", "mlp"),
      "ff_out": ("layers", "mlp", "embed"),
    },
    "ln_f": ("norm",),
    "ff_out": ("embed", "vocab"),
  }


def compute_weight_axes(config: LLaDAConfig) -> dict[str, tuple]:
  """Logical axes of one layer's weight matrices as used by the matmuls: the stacked "layers"
  axis dropped and "embed" (the FSDP axis) gathered, heads / MLP keep their tensor sharding."""
  blocks = param_logical_axes(config)["blocks"]
  return {k: tuple(None if a == "embed" else a for a in axes[1:])
          for k, axes in blocks.items() if not k.endswith("_norm")}


def _lead_axes(ndim: int, first: str | None, last: str | None) -> tuple:
  """Logical axes of an activation [batch, ..., last]: (first, None, ..., last)."""
  return (first,) + (None,) * (ndim - 2) + (last,) if ndim >= 2 else (last,)


def _is_norm(path: tuple) -> bool:
  return path[-1] in ("attn_norm", "ff_norm", "ln_f")


def init_params(config: LLaDAConfig, rng: jax.Array) -> Params:
  """Random init: weights ~ N(0, init_std^2) in param_dtype, RMSNorm weights = 1.

  Jitted internally (one compile instead of one per eager op); also usable under jit /
  eval_shape, e.g. jax.jit(partial(init_params, config), out_shardings=...)(rng).
  """
  return _init_params_jit(config, rng)


_FLAT_INIT_MAX = 2**27


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(config: LLaDAConfig, rng: jax.Array) -> Params:
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  dtype = config.param_jnp_dtype
  names = [tuple(getattr(p, "key", p) for p in path) for path, _ in leaves]
  sizes = [0 if _is_norm(n) else math.prod(shape) for n, (_, shape) in zip(names, leaves)]
  # One normal draw for all weights of a small model: every threefry call costs ~1 s of XLA CPU
  # compile time. Large models draw per leaf so the float32 temporary stays one leaf.
  flat = None
  if sum(sizes) <= _FLAT_INIT_MAX:
    flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  keys = jax.random.split(rng, len(leaves))
  out, start = [], 0
  for n, (_, shape), size, key in zip(names, leaves, sizes, keys):
    if _is_norm(n):
      out.append(jnp.ones(shape, dtype))
      continue
    if flat is not None:
      w = flat[start:start + size].reshape(shape)
      start += size
    else:
      w = jax.random.normal(key, shape, jnp.float32)
    out.append((config.init_std * w).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


# -----------------------------------------------------------------------------------------------
# Forward


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


def attention_impl_for(config: LLaDAConfig, platform: str | None = None) -> str:
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


def _attention(config: LLaDAConfig, q: jax.Array, k: jax.Array, v: jax.Array,
               key_mask: jax.Array | None) -> jax.Array:
  """q [B,S,H,hd], k/v [B,S,KV,hd], key_mask bool [B,S] -> context [B,S,H,hd] (compute dtype)."""
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


def attention(config, q: jax.Array, k: jax.Array, v: jax.Array,
              key_mask: jax.Array | None) -> jax.Array:
  """Bidirectional GQA attention (config.attention_impl), the public entry for other families
  (dream.py): q [B,S,H,hd], k/v [B,S,KV,hd], key_mask bool [B,S] or None -> [B,S,H,hd]."""
  return _attention(config, q, k, v, key_mask)


# --- "bmm": attention as plain batched matmuls in a head-major layout.
# Query head h reads kv head h // G, so the G query heads of one kv head are stacked along the
# query axis: q [B, KV, G*S, hd] x k [B, KV, S, hd] is one batched matmul per kv head (no 5-D
# grouped einsum, no k/v repeat). The backward is written out (dV = P^T dO, dP = dO V^T,
# dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q): XLA's autodiff of softmax + where
# costs several extra [.., S, S] passes and transposes that dominate the CPU backward.
# As in flash attention, the forward keeps only the row max and 1 / row sum ([.., G*S, 1]) and
# the backward recomputes P (one more q k^T matmul): saving P itself meant a float32
# [B, H, S, S] residual per layer, which the layer scan stacks into a zero-initialised
# [L, B, H, S, S] buffer (268 MB for the issue-15 model) written in the forward and read back.


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
  """Same contract as _attention (q already in the compute dtype), head-major batched matmuls."""
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


# The block's two halves begin with "rms_norm, then matmuls" and the MLP ends with "SwiGLU, then a
# matmul". Under plain autodiff each keeps its elementwise intermediates for the backward: the
# norm's x * rsqrt and its weighted output (two [B, S, D] float32 buffers per norm), one flattened
# copy of the normalised activations per matmul that reads them (three for q / k / v, two for
# gate / up: each `dense` reshapes its own), and the SwiGLU product [B, S, mlp]. The layer scan
# stacks every one of them per layer (written in the forward, copied out in the backward). Under
# jax.checkpoint the residuals are the inputs only (x; gate and up) and the backward recomputes the
# elementwise part (one pass); the matmul outputs are not recomputed (nothing in the backward reads
# them). On the issue-15 model a layer's residuals fall from ~98 MB to ~51 MB.


@functools.partial(jax.checkpoint, static_argnums=(3, 4), prevent_cse=False)
def norm_dense(x: jax.Array, norm_weight: jax.Array, weights: tuple, eps: float, cdt) -> tuple:
  """rms_norm(x) @ w (+ b) for each (w, b) in weights, from one flattened copy of the normalised
  activations. x [B,S,D]; w [D,N_i]; b [N_i] or None -> tuple of [B*S, N_i] in cdt."""
  n = rms_norm(x, norm_weight, eps).astype(cdt).reshape(-1, x.shape[-1])
  return tuple(dense(n, w) if b is None else dense(n, w) + b for w, b in weights)


def swiglu_dense(gate: jax.Array, up: jax.Array, w_out: jax.Array, constrain=None) -> jax.Array:
  """(silu(gate) * up) @ w_out with the product recomputed in the backward. gate / up [..., mlp],
  w_out [mlp, D] -> [..., D]; constrain: applied to the product (its sharding) or None."""
  return _swiglu_dense(gate, up, w_out, constrain)


@functools.partial(jax.checkpoint, static_argnums=(3,), prevent_cse=False)
def _swiglu_dense(gate, up, w_out, constrain):
  h = jax.nn.silu(gate) * up
  return dense(h if constrain is None else constrain(h), w_out)


def _block(config: LLaDAConfig, x: jax.Array, p: Mapping[str, jax.Array], cos, sin,
           key_mask) -> jax.Array:
  """One pre-norm block. x [B,S,D] compute dtype; p holds this layer's (unstacked) weights."""
  return block(config, x, p, cos, sin, key_mask, param_axes=param_logical_axes(config)["blocks"],
               compute_axes=compute_weight_axes(config))


def block(config, x: jax.Array, p: Mapping[str, jax.Array], cos, sin, key_mask, *,
          param_axes: Mapping[str, tuple], compute_axes: Mapping[str, tuple]) -> jax.Array:
  """One pre-norm block for any family with this layout (dream.py: the same block plus q / k / v
  biases, added when p holds them). x [B,S,D] compute dtype; p this layer's (unstacked) weights;
  param_axes / compute_axes: the family's logical axes of the stacked block weights and of their
  compute copies."""
  cdt = config.compute_jnp_dtype
  B, S, D = x.shape
  H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
  act = lambda y, *axes: sharding.constrain(y, ("batch", "seq") + axes)
  # FSDP: cast, then gather over the embed axis; the backward reduce-scatters the gradient.
  w = {k: sharding.gather_weight(v, param_axes[k][1:], compute_axes[k], cdt)
       for k, v in p.items() if k in compute_axes}

  def projections(names: tuple, norm: str) -> tuple:  # rms_norm(x) @ W (+ the family's bias)
    weights = tuple((w[f"{nm}_proj"], w.get(f"{nm}_bias")) for nm in names)
    return norm_dense(x, p[norm], weights, config.rms_norm_eps, cdt)

  x = act(x, "act_embed")
  q, k, v = projections(("q", "k", "v"), "attn_norm")
  q = act(q.reshape(B, S, H, hd), "act_heads", None)
  k = act(k.reshape(B, S, KV, hd), "act_kv_heads", None)
  v = act(v.reshape(B, S, KV, hd), "act_kv_heads", None)
  q = checkpoint_name(apply_rope(q, cos, sin).astype(cdt), "q")
  k = checkpoint_name(apply_rope(k, cos, sin).astype(cdt), "k")
  v = checkpoint_name(v, "v")
  ctx = act(_attention(config, q, k, v, key_mask), "act_heads", None)
  ctx = checkpoint_name(ctx.reshape(B, S, H * hd), "attn_ctx")
  x = checkpoint_name(act(x + dense(ctx, w["attn_out"]).astype(cdt), "act_embed"), "resid_mid")

  gate, up = projections(("ff", "up"), "ff_norm")  # [B*S, mlp]
  gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
  mlp_act = lambda h: act(h.reshape(B, S, -1), "act_mlp")  # noqa: E731  (-> y [B, S, D])
  y = swiglu_dense(gate, up, w["ff_out"], mlp_act)
  return act(x + y.astype(cdt), "act_embed")


def hidden_states(config: LLaDAConfig, params: Params, tokens: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
  """tokens int32 [B,S], attention_mask [B,S] (1 = real key, 0 = padding) or None
  -> final hidden states after ln_f, [B,S,d_model] in compute dtype.

  Positions are 0..S-1 for every row; RoPE only sees relative offsets, so left padding
  (masked keys) leaves the real positions' outputs unchanged.
  """
  cdt = config.compute_jnp_dtype
  S = tokens.shape[1]
  # The lookup runs on the embed-split table (each device fills its slice of D for the rows of
  # its "data" group), then an all-to-all trades the D split for the batch split.
  x = sharding.constrain(jnp.take(params["wte"], tokens, axis=0).astype(cdt), ("batch_dp", "seq", "embed"))
  x = sharding.constrain(x, ("batch", "seq", "act_embed"))
  cos, sin = rope_tables(S, config.head_dim, config.rope_theta)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)

  def body(carry, layer_params):
    return _block(config, carry, layer_params, cos, sin, key_mask), None

  if config.remat_policy != "none":
    # prevent_cse=False is safe (and faster) inside scan.
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, params["blocks"], unroll=config.scan_unroll)
  return rms_norm(x, params["ln_f"], config.rms_norm_eps).astype(cdt)


def lm_head(config: LLaDAConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [..., d_model] -> logits float32 [..., vocab_size] (embedding padding rows dropped)."""
  cdt = config.compute_jnp_dtype
  # Vocab-parallel over the FSDP axis too: the micro-batch's hidden states are gathered (small,
  # [B,S,D]) and each device computes all rows for 1/(fsdp*tensor) of the vocabulary, so no
  # device holds the whole [D,V] head or its gradient (for LLaDA: 1 GB bf16 each), only its
  # slice; log_softmax reduces [B,S] statistics across devices.
  hidden = sharding.constrain(hidden.astype(cdt), _lead_axes(hidden.ndim, "batch_dp", "act_embed"))
  w = sharding.gather_weight(params["ff_out"], param_logical_axes(config)["ff_out"], (None, "head_vocab"), cdt)
  logits = dense(hidden, w, preferred_element_type=jnp.float32)
  logits = sharding.constrain(logits, _lead_axes(logits.ndim, "batch_dp", "head_vocab"))
  if config.embedding_size != config.vocab_size:
    logits = logits[..., : config.vocab_size]
  return logits


def forward(config: LLaDAConfig, params: Params, tokens: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
  """tokens int32 [B,S] -> logits float32 [B,S,vocab_size]."""
  return lm_head(config, params, hidden_states(config, params, tokens, attention_mask))


def forward_flops(config: LLaDAConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one forward: 2 * params * tokens (embedding lookup excluded, head included)
  + attention scores and context 4 * S^2 * D per layer per sequence."""
  n = config.num_params(embeddings=False) + config.embedding_size * config.d_model
  return 2.0 * n * batch * seq_len + 4.0 * batch * seq_len**2 * config.d_model * config.n_layers
