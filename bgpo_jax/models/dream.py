"""Dream: a Qwen2-style Transformer used bidirectionally as a masked diffusion LM (Dream-v0-7B).

Same conventions as `llada.py` (pure functions over a nested-dict parameter tree, the n_layers
blocks stacked along a leading axis and scanned, the same logical axis names, sharding rules and
remat policies), with Dream's differences from LLaDA:

- q / k / v projections carry biases (o_proj and the MLP do not); GQA (28 query / 4 kv heads);
- RMSNorm eps 1e-6, RoPE theta 1e6, an untied `lm_head`, vocab 152064 (no padding rows);
- shifted predictions: Dream is initialized from an autoregressive model and keeps its
  next-token layout, so the token at position i is predicted from the output at position i - 1
  (position 0 repeats its own). `hidden_states` applies the shift, so everything downstream
  (`lm_head`, the ELBO, both samplers) sees "feature i predicts token i" as for LLaDA.

Parameter tree (ours <- Hugging Face tensor name; HF Linear weights are [out, in], ours [in, out]):

  params["wte"]                  [vocab, d_model]     <- model.embed_tokens.weight
  params["blocks"]["attn_norm"]  [L, d_model]         <- model.layers.{i}.input_layernorm.weight
  params["blocks"]["q_proj"]     [L, d_model, H*hd]   <- model.layers.{i}.self_attn.q_proj.weight.T
  params["blocks"]["q_bias"]     [L, H*hd]            <- model.layers.{i}.self_attn.q_proj.bias
  params["blocks"]["k_proj"]     [L, d_model, KV*hd]  <- ...self_attn.k_proj.weight.T
  params["blocks"]["k_bias"]     [L, KV*hd]           <- ...self_attn.k_proj.bias
  params["blocks"]["v_proj"]     [L, d_model, KV*hd]  <- ...self_attn.v_proj.weight.T
  params["blocks"]["v_bias"]     [L, KV*hd]           <- ...self_attn.v_proj.bias
  params["blocks"]["attn_out"]   [L, H*hd, d_model]   <- ...self_attn.o_proj.weight.T
  params["blocks"]["ff_norm"]    [L, d_model]         <- model.layers.{i}.post_attention_layernorm.weight
  params["blocks"]["ff_proj"]    [L, d_model, mlp]    <- ...mlp.gate_proj.weight.T
  params["blocks"]["up_proj"]    [L, d_model, mlp]    <- ...mlp.up_proj.weight.T
  params["blocks"]["ff_out"]     [L, mlp, d_model]    <- ...mlp.down_proj.weight.T
  params["ln_f"]                 [d_model]            <- model.norm.weight
  params["ff_out"]               [d_model, vocab]     <- lm_head.weight.T

Positions: Dream's reference generation uses position ids cumsum(attention_mask) - 1 under left
padding; RoPE only sees relative offsets between (unmasked) keys and queries, so positions
0..S-1 give the real positions the same outputs (tests/test_dream.py checks this).
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

from bgpo_jax.models import llada
from bgpo_jax.models import sharding
from bgpo_jax.models.llada import rms_norm, rope_tables

Params = dict[str, Any]
FAMILY = "dream"
HF_MODEL_TYPE = "Dream"

# HF config keys whose value we must reject when it differs from Dream's (key -> allowed values).
_UNSUPPORTED_HF = {
  "hidden_act": ("silu",),
  "tie_word_embeddings": (False, None),
  "use_sliding_window": (False, None),
  "use_mrope": (False, None),
  "rope_scaling": (None,),
}

# The released Dream-v0-Instruct-7B config.json minus the keys our fields write; to_hf_dict starts
# from it so that an exported checkpoint loads in the reference PyTorch code.
_HF_TEMPLATE: dict[str, Any] = {
  "architectures": ["DreamModel"],
  "attention_dropout": 0.0,
  "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
               "AutoModel": "modeling_dream.DreamModel"},
  "hidden_act": "silu",
  "initializer_range": 0.02,
  "model_type": HF_MODEL_TYPE,
  "rope_scaling": None,
  "sliding_window": None,
  "tie_word_embeddings": False,
  "use_cache": True,
  "use_mrope": False,
  "use_sliding_window": False,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_BIASES = {"q_bias": "q_proj", "k_bias": "k_proj", "v_bias": "v_proj"}


@dataclasses.dataclass(frozen=True)
class DreamConfig:
  """Architecture plus our precision / memory knobs; field names follow LLaDAConfig so that code
  written against one family reads the other (from_hf maps Dream's HF key names). Frozen, hashable.
  """

  d_model: int = 3584
  n_layers: int = 28
  n_heads: int = 28
  n_kv_heads: int = 4
  mlp_hidden_size: int = 18944
  vocab_size: int = 152064
  rope_theta: float = 1000000.0
  rms_norm_eps: float = 1e-6
  max_sequence_length: int = 131072
  mask_token_id: int = 151666
  eos_token_id: int = 151643
  pad_token_id: int = 151643
  bos_token_id: int = 151643
  # ours (same meaning as LLaDAConfig's)
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat_policy: str = "none"
  scan_unroll: int = 1
  attention_impl: str = "auto"  # llada.ATTENTION_IMPLS; Dream runs LLaDA's attention (llada.attention)
  logits_chunk: int = 0  # the ELBO's vocabulary head in chunks of this many positions (0 = one block)
  init_std: float = 0.02
  hf_extra: tuple = dataclasses.field(default=(), compare=False, repr=False)

  family = FAMILY  # class attribute, not a field

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError(f"head_dim {self.d_model // self.n_heads} must be even for RoPE")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
    if self.remat_policy not in llada.REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {llada.REMAT_POLICIES}")
    if self.scan_unroll < 1:
      raise ValueError(f"scan_unroll {self.scan_unroll} must be >= 1 (n_layers or more = fully unrolled)")
    if self.attention_impl not in llada.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {llada.ATTENTION_IMPLS}")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk {self.logits_chunk} must be >= 0 (0 = no chunking)")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        raise ValueError(f"{name} {v} is outside the vocabulary [0, {self.vocab_size})")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def embedding_size(self) -> int:
    """Rows of the embedding / head (Dream has no padding rows: = vocab_size)."""
    return self.vocab_size

  @property
  def param_jnp_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def compute_jnp_dtype(self):
    return _DTYPES[self.compute_dtype]

  def num_params(self, embeddings: bool = True) -> int:
    """Parameter count (input embedding and head included unless embeddings=False)."""
    d, hd = self.d_model, self.head_dim
    q, kv = self.n_heads * hd, self.n_kv_heads * hd
    attn = d * q * 2 + d * kv * 2 + q + 2 * kv
    block = attn + 3 * d * self.mlp_hidden_size + 2 * d
    n = self.n_layers * block + d
    if embeddings:
      n += 2 * self.vocab_size * d
    return n

  @classmethod
  def preset(cls, name: str, **overrides) -> "DreamConfig":
    """Named configs: "tiny" (~1M params, vocab 128 = CharTokenizer ids, GQA 4/2), "small"
    (d 768, 12 layers, 12 heads / 4 kv, MLP 2048, vocab 32000, char special ids), "dream_7b"
    (Dream-v0-7B exactly, bfloat16)."""
    char_ids = dict(mask_token_id=2, eos_token_id=0, pad_token_id=0, bos_token_id=1)
    presets = {
      "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=512,
                   vocab_size=128, rope_theta=10000.0, max_sequence_length=512, **char_ids),
      "small": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, mlp_hidden_size=2048,
                    vocab_size=32000, rope_theta=10000.0, max_sequence_length=2048, **char_ids),
      "dream_7b": dict(param_dtype="bfloat16", compute_dtype="bfloat16"),
    }
    if name not in presets:
      raise ValueError(f"unknown Dream preset {name!r}; choose one of {sorted(presets)}")
    return cls(**{**presets[name], **overrides})

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "DreamConfig":
    """Reads a Dream HF config (a dict, a config.json path, or a checkpoint dir).

    param_dtype and compute_dtype follow `torch_dtype` (bfloat16 or float32) unless overridden.
    Raises ValueError naming every architecture feature we do not implement.
    """
    hf = llada.read_hf_config(path_or_dict)
    bad = [f"{k}={hf[k]!r} (supported: {allowed[0]!r})" for k, allowed in _UNSUPPORTED_HF.items()
           if k in hf and hf[k] not in allowed]
    if bad:
      raise ValueError("unsupported Dream config features: " + ", ".join(bad))
    n_heads = int(hf["num_attention_heads"])
    torch_dtype = hf.get("torch_dtype") or "float32"
    dtype = torch_dtype if torch_dtype in ("bfloat16", "float32") else "float32"
    eos = int(hf.get("eos_token_id", 151643))
    ours = dict(
      d_model=int(hf["hidden_size"]),
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      mlp_hidden_size=int(hf["intermediate_size"]),
      vocab_size=int(hf["vocab_size"]),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_sequence_length=int(hf.get("max_position_embeddings", 131072)),
      mask_token_id=int(hf.get("mask_token_id", 151666)),
      eos_token_id=eos,
      pad_token_id=eos if hf.get("pad_token_id") is None else int(hf["pad_token_id"]),
      bos_token_id=eos if hf.get("bos_token_id") is None else int(hf["bos_token_id"]),
      param_dtype=dtype,
      compute_dtype=dtype,
    )
    hf_keys = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps",
               "max_position_embeddings", "mask_token_id", "eos_token_id", "pad_token_id",
               "bos_token_id", "torch_dtype"}
    extra = tuple(sorted((k, json.dumps(v)) for k, v in hf.items() if k not in hf_keys))
    ours.update(overrides)
    return cls(**ours, hf_extra=extra)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict: Dream's defaults, then the original extra keys, then our values."""
    out = dict(_HF_TEMPLATE)
    out.update({k: json.loads(v) for k, v in self.hf_extra})
    out.update(
      hidden_size=self.d_model,
      num_hidden_layers=self.n_layers,
      num_attention_heads=self.n_heads,
      num_key_value_heads=self.n_kv_heads,
      intermediate_size=self.mlp_hidden_size,
      vocab_size=self.vocab_size,
      rope_theta=self.rope_theta,
      rms_norm_eps=self.rms_norm_eps,
      max_position_embeddings=self.max_sequence_length,
      mask_token_id=self.mask_token_id,
      eos_token_id=self.eos_token_id,
      pad_token_id=self.pad_token_id,
      bos_token_id=self.bos_token_id,
      torch_dtype=self.param_dtype,
    )
    return dict(sorted(out.items()))




# -----------------------------------------------------------------------------------------------
# Parameters


def param_shapes(config: DreamConfig) -> dict[str, Any]:
  """Shapes of every parameter, same tree as init_params."""
  c = config
  L, D, M, V = c.n_layers, c.d_model, c.mlp_hidden_size, c.vocab_size
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  return {
    "wte": (V, D),
    "blocks": {
      "attn_norm": (L, D),
      "q_proj": (L, D, q),
      "q_bias": (L, q),
      "k_proj": (L, D, kv),
      "k_bias": (L, kv),
      "v_proj": (L, D, kv),
      "v_bias": (L, kv),
      "attn_out": (L, q, D),
      "ff_norm": (L, D),
      "ff_proj": (L, D, M),
      "up_proj": (L, D, M),
      "ff_out": (L, M, D),
    },
    "ln_f": (D,),
    "ff_out": (D, V),
  }


def param_logical_axes(config: DreamConfig) -> dict[str, Any]:
  """Logical axis names per parameter dimension: LLaDA's names (and so its sharding rules); the
  biases follow their projection's output axis."""
  axes = llada.param_logical_axes(config)
  axes["blocks"].update(q_bias=("layers", "heads"), k_bias=("layers", "kv_heads"),
                        v_bias=("layers", "kv_heads"))
  return axes


def compute_weight_axes(config: DreamConfig) -> dict[str, tuple]:
  """One layer's weights as used by the matmuls: "layers" dropped, "embed" (FSDP) gathered."""
  blocks = param_logical_axes(config)["blocks"]
  return {k: tuple(None if a == "embed" else a for a in axes[1:])
          for k, axes in blocks.items() if not k.endswith("_norm")}


def _init_kind(path: tuple) -> str:
  if path[-1] in ("attn_norm", "ff_norm", "ln_f"):
    return "ones"
  if path[-1] in _BIASES:
    return "zeros"
  return "normal"


def init_params(config: DreamConfig, rng: jax.Array) -> Params:
  """Random init as Dream's reference: weights ~ N(0, init_std^2), biases 0, RMSNorm weights 1,
  in param_dtype. Jitted internally; usable under jit / eval_shape."""
  return _init_params_jit(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(config: DreamConfig, rng: jax.Array) -> Params:
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  dtype = config.param_jnp_dtype
  names = [tuple(getattr(p, "key", p) for p in path) for path, _ in leaves]
  kinds = [_init_kind(n) for n in names]
  sizes = [math.prod(s) if k == "normal" else 0 for k, (_, s) in zip(kinds, leaves)]
  # One normal draw for a small model's weights (each threefry call costs ~1 s of CPU compile);
  # per leaf for big ones so the float32 temporary stays one leaf (as llada.init_params).
  flat = jax.random.normal(rng, (sum(sizes),), jnp.float32) if sum(sizes) <= 2**27 else None
  keys = jax.random.split(rng, len(leaves))
  out, start = [], 0
  for kind, (_, shape), size, key in zip(kinds, leaves, sizes, keys):
    if kind != "normal":
      out.append((jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype))
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


def _block(config: DreamConfig, x: jax.Array, p: Mapping[str, jax.Array], cos, sin,
           key_mask) -> jax.Array:
  """One pre-norm Qwen2 block without the causal mask, x [B,S,D] compute dtype: LLaDA's block
  (llada.block) with Dream's q / k / v biases and axis names."""
  return llada.block(config, x, p, cos, sin, key_mask, param_axes=param_logical_axes(config)["blocks"],
                     compute_axes=compute_weight_axes(config))


def shift_right(h: jax.Array) -> jax.Array:
  """[B,S,...] -> [B,S,...] with out[:, i] = h[:, i-1] and out[:, 0] = h[:, 0] (Dream's shift)."""
  return jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)


def hidden_states(config: DreamConfig, params: Params, tokens: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
  """tokens int32 [B,S], attention_mask [B,S] (1 = real key) or None -> the features that predict
  each position, [B,S,d_model] in compute dtype: after the final norm and the shift (feature i is
  the model's output at i - 1, feature 0 its own), so lm_head(feature i) scores token i."""
  cdt = config.compute_jnp_dtype
  S = tokens.shape[1]
  x = sharding.constrain(jnp.take(params["wte"], tokens, axis=0).astype(cdt), ("batch_dp", "seq", "embed"))
  x = sharding.constrain(x, ("batch", "seq", "act_embed"))
  cos, sin = rope_tables(S, config.head_dim, config.rope_theta)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)

  def body(carry, layer_params):
    return _block(config, carry, layer_params, cos, sin, key_mask), None

  if config.remat_policy != "none":
    body = jax.checkpoint(body, policy=llada._REMAT_POLICIES[config.remat_policy], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, params["blocks"], unroll=config.scan_unroll)
  h = rms_norm(x, params["ln_f"], config.rms_norm_eps).astype(cdt)
  return sharding.constrain(shift_right(h), ("batch", "seq", "act_embed"))


def lm_head(config: DreamConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [..., d_model] -> logits float32 [..., vocab_size]; vocab-parallel as LLaDA's head."""
  cdt = config.compute_jnp_dtype
  hidden = sharding.constrain(hidden.astype(cdt), llada._lead_axes(hidden.ndim, "batch_dp", "act_embed"))
  w = sharding.gather_weight(params["ff_out"], param_logical_axes(config)["ff_out"], (None, "head_vocab"), cdt)
  logits = llada.dense(hidden, w, preferred_element_type=jnp.float32)
  return sharding.constrain(logits, llada._lead_axes(logits.ndim, "batch_dp", "head_vocab"))


def forward(config: DreamConfig, params: Params, tokens: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
  """tokens int32 [B,S] -> logits float32 [B,S,vocab_size]; logits[:, i] scores the token at i."""
  return lm_head(config, params, hidden_states(config, params, tokens, attention_mask))


def forward_flops(config: DreamConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one forward: 2 * params * tokens (embedding lookup excluded, head included)
  + attention scores and context 4 * S^2 * D per layer per sequence."""
  n = config.num_params(embeddings=False) + config.vocab_size * config.d_model
  return 2.0 * n * batch * seq_len + 4.0 * batch * seq_len**2 * config.d_model * config.n_layers


# -----------------------------------------------------------------------------------------------
# Hugging Face tensor names

_HF_BLOCK = {
  "attn_norm": ("input_layernorm.weight", False),
  "q_proj": ("self_attn.q_proj.weight", True),
  "q_bias": ("self_attn.q_proj.bias", False),
  "k_proj": ("self_attn.k_proj.weight", True),
  "k_bias": ("self_attn.k_proj.bias", False),
  "v_proj": ("self_attn.v_proj.weight", True),
  "v_bias": ("self_attn.v_proj.bias", False),
  "attn_out": ("self_attn.o_proj.weight", True),
  "ff_norm": ("post_attention_layernorm.weight", False),
  "ff_proj": ("mlp.gate_proj.weight", True),
  "up_proj": ("mlp.up_proj.weight", True),
  "ff_out": ("mlp.down_proj.weight", True),
}


def hf_tensor_map(config: DreamConfig) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
  """HF tensor name -> (path in our param tree, layer index or None, transposed?)."""
  out: dict[str, tuple[tuple[str, ...], int | None, bool]] = {
    "model.embed_tokens.weight": (("wte",), None, False),
    "model.norm.weight": (("ln_f",), None, False),
    "lm_head.weight": (("ff_out",), None, True),
  }
  for i in range(config.n_layers):
    for k, (name, transposed) in _HF_BLOCK.items():
      out[f"model.layers.{i}.{name}"] = (("blocks", k), i, transposed)
  return out
