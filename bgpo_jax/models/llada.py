"""LLaDA: the bidirectional Llama-style Transformer behind masked diffusion LMs (SPEC section 1).

Pure functions over an explicit nested-dict parameter tree. The n_layers blocks are stacked
along a leading layer axis and the forward runs `jax.lax.scan` over them, so an 8B model
compiles as fast as a 1-layer one. The model itself is the family-independent one
(transformer.py: the tree, init, the layer scan, the head; layers.py: the block; attention.py:
the kernels); this file holds what is LLaDA's: its config (Hugging Face keys, presets) and its
HF tensor names. No biases, no shift, an untied head with padding rows (embedding_size).

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
RMSNorm, RoPE and softmax run in float32; logits are float32. Sharding: transformer.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from bgpo_jax.models import layers, transformer
# The shared model under LLaDA's names (family.ModelFamily), and the layer / kernel names other
# modules and tests reach through this module.
from bgpo_jax.models.attention import (  # noqa: F401
  ATTENTION_IMPLS, _key_length_attention, attention, attention_impl_for)
from bgpo_jax.models.attention import attention as _attention  # noqa: F401
from bgpo_jax.models.layers import (  # noqa: F401
  ACTIVATION_NAMES, REMAT_POLICIES, apply_rope, dense, norm_dense, rms_norm, rope_tables, swiglu_dense)
from bgpo_jax.models.layers import CHECKPOINT_POLICIES as _REMAT_POLICIES  # noqa: F401
from bgpo_jax.models.transformer import (  # noqa: F401
  Params, compute_weight_axes, forward, forward_flops, hf_tensor_map, hidden_states, init_params,
  lm_head, param_logical_axes, param_shapes, read_hf_config)

FAMILY = "llada"

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

_HF_PREFIX = "model.transformer."
_HF_SCHEMA = transformer.HFSchema(
  name="LLaDA",
  template=_HF_TEMPLATE,
  unsupported=_UNSUPPORTED_HF,
  # LLaDA's config.json keys are our field names.
  keys={k: k for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                       "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length",
                       "mask_token_id", "eos_token_id", "pad_token_id")},
  # mlp_ratio: mlp_hidden_size's fallback (and written from it); our dtype field names are never
  # carried as extras either.
  also_read=("mlp_ratio", "param_dtype", "compute_dtype"),
  top={_HF_PREFIX + "wte.weight": ("wte", False), _HF_PREFIX + "ln_f.weight": ("ln_f", False),
       _HF_PREFIX + "ff_out.weight": ("ff_out", True)},
  layer_prefix=_HF_PREFIX + "blocks.{i}.",
  block={k: f"{k}.weight" for k in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm",
                                    "ff_proj", "up_proj", "ff_out")},
)


@dataclasses.dataclass(frozen=True)
class LLaDAConfig(transformer.ModelConfig):
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

  hf_schema = _HF_SCHEMA  # a class attribute, not a field

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
  def fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields of a LLaDA HF config dict (mlp_hidden_size falls back to
    mlp_ratio * d_model, embedding_size to vocab_size, pad_token_id to eos_token_id)."""
    d = int(hf["d_model"])
    n_heads = int(hf["n_heads"])
    mlp = hf.get("mlp_hidden_size") or int(hf.get("mlp_ratio", 4) * d)
    vocab = int(hf["vocab_size"])
    return dict(
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
    )

  def hf_values(self) -> dict[str, Any]:
    """Our values under their config.json keys, plus mlp_ratio (LLaDA's config.json carries it
    beside mlp_hidden_size)."""
    return dict(super().hf_values(), mlp_ratio=max(1, self.mlp_hidden_size // self.d_model))


def _block(config: LLaDAConfig, x: jax.Array, p: Mapping[str, jax.Array], cos, sin,
           key_mask) -> jax.Array:
  """One pre-norm block (layers.block) with LLaDA's axis names, x [B,S,D] compute dtype -> x;
  p holds this layer's (unstacked) weights. For tests and benchmarks of one layer."""
  return layers.block(config, x, p, cos, sin, key_mask, param_axes=param_logical_axes(config)["blocks"],
                      compute_axes=compute_weight_axes(config))[0]
