"""LoRA adapters on the block weights of every family, and their Hugging Face PEFT files.

A LoRA adapter replaces a frozen weight W [in, out] by W + scale * A @ B with A [in, r],
B [r, out] trained and scale = alpha / r (PEFT's default scaling; rsLoRA's alpha / sqrt(r) is not
implemented). Which weights: `LoraSpec.targets`, Hugging Face module names matched the way PEFT
matches `target_modules` (`targets_of`).

Adapters tree (L layers stacked like the block weights; one entry per targeted block weight k,
whose stacked weight is params["blocks"][k] [L, in, out]):

  adapters[k]["a"]   [L, in, r]    <- PEFT's base_model.model.<layer prefix><module>.lora_A.weight [r, in]
  adapters[k]["b"]   [L, r, out]   <- ...<module>.lora_B.weight [out, r]

(PEFT stores nn.Linear layouts, [out, in]: each layer's A and B are transposed in the file.)

The forward (transformer.forward / hidden_states with adapters=..., lora_scale=spec.scale) keeps
the adapters unmerged: each targeted matmul computes x @ W + scale * (x @ A) @ B
(layers.lora_dense). `merge` folds them into the weights for sampling or export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.models import transformer

Params = dict[str, Any]
# A frozen base + adapters passed to the model as one `params` (transformer.Adapted).
Adapted = transformer.Adapted
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The prefix PEFT's PeftModel puts before the base model's own module paths.
PEFT_PREFIX = "base_model.model."
# adapter_config.json keys whose other values change the adapter's math or its tensors; absent
# keys are fine (key -> the accepted values, the first being PEFT's default).
_PEFT_ACCEPTED = {
  "use_rslora": (False,),
  "use_dora": (False,),
  "fan_in_fan_out": (False,),
  "bias": ("none",),
  "lora_bias": (False,),
  "modules_to_save": (None, []),
  "rank_pattern": ({}, None),
  "alpha_pattern": ({}, None),
  "layers_to_transform": (None,),
  "layer_replication": (None,),
  "target_parameters": (None, []),
  "trainable_token_indices": (None,),
  "use_qalora": (False,),
  "alora_invocation_tokens": (None,),
  # LoRA variants with their own forward or factor shapes
  "use_bdlora": (None, False),
  "kasa_config": (None,),
  "arrow_config": (None,),
  "monteclora_config": (None,),
}
# A LoRA tensor name: <module path>.lora_A|lora_B[.<adapter name>].weight (PEFT writes files
# without the adapter name; its in-memory state dict has it, e.g. ".default").
_TENSOR_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class PeftFileError(ValueError):
  """A PEFT adapter directory we cannot load exactly (an unsupported setting, a tensor that
  names no block weight of the model, a missing or misshapen tensor, NaN / Inf values)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how. r: rank (>= 1); alpha: scale numerator (scale = alpha / r); targets:
  Hugging Face module names (PEFT's `target_modules`, matched by `targets_of`); dropout: PEFT's
  lora_dropout, kept for the trainer and the exported config (the forward here has none)."""

  r: int
  alpha: float
  targets: tuple[str, ...]
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.targets, str):
      raise ValueError(f"targets must be a sequence of module names, got the string {self.targets!r}; "
                       f"write ({self.targets!r},)")
    object.__setattr__(self, "targets", tuple(self.targets))  # a list becomes hashable
    if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
      raise ValueError(f"LoRA rank r={self.r!r} must be an int >= 1")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
        math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"lora alpha={self.alpha!r} must be a finite number > 0 (scale = alpha / r)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora dropout={self.dropout!r} must be in [0, 1)")
    if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
      raise ValueError(f"targets={self.targets!r} must be non-empty module names such as ('q_proj', 'v_proj')")
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f"targets={self.targets!r} name a module twice")

  @property
  def scale(self) -> float:
    """alpha / r: the factor of A @ B (PEFT's default, not rsLoRA's alpha / sqrt(r))."""
    return self.alpha / self.r


# -----------------------------------------------------------------------------------------------
# Targets


def module_names(model_config) -> dict[str, str]:
  """Our block weight key -> its Hugging Face module name inside a layer (the tensor name less
  ".weight"), for the block's matrices, in the checkpoint's order. LLaDA: {"q_proj": "q_proj", ...,
  "attn_out": "attn_out", "ff_proj": "ff_proj", "ff_out": "ff_out"}; Dream: {"q_proj":
  "self_attn.q_proj", ..., "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "ff_out":
  "mlp.down_proj"}."""
  shapes = transformer.param_shapes(model_config)["blocks"]
  return {k: name.removesuffix(".weight") for k, name in model_config.hf_schema.block.items()
          if len(shapes[k]) == 3}


def _matches(module: str, target: str) -> bool:
  # PEFT's rule for a list of target_modules: the module path equals the target or ends with
  # "." + target.
  return module == target or module.endswith("." + target)


def targets_of(model_config, targets: Sequence[str], *, strict: bool = False) -> tuple[str, ...]:
  """The block weight keys (ours, in the checkpoint's order) that Hugging Face module names
  `targets` select, matched as PEFT matches a list of `target_modules`: a module is targeted when
  its name equals a target or ends with "." + target.

  As in PEFT, a target that matches nothing is skipped as long as some target matches (strict:
  refuse it too); none matching raises, naming the family's module names. Only the layers'
  matrices are adaptable (not the embedding, the head, norms or biases), and a target applies to
  every layer (PEFT's per-layer selection is not supported).

  d1's list (q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj) therefore selects on
  LLaDA only q_proj, k_proj, v_proj and up_proj (LLaDA's HF names for the other three are
  attn_out, ff_proj and ff_out), and all seven on Dream (self_attn.{q,k,v,o}_proj,
  mlp.{gate,up,down}_proj).
  """
  if isinstance(targets, str):
    raise ValueError(f"targets must be a sequence of module names, got the string {targets!r}; "
                     f"write ({targets!r},)")
  names = module_names(model_config)
  keys = [k for k, m in names.items() if any(_matches(m, t) for t in targets)]
  unmatched = [t for t in targets if not any(_matches(m, t) for m in names.values())]
  family = model_config.hf_schema.name
  if not keys or (strict and unmatched):
    raise ValueError(f"LoRA targets {list(unmatched)} match no {family} block weight; its module names "
                     f"(per layer) are {list(names.values())}")
  return tuple(keys)


# -----------------------------------------------------------------------------------------------
# Parameters


def _weight_shape(model_config, key: str) -> tuple[int, int, int]:
  return tuple(transformer.param_shapes(model_config)["blocks"][key])


def init_adapters(model_config, spec: LoraSpec, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
  """Fresh adapters for spec's targets: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, the
  kaiming_uniform_(a=sqrt(5)) of nn.Linear on lora_A [r, in]), B = 0, so the adapted model starts
  as the base model. -> {key: {"a": [L, in, r], "b": [L, r, out]}} in dtype.

  Jitted internally (one compile instead of one per eager random draw); also usable under jit /
  eval_shape, e.g. jax.jit(partial(init_adapters, config, spec), out_shardings=...)(rng)."""
  return _init_adapters_jit(model_config, spec, rng, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_adapters_jit(model_config, spec: LoraSpec, rng: jax.Array, dtype) -> Params:
  keys = targets_of(model_config, spec.targets)
  out = {}
  for key, k_rng in zip(keys, jax.random.split(rng, len(keys))):
    L, fan_in, fan_out = _weight_shape(model_config, key)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(k_rng, (L, fan_in, spec.r), jnp.float32, -bound, bound)
    out[key] = {"a": a.astype(dtype), "b": jnp.zeros((L, spec.r, fan_out), dtype)}
  return out


def adapter_shapes(model_config, spec: LoraSpec) -> Params:
  """Shapes of `init_adapters`' tree: {key: {"a": (L, in, r), "b": (L, r, out)}}."""
  out = {}
  for key in targets_of(model_config, spec.targets):
    L, fan_in, fan_out = _weight_shape(model_config, key)
    out[key] = {"a": (L, fan_in, spec.r), "b": (L, spec.r, fan_out)}
  return out


def adapter_logical_axes(model_config, adapters: Mapping[str, Any]) -> Params:
  """Logical axis names of an adapters tree (arrays or shapes): A ("layers", <the weight's input
  axis>, None), B ("layers", None, <the weight's output axis>), so A is split like its weight's
  rows (FSDP's "embed", or "heads" / "mlp" for attn_out / ff_out) and B like its columns; the rank
  axis is never split."""
  axes = transformer.param_logical_axes(model_config)["blocks"]
  _check_keys(model_config, adapters)
  return {k: {"a": (axes[k][0], axes[k][1], None), "b": (axes[k][0], None, axes[k][2])} for k in adapters}


def _check_keys(model_config, adapters: Mapping[str, Any]) -> None:
  names = module_names(model_config)
  bad = [k for k in adapters if k not in names]
  if bad:
    raise ValueError(f"adapter keys {bad} are not {model_config.hf_schema.name} block matrices; "
                     f"use keys of {list(names)}")


def check_adapters(model_config, adapters: Mapping[str, Any], spec: LoraSpec) -> None:
  """Raises ValueError unless `adapters` has exactly spec's targets, each A [L, in, r] and
  B [L, r, out] for its weight."""
  want = targets_of(model_config, spec.targets)
  if set(adapters) != set(want):
    raise ValueError(f"adapters hold {sorted(adapters)} but spec.targets {list(spec.targets)} select "
                     f"{list(want)}")
  for k, shapes in adapter_shapes(model_config, spec).items():
    for ab in ("a", "b"):
      got = tuple(np.shape(adapters[k][ab]))
      if got != shapes[ab]:
        raise ValueError(f"adapters[{k!r}][{ab!r}] has shape {got}, expected {shapes[ab]} (r={spec.r})")


def merge(model_config, params: Params, adapters: Mapping[str, Any], spec: LoraSpec) -> Params:
  """params with each targeted block weight W [L, in, out] replaced by W + scale * A @ B (computed
  in float32 at full matmul precision, stored in W's dtype); the other leaves are shared."""
  check_adapters(model_config, adapters, spec)
  blocks = dict(params["blocks"])
  for k, ab in adapters.items():
    w = blocks[k]
    delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    blocks[k] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
  return dict(params, blocks=blocks)


def adapted(base: Params, adapters: Mapping[str, Any], spec: LoraSpec) -> Adapted:
  """The view the model functions take as `params` for base + adapters (unmerged, scale spec.scale)."""
  return Adapted(base, adapters, spec.scale)


# -----------------------------------------------------------------------------------------------
# PEFT files


def _layer_modules(model_config) -> dict[str, tuple[str, int]]:
  """Full HF module path of every block matrix ("model.layers.3.self_attn.q_proj") -> (our key,
  layer)."""
  schema, names = model_config.hf_schema, module_names(model_config)
  return {schema.layer_prefix.format(i=i) + m: (k, i) for i in range(model_config.n_layers) for k, m in names.items()}


def _other_modules(model_config) -> list[str]:
  """The family's module paths outside the layers (embedding, final norm, head)."""
  return [name.removesuffix(".weight") for name in model_config.hf_schema.top]


def peft_target_modules(model_config, spec: LoraSpec) -> list[str] | str:
  """adapter_config.json's target_modules for spec: its targets as written, unless one of them
  would also select a module outside the layers under PEFT's suffix rule (LLaDA's "ff_out" is
  both the MLP's output and the head, model.transformer.ff_out); then a regular expression PEFT
  full-matches against module paths, naming exactly the targeted layer modules."""
  targets = list(spec.targets)
  if not any(_matches(m, t) for m in _other_modules(model_config) for t in targets):
    return targets
  names = module_names(model_config)
  chosen = [names[k] for k in targets_of(model_config, targets)]
  prefix = re.escape(model_config.hf_schema.layer_prefix).replace(re.escape("{i}"), r"\d+")
  return prefix + "(?:" + "|".join(re.escape(m) for m in chosen) + ")"


def peft_config(model_config, spec: LoraSpec, *, base_model_name_or_path: str | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
  """The adapter_config.json dict PEFT reads for a plain LoRA adapter of spec (task_type
  "CAUSAL_LM" as d1 configures it; PEFT then wraps the model in PeftModelForCausalLM, which
  loads onto LLaDA's trust_remote_code AutoModel too; None = the generic PeftModel)."""
  alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
  return {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "r": spec.r,
    "lora_alpha": alpha,
    "lora_dropout": spec.dropout,
    "target_modules": peft_target_modules(model_config, spec),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "inference_mode": True,
  }


def save_peft(adapters: Mapping[str, Any], model_config, spec: LoraSpec, out_dir: str | os.PathLike, *,
              base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM") -> None:
  """Writes a PEFT adapter directory that `PeftModel.from_pretrained(model, out_dir)` loads onto
  the family's Hugging Face model: adapter_config.json (`peft_config`) and
  adapter_model.safetensors, per layer i and target `<prefix_i><module>.lora_A.weight` [r, in] and
  `.lora_B.weight` [out, r] under PEFT's "base_model.model." prefix, in the adapters' dtype."""
  from safetensors.numpy import save_file

  check_adapters(model_config, adapters, spec)
  names, schema = module_names(model_config), model_config.hf_schema
  tensors = {}
  for k in targets_of(model_config, spec.targets):
    a, b = np.asarray(jax.device_get(adapters[k]["a"])), np.asarray(jax.device_get(adapters[k]["b"]))
    for i in range(model_config.n_layers):
      base = PEFT_PREFIX + schema.layer_prefix.format(i=i) + names[k]
      tensors[base + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[base + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  cfg = peft_config(model_config, spec, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")


def _some(items: Sequence[str], n: int = 3) -> str:
  items = sorted(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def _spec_from_config(cfg: Mapping[str, Any], model_config, where: str) -> tuple[LoraSpec, set]:
  """LoraSpec and the expected (key, layer) set of an adapter_config.json dict."""
  if cfg.get("peft_type") != "LORA":
    raise PeftFileError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; only 'LORA' adapters load")
  bad = [f"{k}={cfg[k]!r} (supported: {ok[0]!r})" for k, ok in _PEFT_ACCEPTED.items() if k in cfg and cfg[k] not in ok]
  if bad:
    raise PeftFileError(f"{where}: unsupported LoRA settings: {', '.join(bad)}")
  targets = cfg.get("target_modules")
  layer_modules = _layer_modules(model_config)
  try:
    if isinstance(targets, str):  # PEFT: a regular expression full-matched against module paths
      expected = {v for m, v in layer_modules.items() if re.fullmatch(targets, m)}
      keys = {k for k, _ in expected}
      partial = sorted(k for k in keys if sum(kk == k for kk, _ in expected) != model_config.n_layers)
      if partial:
        raise PeftFileError(f"{where}: target_modules {targets!r} adapts {partial} in only some layers; "
                            f"adapters must cover every layer")
      if not keys:
        raise PeftFileError(f"{where}: target_modules {targets!r} matches no {model_config.hf_schema.name} "
                            f"block weight (module paths like {next(iter(layer_modules))!r})")
      names = module_names(model_config)
      spec_targets = tuple(names[k] for k in names if k in keys)
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
      keys = set(targets_of(model_config, targets))
      spec_targets = tuple(targets)
    else:
      raise PeftFileError(f"{where}: target_modules {targets!r} must be a non-empty list of module names or a "
                          f"regular expression")
    spec = LoraSpec(r=cfg.get("r"), alpha=cfg.get("lora_alpha"), targets=spec_targets,
                    dropout=float(cfg.get("lora_dropout") or 0.0))
  except PeftFileError:
    raise
  except ValueError as e:
    raise PeftFileError(f"{where}: {e}") from None
  return spec, {(k, i) for k in keys for i in range(model_config.n_layers)}


def load_peft(adapter_dir: str | os.PathLike, model_config, *, dtype: Any = None) -> tuple[Params, LoraSpec]:
  """Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) written
  by PEFT's save_pretrained or `save_peft` -> (adapters {key: {"a": [L, in, r], "b": [L, r, out]}}
  in dtype (None: the file's), its LoraSpec).

  Tensor names may carry PEFT's "base_model.model." prefix or not, and an adapter-name infix
  (lora_A.default.weight) or not. Raises PeftFileError (one line) for anything that would not
  load exactly: peft_type other than LORA, rsLoRA / DoRA / fan_in_fan_out / modules_to_save /
  bias / per-module ranks or alphas / per-layer selection, a tensor naming no block matrix of the
  model (LoRA on the embedding or the head), missing tensors, wrong shapes, NaN / Inf values.
  """
  from safetensors import safe_open

  adapter_dir = os.fspath(adapter_dir)
  cfg_path, st_path = os.path.join(adapter_dir, CONFIG_FILE), os.path.join(adapter_dir, WEIGHTS_FILE)
  for p in (cfg_path, st_path):
    if not os.path.exists(p):
      other = " (adapter_model.bin is not read: save with safe_serialization=True)" if p == st_path else ""
      raise PeftFileError(f"{adapter_dir}: no {os.path.basename(p)}{other}")
  with open(cfg_path) as f:
    cfg = json.load(f)
  spec, expected = _spec_from_config(cfg, model_config, cfg_path)
  family = model_config.hf_schema.name
  layer_modules = _layer_modules(model_config)
  found: dict[tuple[str, int, str], np.ndarray] = {}
  unknown, adapter_names = [], set()
  with safe_open(st_path, framework="np") as f:
    for name in f.keys():
      m = _TENSOR_NAME.match(name)
      module = m and m["module"].removeprefix(PEFT_PREFIX)
      if not m or module not in layer_modules or layer_modules[module] not in expected:
        unknown.append(name)
        continue
      adapter_names.add(m["adapter"])
      key, layer = layer_modules[module]
      found[(key, layer, m["ab"])] = f.get_tensor(name)
  if unknown:
    raise PeftFileError(f"{st_path}: {len(unknown)} tensors are not LoRA A / B weights of the {family} block "
                        f"matrices that target_modules {cfg.get('target_modules')!r} selects ({_some(unknown)}); "
                        f"LoRA on the embedding or the head is not supported")
  if len(adapter_names) > 1:
    raise PeftFileError(f"{st_path}: tensors of several adapters {sorted(map(str, adapter_names))}; save one")
  names, prefix = module_names(model_config), model_config.hf_schema.layer_prefix
  missing = {(k, i, ab) for k, i in expected for ab in "AB"} - set(found)
  if missing:
    listed = [f"{prefix.format(i=i)}{names[k]}.lora_{ab}.weight" for k, i, ab in missing]
    raise PeftFileError(f"{st_path}: {len(missing)} tensors missing ({_some(listed)})")
  out = {}
  for k in [k for k in names if (k, 0) in expected]:  # the checkpoint's order
    L, fan_in, fan_out = _weight_shape(model_config, k)
    out[k] = {}
    for ab, shape in (("A", (spec.r, fan_in)), ("B", (fan_out, spec.r))):
      mats = []
      for i in range(L):
        t, where = found[(k, i, ab)], f"{prefix.format(i=i)}{names[k]}.lora_{ab}"
        if tuple(t.shape) != shape:
          raise PeftFileError(f"{st_path}: {where} has shape {tuple(t.shape)}, expected {shape} (r={spec.r})")
        if not np.isfinite(t.astype(np.float32)).all():
          raise PeftFileError(f"{st_path}: {where} holds NaN or Inf values")
        mats.append(t.T)
      out[k][ab.lower()] = jnp.asarray(np.stack(mats), dtype=dtype)
  return out, spec
