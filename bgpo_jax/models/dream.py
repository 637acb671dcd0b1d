"""Dream: a Qwen2-style Transformer used bidirectionally as a masked diffusion LM (Dream-v0-7B).

The same model as LLaDA's (transformer.py, layers.py, attention.py: the parameter tree, the
block, the layer scan, the logical axis names, sharding rules and remat policies); this file
holds Dream's differences from LLaDA and its Hugging Face schema:

- q / k / v projections carry biases (DreamConfig.qkv_bias; o_proj and the MLP have none); GQA (28 query / 4 kv heads);
- RMSNorm eps 1e-6, RoPE theta 1e6, an untied `lm_head`, vocab 152064 (no padding rows);
- shifted predictions: Dream is initialized from an autoregressive model and keeps its
  next-token layout, so the token at position i is predicted from the output at position i - 1
  (position 0 repeats its own). `hidden_states` applies the shift (DreamConfig.shifted), so everything downstream
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
0..S-1 give the real positions the same outputs (tests/models/test_dream.py checks this).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from bgpo_jax.models import transformer
# The shared model under Dream's names (family.ModelFamily).
from bgpo_jax.models.transformer import (  # noqa: F401
  Params, compute_weight_axes, forward, forward_flops, hf_tensor_map, hidden_states, init_params,
  lm_head, param_logical_axes, param_shapes, shift_right)

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

_HF_SCHEMA = transformer.HFSchema(
  name="Dream",
  template=_HF_TEMPLATE,
  unsupported=_UNSUPPORTED_HF,
  keys={
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "mlp_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_sequence_length": "max_position_embeddings",
    "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
  },
  top={"model.embed_tokens.weight": ("wte", False), "model.norm.weight": ("ln_f", False),
       "lm_head.weight": ("ff_out", True)},
  layer_prefix="model.layers.{i}.",
  block={
    "attn_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_proj": "self_attn.k_proj.weight",
    "k_bias": "self_attn.k_proj.bias",
    "v_proj": "self_attn.v_proj.weight",
    "v_bias": "self_attn.v_proj.bias",
    "attn_out": "self_attn.o_proj.weight",
    "ff_norm": "post_attention_layernorm.weight",
    "ff_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "ff_out": "mlp.down_proj.weight",
  },
)


@dataclasses.dataclass(frozen=True)
class DreamConfig(transformer.ModelConfig):
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
  attention_impl: str = "auto"  # attention.ATTENTION_IMPLS
  logits_chunk: int = 0  # the ELBO's vocabulary head in chunks of this many positions (0 = one block)
  init_std: float = 0.02
  hf_extra: tuple = dataclasses.field(default=(), compare=False, repr=False)

  family = FAMILY  # class attributes, not fields
  qkv_bias = True
  shifted = True
  hf_schema = _HF_SCHEMA

  @property
  def embedding_size(self) -> int:
    """Rows of the embedding / head (Dream has no padding rows: = vocab_size)."""
    return self.vocab_size

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
  def fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields of a Dream HF config dict (pad / bos_token_id fall back to
    eos_token_id)."""
    n_heads = int(hf["num_attention_heads"])
    eos = int(hf.get("eos_token_id", 151643))
    return dict(
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
    )
