"""What every model family shares: config checks, the parameter tree, init, the layer scan, the
vocabulary head and the KV-cached forwards, written once over a family's config.

A family (llada.py, dream.py) is a frozen dataclass of its fields that subclasses `ModelConfig`
and says how it differs through two class attributes: `qkv_bias` (q / k / v projections carry
biases: Dream) and `shifted` (the token at i is predicted from the output at i - 1: Dream). The
rest of a family file is its Hugging Face schema (`hf_schema`: config keys, tensor names; its
`fields_from_hf` for the config keys' defaults and fallbacks) and its presets.

Parameter tree (L layers stacked on a leading axis; Linear weights [in, out]):

  params["wte"]                    [embedding_size, d_model]
  params["blocks"]["attn_norm"]    [L, d_model]          params["blocks"]["ff_norm"]  [L, d_model]
  params["blocks"]["q_proj"]       [L, d_model, H*hd]    params["blocks"]["ff_proj"]  [L, d_model, mlp] (gate)
  params["blocks"]["k_proj"]       [L, d_model, KV*hd]   params["blocks"]["up_proj"]  [L, d_model, mlp]
  params["blocks"]["v_proj"]       [L, d_model, KV*hd]   params["blocks"]["ff_out"]   [L, mlp, d_model]
  params["blocks"]["attn_out"]     [L, H*hd, d_model]    params["blocks"]["{q,k,v}_bias"] [L, H*hd or KV*hd]
  params["ln_f"]                   [d_model]             params["ff_out"]             [d_model, embedding_size]

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
from jax import lax

from bgpo_jax.models import attention, feature_major, layers, sharding

Params = dict[str, Any]
# (k, v), each [L, B, S, KV, hd] in the compute dtype.
KVCache = tuple[jax.Array, jax.Array]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_NORMS = ("attn_norm", "ff_norm", "ln_f")
_BIASES = ("q_bias", "k_bias", "v_bias")


@dataclasses.dataclass(frozen=True)
class HFSchema:
  """A family's Hugging Face names: its config.json keys and its tensor names.

  name: the family in error messages.
  template: the released config.json minus the keys we write; `to_hf_dict` starts from it so
    that an exported checkpoint loads in the reference PyTorch code.
  unsupported: config.json key -> the values we implement, the first the supported setting.
  keys: our field -> its config.json key, for the fields written one to one (read by the
    family's `fields_from_hf`, with its own defaults and fallbacks).
  also_read: further config.json keys never kept as extras (besides `keys` and "torch_dtype").
  top: HF tensor name -> (our top-level key, transposed?).
  layer_prefix: a layer's tensor name prefix, e.g. "model.layers.{i}.".
  block: our block key -> HF name inside a layer, in the checkpoint's order.
  """

  name: str
  template: Mapping[str, Any]
  unsupported: Mapping[str, tuple]
  keys: Mapping[str, str]
  top: Mapping[str, tuple[str, bool]]
  layer_prefix: str
  block: Mapping[str, str]
  also_read: tuple[str, ...] = ()


class ModelConfig:
  """The checks, derived sizes and Hugging Face config.json reading / writing of every family's
  config (a frozen dataclass subclassing this, with a `hf_schema` class attribute).

  Fields read here: d_model, n_layers, n_heads, n_kv_heads, mlp_hidden_size, vocab_size,
  embedding_size (a field or a property), rope_theta, rms_norm_eps, the *_token_id fields,
  param_dtype, compute_dtype, remat_policy, scan_unroll, attention_impl, logits_chunk, init_std,
  hf_extra (the original HF config's other keys as sorted (key, json) pairs).
  """

  qkv_bias = False  # q / k / v projections carry biases (class attributes, not fields)
  shifted = False  # feature i is the model's output at i - 1 (position 0: its own)
  hf_schema: HFSchema  # set by each family (a class attribute: no dataclass field here)

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
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(DTYPES)}")
    if self.remat_policy not in layers.REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {layers.REMAT_POLICIES}")
    if self.scan_unroll < 1:  # values >= n_layers all mean "fully unrolled"
      raise ValueError(f"scan_unroll {self.scan_unroll} must be >= 1 (n_layers or more = fully unrolled)")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk {self.logits_chunk} must be >= 0 (0 = no chunking)")
    if self.attention_impl not in attention.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {attention.ATTENTION_IMPLS}")
    for name in (f.name for f in dataclasses.fields(self) if f.name.endswith("_token_id")):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        raise ValueError(f"{name} {v} is outside the vocabulary [0, {self.vocab_size})")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def param_jnp_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def compute_jnp_dtype(self):
    return DTYPES[self.compute_dtype]

  def num_params(self, embeddings: bool = True) -> int:
    """Parameter count (input embedding and head included unless embeddings=False)."""
    shapes = jax.tree.leaves(param_shapes(self), is_leaf=lambda x: isinstance(x, tuple))
    n = sum(math.prod(s) for s in shapes)
    return n if embeddings else n - 2 * self.embedding_size * self.d_model

  @classmethod
  def fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields of an HF config dict (the family's defaults and fallbacks)."""
    raise NotImplementedError

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides):
    """Reads the family's HF config (a dict, a config.json path, or a checkpoint dir).

    param_dtype and compute_dtype follow `torch_dtype` (bfloat16 or float32) unless overridden.
    Raises ValueError naming every architecture feature we do not implement.
    """
    schema = cls.hf_schema
    hf = read_hf_config(path_or_dict)
    check_hf_features(hf, schema.unsupported, schema.name)
    dtype = hf_dtype(hf)
    ours = dict(cls.fields_from_hf(hf), param_dtype=dtype, compute_dtype=dtype)
    extra = hf_extra(hf, {*schema.keys.values(), "torch_dtype", *schema.also_read})
    ours.update(overrides)
    return cls(**ours, hf_extra=extra)

  def hf_values(self) -> dict[str, Any]:
    """Our values under their config.json keys (a family adds the keys it derives)."""
    values = {key: getattr(self, name) for name, key in self.hf_schema.keys.items()}
    values["torch_dtype"] = self.param_dtype
    return values

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict: the family's template, then the original extra keys, then our values."""
    out = dict(self.hf_schema.template)
    out.update({k: json.loads(v) for k, v in self.hf_extra})
    out.update(self.hf_values())
    return dict(sorted(out.items()))


# -----------------------------------------------------------------------------------------------
# Hugging Face config.json helpers (each family maps its own key names)


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


def check_hf_features(hf: Mapping[str, Any], unsupported: Mapping[str, tuple], family: str) -> None:
  """Raises ValueError naming every key of `hf` whose value is not among `unsupported[key]`
  (the values we implement, the first one the supported setting)."""
  bad = [f"{k}={hf[k]!r} (supported: {allowed[0]!r})" for k, allowed in unsupported.items()
         if k in hf and hf[k] not in allowed]
  if bad:
    raise ValueError(f"unsupported {family} config features: " + ", ".join(bad))


def hf_dtype(hf: Mapping[str, Any]) -> str:
  """param / compute dtype from `torch_dtype`: bfloat16 or float32 (anything else -> float32)."""
  torch_dtype = hf.get("torch_dtype") or "float32"
  return torch_dtype if torch_dtype in ("bfloat16", "float32") else "float32"


def hf_extra(hf: Mapping[str, Any], known) -> tuple:
  """The HF keys not in `known` as sorted (key, json) pairs (a config's `hf_extra`)."""
  return tuple(sorted((k, json.dumps(v)) for k, v in hf.items() if k not in known))


def hf_tensor_map(config) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
  """HF tensor name -> (path in our param tree, layer index or None, transposed?), from the
  config's `hf_schema`, in the checkpoint's order. A block tensor is transposed when it is a
  matrix (HF Linear weights are [out, in], ours [in, out])."""
  schema = config.hf_schema
  out = {name: ((key,), None, transposed) for name, (key, transposed) in schema.top.items()}
  blocks = param_shapes(config)["blocks"]
  for i in range(config.n_layers):
    for k, name in schema.block.items():
      out[schema.layer_prefix.format(i=i) + name] = (("blocks", k), i, len(blocks[k]) == 3)
  return out


# -----------------------------------------------------------------------------------------------
# Parameters


def param_shapes(config) -> dict[str, Any]:
  """Shapes of every parameter, same tree as init_params (module docstring)."""
  c = config
  L, D, M, E = c.n_layers, c.d_model, c.mlp_hidden_size, c.embedding_size
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  blocks = {"attn_norm": (L, D), "q_proj": (L, D, q), "k_proj": (L, D, kv), "v_proj": (L, D, kv),
            "attn_out": (L, q, D), "ff_norm": (L, D), "ff_proj": (L, D, M), "up_proj": (L, D, M),
            "ff_out": (L, M, D)}
  if c.qkv_bias:
    blocks.update(q_bias=(L, q), k_bias=(L, kv), v_bias=(L, kv))
  return {"wte": (E, D), "blocks": blocks, "ln_f": (D,), "ff_out": (D, E)}


def param_logical_axes(config) -> dict[str, Any]:
  """Logical axis names per parameter dimension (same tree as init_params); the biases follow
  their projection's output axis."""
  blocks = {
    "attn_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "attn_out": ("layers", "heads", "embed"),
    "ff_norm": ("layers", "norm"),
    "ff_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "ff_out": ("layers", "mlp", "embed"),
  }
  if config.qkv_bias:
    blocks.update(q_bias=("layers", "heads"), k_bias=("layers", "kv_heads"), v_bias=("layers", "kv_heads"))
  return {"wte": ("vocab", "embed"), "blocks": blocks, "ln_f": ("norm",), "ff_out": ("embed", "vocab")}


def compute_weight_axes(config) -> dict[str, tuple]:
  """Logical axes of one layer's weights as used by the matmuls: the stacked "layers" axis
  dropped and "embed" (the FSDP axis) gathered, heads / MLP keep their tensor sharding."""
  blocks = param_logical_axes(config)["blocks"]
  return {k: tuple(None if a == "embed" else a for a in axes[1:])
          for k, axes in blocks.items() if not k.endswith("_norm")}


def lead_axes(ndim: int, first: str | None, last: str | None) -> tuple:
  """Logical axes of an activation [batch, ..., last]: (first, None, ..., last)."""
  return (first,) + (None,) * (ndim - 2) + (last,) if ndim >= 2 else (last,)


def init_params(config, rng: jax.Array) -> Params:
  """Random init: weights ~ N(0, init_std^2), biases 0, RMSNorm weights 1, in param_dtype.

  Jitted internally (one compile instead of one per eager op); also usable under jit /
  eval_shape, e.g. jax.jit(partial(init_params, config), out_shardings=...)(rng).
  """
  return _init_params_jit(config, rng)


_FLAT_INIT_MAX = 2**27


def _init_kind(path: tuple) -> str:
  return "ones" if path[-1] in _NORMS else "zeros" if path[-1] in _BIASES else "normal"


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(config, rng: jax.Array) -> Params:
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  dtype = config.param_jnp_dtype
  kinds = [_init_kind(tuple(getattr(p, "key", p) for p in path)) for path, _ in leaves]
  sizes = [math.prod(s) if k == "normal" else 0 for k, (_, s) in zip(kinds, leaves)]
  # One normal draw for all weights of a small model: every threefry call costs ~1 s of XLA CPU
  # compile time. Large models draw per leaf so the float32 temporary stays one leaf.
  flat = None
  if sum(sizes) <= _FLAT_INIT_MAX:
    flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
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


def embed(config, params: Params, tokens: jax.Array) -> jax.Array:
  """tokens int32 [B,S] -> embeddings [B,S,D] in the compute dtype, split over the batch.

  The lookup runs on the embed-split table (each device fills its slice of D for the rows of
  its "data" group), then an all-to-all trades the D split for the batch split."""
  cdt = config.compute_jnp_dtype
  x = sharding.constrain(jnp.take(params["wte"], tokens, axis=0).astype(cdt), ("batch_dp", "seq", "embed"))
  return sharding.constrain(x, ("batch", "seq", "act_embed"))


def _write_window(cached: tuple, start, k: jax.Array, v: jax.Array) -> tuple:
  """layers.KVUpdate of the cached forward: the window's fresh k / v [B,W,KV,hd] written into
  one layer's cached (k, v) [B,S,KV,hd] at positions [start, start + W)."""
  act = lambda y: sharding.constrain(y, ("batch", "seq", "act_kv_heads", None))  # noqa: E731
  keys = lax.dynamic_update_slice_in_dim(cached[0], k, start, axis=1)
  values = lax.dynamic_update_slice_in_dim(cached[1], v, start, axis=1)
  return act(keys), act(values)


def run_blocks(config, x: jax.Array, blocks: Params, cos, sin, key_mask, *, remat: bool = False,
               cache: KVCache | None = None, start=0, keep_kv: bool = False,
               adapters: Params | None = None, lora_scale: float = 1.0, lora_dropout: tuple | None = None):
  """The layer scan: x [B,W,D] through the L stacked blocks -> (x [B,W,D], fresh (k, v) each
  [L,B,W,KV,hd] with keep_kv, else None). cache: the KV cache (k, v) [L,B,S,KV,hd] whose
  positions [start, start + W) the window's own K / V replace, or None (W = S). remat: each
  block under config.remat_policy's jax.checkpoint policy. adapters: LoRA adapters {weight key:
  {"a": [L,in,r], "b": [L,r,out]}} (models/lora.py), scanned with the blocks, or None.
  lora_dropout: (rate, keys [B]) for dropout on the adapters' inputs (each layer folds in its
  index), or None."""
  param_axes = param_logical_axes(config)["blocks"]
  compute_axes = compute_weight_axes(config)
  if isinstance(blocks, (list, tuple)):  # per-layer weights (unstack_blocks): one block call each
    kvs = []
    for i, p in enumerate(blocks):
      cached = None if cache is None else (cache[0][i], cache[1][i])
      update = None if cached is None else functools.partial(_write_window, cached, start)
      lora = None if adapters is None else jax.tree.map(lambda a, i=i: a[i], adapters)
      x, kv = layers.block(config, x, p, cos, sin, key_mask, param_axes=param_axes, compute_axes=compute_axes,
                           update_kv=update, lora=lora, lora_scale=lora_scale)
      kvs.append(kv)
    return x, (tuple(jnp.stack(t) for t in zip(*kvs)) if keep_kv else None)

  def body(carry, layer):
    p, cached, lora, index = layer
    update = None if cached is None else functools.partial(_write_window, cached, start)
    drop = None
    if lora_dropout is not None:
      drop = (lora_dropout[0], jax.vmap(jax.random.fold_in, in_axes=(0, None))(lora_dropout[1], index))
    carry, kv = layers.block(config, carry, p, cos, sin, key_mask, param_axes=param_axes,
                             compute_axes=compute_axes, update_kv=update, lora=lora, lora_scale=lora_scale,
                             lora_dropout=drop)
    return carry, (kv if keep_kv else None)

  if remat:
    # prevent_cse=False is safe (and faster) inside scan.
    body = jax.checkpoint(body, policy=layers.CHECKPOINT_POLICIES[config.remat_policy], prevent_cse=False)
  # adapters=None adds no leaves: the scan (and the program) is the one without LoRA.
  index = None if lora_dropout is None else jnp.arange(config.n_layers)
  return lax.scan(body, x, (blocks, cache, adapters, index), unroll=config.scan_unroll)


def unstack_blocks(params: Params) -> Params:
  """params with params["blocks"] as a tuple of n_layers per-layer trees (each leaf without the
  layer axis): the forwards then run the layers one call each instead of the layer scan.

  Why (the samplers on a CPU): inside the scan each layer's weights are a dynamic slice of the
  stacked arrays, which XLA:CPU copies out before every matmul, so a batch-1 sampler step
  re-copies all block weights (100 MB for benchmarks/forward.py's m30 model) on every step;
  sliced once before the sampler's loops, the loops read them in place. The copy costs one
  parameter-sized buffer beside the stacked one, and the program grows with the layer count."""
  n = jax.tree.leaves(params["blocks"])[0].shape[0]
  return dict(params, blocks=tuple(jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(n)))


def _final_norm(config, params: Params, x: jax.Array) -> jax.Array:
  return layers.rms_norm(x, params["ln_f"], config.rms_norm_eps).astype(config.compute_jnp_dtype)


def shift_right(h: jax.Array) -> jax.Array:
  """[B,S,...] -> [B,S,...] with out[:, i] = h[:, i-1] and out[:, 0] = h[:, 0] (shifted families)."""
  return jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)


