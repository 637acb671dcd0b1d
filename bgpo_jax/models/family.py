"""One model interface over the model families (LLaDA, Dream): everything outside `models/`
(the ELBO, the train step, the samplers, evaluation, the trainer) reaches a model through
`module_for(config)`, so a new family is a module implementing `ModelFamily`, registered here.

A family module exposes, for its config class C:

  init_params(C, rng) -> params             param_shapes(C) / param_logical_axes(C) -> trees
  hidden_states(C, params, tokens, mask)    [B,S,D]: feature i predicts token i (shift inside)
  lm_head(C, params, hidden) -> logits      forward(C, params, tokens, mask) -> [B,S,V]
  forward_flops(C, batch, seq_len)          C.preset(name), C.from_hf(path_or_dict)
  hf_tensor_map(C) -> {HF tensor name: (path in the tree, layer or None, transposed?)}

and a KV-cached forward for the cached sampler (`cached_forward_for(config)`: llada_cache or
dream_cache), both returning features in the `hidden_states` convention:

  prefill(C, params, tokens, mask) -> (features [B,S,D], cache (k, v) each [L,B,S,KV,hd])
  window_features(C, params, tokens [B,S], start, width, cache, mask) -> features [B,width,D]
    that predict positions [start, start + width) (the family decides which positions it runs)
  cache_bytes(C, batch, seq_len) -> int

Everything but the config class and the HF names is shared (transformer.py): a family module
re-exports it, and its config class (a transformer.ModelConfig) says how it differs
(`qkv_bias`, `shifted`).
"""

from __future__ import annotations

from typing import Any, Protocol

from bgpo_jax.models import dream, dream_cache, llada, llada_cache, transformer

FAMILIES = ("llada", "dream")
DEFAULT_FAMILY = "llada"
# Preset names per family (config.model.preset is validated against these).
PRESETS = {"llada": ("tiny", "small", "llada_8b"), "dream": ("tiny", "small", "dream_7b")}
_MODULES = {"llada": llada, "dream": dream}
_CONFIGS = {"llada": llada.LLaDAConfig, "dream": dream.DreamConfig}
_CACHED = {"llada": llada_cache, "dream": dream_cache}
# HF config.json model_type (lower-cased) -> family.
_HF_MODEL_TYPES = {"llada": "llada", "dream": "dream"}


class ModelFamily(Protocol):
  """What a family module provides (see the module docstring for shapes)."""

  def init_params(self, config: Any, rng: Any) -> Any: ...
  def param_shapes(self, config: Any) -> Any: ...
  def param_logical_axes(self, config: Any) -> Any: ...
  def hidden_states(self, config: Any, params: Any, tokens: Any, attention_mask: Any = None) -> Any: ...
  def lm_head(self, config: Any, params: Any, hidden: Any) -> Any: ...
  def forward(self, config: Any, params: Any, tokens: Any, attention_mask: Any = None) -> Any: ...
  def forward_flops(self, config: Any, batch: int, seq_len: int) -> float: ...
  def hf_tensor_map(self, config: Any) -> Any: ...


def family_of(config: Any) -> str:
  """"llada" / "dream" for a model config instance (or a family name)."""
  if isinstance(config, str):
    if config not in _MODULES:
      raise ValueError(f"unknown model family {config!r}; use one of {FAMILIES}")
    return config
  for name, cls in _CONFIGS.items():
    if isinstance(config, cls):
      return name
  raise TypeError(f"{type(config).__name__} is not a model config of a known family {FAMILIES}")


def module_for(config: Any) -> ModelFamily:
  """The family module (bgpo_jax.models.llada or .dream) for a config instance or family name."""
  return _MODULES[family_of(config)]


class CachedForward(Protocol):
  """A family's KV-cached forward (see the module docstring for shapes)."""

  def prefill(self, config: Any, params: Any, tokens: Any, attention_mask: Any) -> Any: ...
  def window_features(self, config: Any, params: Any, tokens: Any, start: Any, width: int,
                      cache: Any, attention_mask: Any) -> Any: ...
  def cache_bytes(self, config: Any, batch: int, seq_len: int) -> int: ...


def cached_forward_for(config: Any) -> CachedForward:
  """The family's KV-cached forward module (models/llada_cache.py or models/dream_cache.py)."""
  return _CACHED[family_of(config)]


def config_class(family: str) -> type:
  return _CONFIGS[family_of(family)]


def preset(family: str, name: str, **overrides) -> Any:
  """`config_class(family).preset(name, **overrides)`, with the family's preset names checked."""
  if name not in PRESETS[family_of(family)]:
    raise ValueError(f"unknown {family} preset {name!r}; choose one of {PRESETS[family]}")
  return config_class(family).preset(name, **overrides)




def hf_family(path_or_dict) -> str:
  """The family of an HF config (dict, config.json or checkpoint dir) from its `model_type`
  (none = LLaDA)."""
  hf = transformer.read_hf_config(path_or_dict)
  mt = str(hf.get("model_type") or "").lower()
  if not mt:  # LLaDA configs written before families existed may lack it
    return DEFAULT_FAMILY
  if mt in _HF_MODEL_TYPES:
    return _HF_MODEL_TYPES[mt]
  raise ValueError(f"HF config model_type {hf.get('model_type')!r} is not a known family "
                   f"(known model_type values: {sorted(_HF_MODEL_TYPES)})")


def config_from_hf(path_or_dict, **overrides) -> Any:
  """The family's config from an HF config (model_type decides the family)."""
  hf = transformer.read_hf_config(path_or_dict)
  return config_class(hf_family(hf)).from_hf(hf, **overrides)