@jax.tree_util.register_pytree_node_class
class Adapted:
  """A frozen base and its LoRA adapters passed as one model's `params` (a pytree: base and
  adapters are its leaves, the scale static), so code that only hands params to the model (the
  ELBO, the objectives, the old / reference terms) runs a LoRA model unchanged: `hidden_states`,
  `forward` and `lm_head` read base + adapters from it. models/lora.py builds and merges them.

  base: the params tree; adapters: {weight key: {"a": [L,in,r], "b": [L,r,out]}}; scale: alpha / r;
  dropout: None, or (rate, keys [B]) for a training forward with dropout on the adapters' inputs
  (PEFT's lora_dropout), one key per row of the batch the forward runs (`with_dropout`).
  """

  def __init__(self, base: Params, adapters: Params, scale: float, dropout: tuple | None = None):
    self.base, self.adapters, self.scale, self.dropout = base, adapters, scale, dropout

  def with_dropout(self, rate: float, keys: jax.Array) -> "Adapted":
    """This view with dropout `rate` on the adapters' inputs, row i masked from keys[i]."""
    return Adapted(self.base, self.adapters, self.scale, (float(rate), keys))

  def tree_flatten(self):
    rate, keys = self.dropout if self.dropout is not None else (None, None)
    return (self.base, self.adapters, keys), (self.scale, rate)

  @classmethod
  def tree_unflatten(cls, aux, children):
    scale, rate = aux
    base, adapters, keys = children
    return cls(base, adapters, scale, None if rate is None else (rate, keys))

  def __repr__(self):
    return f"Adapted(scale={self.scale}, adapters={sorted(self.adapters) if isinstance(self.adapters, dict) else '?'})"


def _unpack(params, adapters, lora_scale):
  """(base params, adapters, lora_scale) of plain params or an `Adapted` view."""
  if isinstance(params, Adapted):
    if adapters is not None:
      raise ValueError("adapters given twice: params is an Adapted view (base + adapters) and adapters= is set")
    return params.base, params.adapters, params.scale
  return params, adapters, lora_scale


def _lora_scale(adapters, lora_scale):
  if adapters is not None and lora_scale is None:
    raise ValueError("adapters given without lora_scale; pass lora_scale=spec.scale (lora.LoraSpec: alpha / r)")
  return 1.0 if lora_scale is None else lora_scale


def hidden_states(config, params: Params, tokens: jax.Array,
                  attention_mask: jax.Array | None = None, *, adapters: Params | None = None,
                  lora_scale: float | None = None) -> jax.Array:
  """tokens int32 [B,S], attention_mask [B,S] (1 = real key, 0 = padding) or None -> the
  features that predict each position, [B,S,d_model] in compute dtype: the outputs after the
  final norm (ln_f), shifted right by one for a `shifted` family, so lm_head(feature i) scores
  token i.

  Positions are 0..S-1 for every row; RoPE only sees relative offsets, so left padding
  (masked keys) leaves the real positions' outputs unchanged.

  adapters: LoRA adapters (models/lora.py: {weight key: {"a": [L,in,r], "b": [L,r,out]}}) applied
  unmerged, each targeted weight W acting as W + lora_scale * A @ B; None = the base model.
  params may also be an `Adapted` view (base + adapters + scale), then adapters= stays None.
  """
  dropout = params.dropout if isinstance(params, Adapted) else None
  params, adapters, lora_scale = _unpack(params, adapters, lora_scale)
  scale = _lora_scale(adapters, lora_scale)
  x = embed(config, params, tokens)
  cos, sin = layers.rope_tables(tokens.shape[1], config.head_dim, config.rope_theta)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)
  if dropout is not None and dropout[1].shape != (tokens.shape[0],):
    raise ValueError(f"LoRA dropout keys {dropout[1].shape} must be one per row of tokens {tokens.shape}")
  x, _ = run_blocks(config, x, params["blocks"], cos, sin, key_mask, remat=config.remat_policy != "none",
                    adapters=adapters, lora_scale=scale, lora_dropout=dropout)
  h = _final_norm(config, params, x)
  if config.shifted:
    return sharding.constrain(shift_right(h), ("batch", "seq", "act_embed"))
  return h


def lm_head(config, params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [..., d_model] -> logits float32 [..., vocab_size] (embedding padding rows dropped).
  params: the params or an `Adapted` view (the head is never adapted)."""
  params = params.base if isinstance(params, Adapted) else params
  cdt = config.compute_jnp_dtype
  # Vocab-parallel over the FSDP axis too: the micro-batch's hidden states are gathered (small,
  # [B,S,D]) and each device computes all rows for 1/(fsdp*tensor) of the vocabulary, so no
  # device holds the whole [D,V] head or its gradient (for LLaDA: 1 GB bf16 each), only its
  # slice; log_softmax reduces [B,S] statistics across devices.
  hidden = sharding.constrain(hidden.astype(cdt), lead_axes(hidden.ndim, "batch_dp", "act_embed"))
  w = sharding.gather_weight(params["ff_out"], param_logical_axes(config)["ff_out"], (None, "head_vocab"), cdt)
  logits = layers.dense(hidden, w, preferred_element_type=jnp.float32)
  logits = sharding.constrain(logits, lead_axes(logits.ndim, "batch_dp", "head_vocab"))
  if config.embedding_size != config.vocab_size:
    logits = logits[..., : config.vocab_size]
  return logits


def forward(config, params: Params, tokens: jax.Array,
            attention_mask: jax.Array | None = None, *, adapters: Params | None = None,
            lora_scale: float | None = None) -> jax.Array:
  """tokens int32 [B,S] -> logits float32 [B,S,vocab_size]; logits[:, i] scores the token at i.
  adapters / lora_scale: LoRA adapters as in `hidden_states`, or None."""
  hidden = hidden_states(config, params, tokens, attention_mask, adapters=adapters, lora_scale=lora_scale)
  return lm_head(config, params, hidden)


def forward_flops(config, batch: int, seq_len: int) -> float:
  """Model FLOPs of one forward: 2 * params * tokens (embedding lookup excluded, head included)
  + attention scores and context 4 * S^2 * D per layer per sequence."""
  n = config.num_params(embeddings=False) + config.embedding_size * config.d_model
  return 2.0 * n * batch * seq_len + 4.0 * batch * seq_len**2 * config.d_model * config.n_layers


# -----------------------------------------------------------------------------------------------
# KV-cached forwards (SPEC section 4b; llada_cache.py, dream_cache.py): the outputs after the
# final norm at the positions run, no shift.


def cache_bytes(config, batch: int, seq_len: int) -> int:
  """Bytes of one KV cache (K and V of every layer) for `batch` sequences of `seq_len`."""
  itemsize = jnp.dtype(config.compute_jnp_dtype).itemsize
  return 2 * config.n_layers * batch * seq_len * config.n_kv_heads * config.head_dim * itemsize


def prefill(config, params: Params, tokens: jax.Array, attention_mask: jax.Array | None, *,
            return_cache: bool = True) -> tuple[jax.Array, KVCache | None]:
  """Full forward: tokens int32 [B,S] -> (outputs after ln_f [B,S,D] in the compute dtype, no
  shift; cache (k, v) each [L,B,S,KV,hd], or None with return_cache=False). params may be an
  `Adapted` view (LoRA adapters unmerged)."""
  params, adapters, scale = _unpack(params, None, None)
  cos, sin = layers.rope_tables(tokens.shape[1], config.head_dim, config.rope_theta)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)
  x, kv = run_blocks(config, embed(config, params, tokens), params["blocks"], cos, sin, key_mask,
                     keep_kv=return_cache, adapters=adapters, lora_scale=_lora_scale(adapters, scale))
  return _final_norm(config, params, x), kv


def window_forward(config, params: Params, window_tokens: jax.Array, start, cache: KVCache,
                   attention_mask: jax.Array | None) -> jax.Array:
  """The model on positions [start, start + W) against a cache: in every layer the window's
  fresh K / V replace its positions of the cached ones and its queries attend the whole cache.

  window_tokens int32 [B, W]; start int or int32 scalar (traced is fine; W is static); cache
  (k, v) each [L, B, S, KV, hd] from `prefill`; attention_mask [B, S] (1 = real key) or None
  -> outputs after ln_f [B, W, D] in the compute dtype (no shift). params may be an `Adapted` view,
  or `feature_major.Weights` (the same forward laid out for narrow windows on a CPU)."""
  if isinstance(params, feature_major.Weights):
    return feature_major.window_forward(config, params, window_tokens, start, cache, attention_mask)
  params, adapters, scale = _unpack(params, None, None)
  W = window_tokens.shape[1]
  cos, sin = layers.rope_tables(cache[0].shape[2], config.head_dim, config.rope_theta)
  cos = lax.dynamic_slice_in_dim(cos, start, W, axis=0)
  sin = lax.dynamic_slice_in_dim(sin, start, W, axis=0)
  key_mask = None if attention_mask is None else attention_mask.astype(bool)
  x, _ = run_blocks(config, embed(config, params, window_tokens), params["blocks"], cos, sin,
                    key_mask, cache=tuple(cache), start=start, adapters=adapters,
                    lora_scale=_lora_scale(adapters, scale))
  return _final_norm(config, params, x)
