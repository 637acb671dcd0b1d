"""Hugging Face LLaDA / Dream checkpoints (config.json + sharded safetensors) <-> our parameter tree.

The family comes from config.json's `model_type` (models/family.py); each family module names its
HF tensors (`llada.hf_tensor_map`, `dream.hf_tensor_map`).

Import streams tensor by tensor: each HF tensor is read from its shard (safetensors, numpy),
put on device (straight onto its NamedSharding when a mesh is given), transposed / cast there,
and written into its slot of the stacked layer array by a jitted, donated update. Host memory
therefore stays at about one HF tensor (the largest is the 126464 x 4096 embedding, 1 GB in
bf16); device memory is the final parameters plus one tensor in flight. A tensor holding NaN/Inf
is refused (CheckpointError naming it), counted on device as it is placed.

Export streams the other way: the safetensors files are written by a small writer that emits
the header first and then one tensor at a time (byte-identical to safetensors.numpy.save_file),
so host memory is again about one tensor.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from bgpo_jax.models import family, llada
from bgpo_jax.models.sharding import DEFAULT_LOGICAL_RULES, logical_to_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names; the rank is the order safetensors uses to lay tensors out in a file.
_ST_DTYPES = {
  "F64": (np.dtype(np.float64), 3),
  "F32": (np.dtype(np.float32), 2),
  "BF16": (np.dtype(ml_dtypes.bfloat16), 1),
  "F16": (np.dtype(np.float16), 0),
}
_NP_TO_ST = {v[0]: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint does not match the config (missing / unexpected tensors, wrong shapes) or holds
  NaN/Inf weights."""


def hf_tensor_map(config: llada.LLaDAConfig) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
  """HF tensor name -> (path in our param tree, layer index or None, transposed?), from the
  config's family module (llada.hf_tensor_map, dream.hf_tensor_map).

  Transposed tensors are HF Linear weights ([out, in]); ours are [in, out].
  """
  return family.module_for(config).hf_tensor_map(config)


def hf_shape(config: llada.LLaDAConfig, name: str) -> tuple[int, ...]:
  """The shape an HF tensor must have for `config`."""
  path, layer, transposed = hf_tensor_map(config)[name]
  shape = _get(family.module_for(config).param_shapes(config), path)
  if layer is not None:
    shape = shape[1:]
  return tuple(reversed(shape)) if transposed else tuple(shape)


def _get(tree: Any, path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _weight_map(path: str) -> dict[str, str]:
  """HF tensor name -> shard file name (from the index, or the single model.safetensors)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      return dict(json.load(f)["weight_map"])
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    with safe_open(single, framework="np") as f:
      return {k: SINGLE_FILE for k in f.keys()}
  raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")


def _by_file(weight_map: dict[str, str], wanted) -> dict[str, list[str]]:
  """Shard file name -> the names in `wanted` stored there (weight_map: HF name -> file)."""
  by_file: dict[str, list[str]] = {}
  for name, file in weight_map.items():
    if name in wanted:
      by_file.setdefault(file, []).append(name)
  return by_file


def _check_checkpoint(config: llada.LLaDAConfig, path: str, weight_map: dict[str, str],
                      strict: bool) -> None:
  """Reads only the safetensors headers; raises one CheckpointError listing every problem."""
  expected = hf_tensor_map(config)
  problems = []
  missing = sorted(set(expected) - set(weight_map))
  if missing:
    problems.append(f"{len(missing)} missing tensors: {', '.join(missing)}")
  unexpected = sorted(set(weight_map) - set(expected))
  if unexpected and strict:
    problems.append(f"{len(unexpected)} unexpected tensors (pass strict=False to ignore): "
                    f"{', '.join(unexpected)}")
  for file, names in sorted(_by_file(weight_map, expected).items()):
    fpath = os.path.join(path, file)
    if not os.path.exists(fpath):
      problems.append(f"shard {file} (holding {names[0]}, ...) is missing")
      continue
    with safe_open(fpath, framework="np") as f:
      stored = set(f.keys())
      for name in sorted(names):
        if name not in stored:
          problems.append(f"{name}: listed in the index under {file} but not stored there")
          continue
        sl = f.get_slice(name)
        got, want = tuple(sl.get_shape()), hf_shape(config, name)
        if got != want:
          problems.append(f"{name}: wrong shape, expected {want}, got {got}")
        if sl.get_dtype() not in _ST_DTYPES:
          problems.append(f"{name}: unsupported dtype {sl.get_dtype()} (want one of "
                          f"{sorted(_ST_DTYPES)})")
  if problems:
    raise CheckpointError(f"checkpoint {path} does not match its config:\n  " +
                          "\n  ".join(problems))


@jax.jit
def _nonfinite_count(x):
  return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _zeros(shape, dtype):
  return jnp.zeros(shape, dtype)


@functools.lru_cache(maxsize=None)
def _placer(out_sharding: NamedSharding | None, transposed: bool, stacked: bool) -> Callable:
  """Jitted placement of one HF tensor: stacked: (target, tensor, layer) -> target with that
  layer written (target donated); otherwise (tensor) -> param. Transposes / casts on device."""
  kwargs = {} if out_sharding is None else {"out_shardings": out_sharding}

  def prepare(value, dtype):
    return (value.T if transposed else value).astype(dtype)

  if stacked:
    def place(target, value, layer):
      return jax.lax.dynamic_update_index_in_dim(target, prepare(value, target.dtype), layer, 0)
    return jax.jit(place, donate_argnums=0, **kwargs)
  return jax.jit(prepare, static_argnums=1, **kwargs)


def _local_dir(path: str | os.PathLike) -> str:
  """The checkpoint directory as a local path (a gs:// (epath) one copied down first: safetensors
  maps local files); raises FileNotFoundError without a config.json."""
  path = os.fspath(path)
  if "://" in path:
    from bgpo_jax.checkpoint import copy_tree
    local = tempfile.mkdtemp(prefix="bgpo_hf_")
    copy_tree(path, local)
    path = local
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
  return path


def _param_shardings(config, shapes: dict[str, Any], mesh: Mesh | None,
                     logical_rules: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
  """NamedSharding per parameter on `mesh` (same tree as `shapes`), or None leaves without one."""
  if mesh is None:
    return jax.tree.map(lambda _: None, shapes, is_leaf=lambda x: isinstance(x, tuple))
  return logical_to_sharding(family.module_for(config).param_logical_axes(config), mesh,
                             logical_rules or DEFAULT_LOGICAL_RULES, shapes=shapes)


def _preallocate(shapes: dict[str, Any], shardings: dict[str, Any], dtype) -> dict[str, Any]:
  """The params tree to fill: zeros for the stacked block arrays (written layer by layer), None
  for the top-level ones (placed whole)."""
  params: dict[str, Any] = {}
  for leaf_path, shape in jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple))[0]:
    keys = tuple(p.key for p in leaf_path)
    sh = _get(shardings, keys)
    if keys[0] == "blocks":
      fn = _zeros if sh is None else jax.jit(_zeros, static_argnames=("shape", "dtype"),
                                             out_shardings=sh)
      _set(params, keys, fn(shape=tuple(shape), dtype=dtype))
    else:
      _set(params, keys, None)
  return params


def _put_on_device(value: np.ndarray, mesh: Mesh | None, sh: NamedSharding | None, param_ndim: int,
                   stacked: bool, transposed: bool) -> jax.Array:
  """One HF tensor (host, [out, in] for a Linear) on device: straight onto the per-layer, HF
  layout version of its parameter's sharding `sh` on `mesh` (param_ndim: the parameter's rank),
  or onto the default device without one."""
  if sh is None:
    return jax.device_put(value)
  spec = tuple(sh.spec) + (None,) * (param_ndim - len(sh.spec))
  spec = spec[1:] if stacked else spec
  spec = tuple(reversed(spec)) if transposed else spec
  return jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))


def _fill_params(config, path: str, weight_map: dict[str, str], params: dict[str, Any],
                 shapes: dict[str, Any], mesh: Mesh | None, shardings: dict[str, Any]) -> list[tuple]:
  """Streams every HF tensor of the checkpoint into `params` (one on the host at a time); returns
  (name, NaN/Inf count on device, size) per tensor, to be checked once at the end (no host
  sync per tensor)."""
  tmap = hf_tensor_map(config)
  pdtype = config.param_jnp_dtype
  nonfinite = []
  for file, names in sorted(_by_file(weight_map, tmap).items()):
    with safe_open(os.path.join(path, file), framework="np") as f:
      for name in sorted(names):
        keys, layer, transposed = tmap[name]
        sh = _get(shardings, keys)
        stacked = layer is not None
        value = _put_on_device(f.get_tensor(name), mesh, sh, len(_get(shapes, keys)), stacked, transposed)
        nonfinite.append((name, _nonfinite_count(value), int(np.prod(value.shape))))
        place = _placer(sh, transposed, stacked)
        if stacked:
          _set(params, keys, place(_get(params, keys), value, jnp.int32(layer)))
        else:
          _set(params, keys, place(value, pdtype))
        del value
  return nonfinite


def _refuse_nonfinite(path: str, nonfinite: list[tuple]) -> None:
  """A NaN/Inf weight would make every loss NaN (each update skipped): refuse the import instead
  (CheckpointError naming the tensors)."""
  counts = jax.device_get([c for _, c, _ in nonfinite])
  bad = [(name, int(c), size) for (name, _, size), c in zip(nonfinite, counts) if c]
  if bad:
    listed = ", ".join(f"{name} ({c} of {size} values)" for name, c, size in bad[:5])
    what = (f"{bad[0][0]} holds NaN/Inf ({bad[0][1]} of {bad[0][2]} values)" if len(bad) == 1 else
            f"{len(bad)} tensors hold NaN/Inf: {listed}{', ...' if len(bad) > 5 else ''}")
    raise CheckpointError(f"checkpoint {path}: {what}; refusing to import it (re-download or re-export it)")


def load(path: str | os.PathLike, *, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None,
         logical_rules: Sequence[tuple[str, Any]] | None = None, strict: bool = True,
         **config_overrides) -> tuple[llada.LLaDAConfig, dict[str, Any]]:
  """Imports an HF LLaDA or Dream checkpoint dir -> (config, params) (LLaDAConfig / DreamConfig).

  dtype: parameter dtype (config.param_dtype follows it; None keeps the checkpoint's
  torch_dtype). mesh: place each tensor straight onto its NamedSharding (param_logical_axes +
  logical_rules, default DEFAULT_LOGICAL_RULES); None = default device. strict: unexpected
  tensors are an error. config_overrides: LLaDAConfig fields (e.g. compute_dtype, remat_policy).
  """
  path = _local_dir(path)
  if dtype is not None:
    config_overrides.setdefault("param_dtype", jnp.dtype(dtype).name)
  config = family.config_from_hf(path, **config_overrides)  # model_type: LLaDA or Dream
  weight_map = _weight_map(path)
  _check_checkpoint(config, path, weight_map, strict)
  shapes = family.module_for(config).param_shapes(config)
  shardings = _param_shardings(config, shapes, mesh, logical_rules)
  params = _preallocate(shapes, shardings, config.param_jnp_dtype)
  _refuse_nonfinite(path, _fill_params(config, path, weight_map, params, shapes, mesh, shardings))
  return config, params


# -----------------------------------------------------------------------------------------------
# Export


def _st_header(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, tuple, np.dtype]]]:
  """safetensors header bytes (length prefix included) and the tensors in file order.

  Same layout as the safetensors library: tensors ordered by dtype rank (descending) then name,
  compact JSON, padded with spaces to a multiple of 8 bytes.
  """
  order = sorted(entries, key=lambda e: (-_ST_DTYPES[_NP_TO_ST[np.dtype(e[2])]][1], e[0]))
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = metadata
  offset = 0
  for name, shape, dt in order:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    header[name] = {"dtype": _NP_TO_ST[np.dtype(dt)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * ((8 - len(text) % 8) % 8)
  return struct.pack("<Q", len(text)) + text, order


def write_safetensors(file: str, entries: Sequence[tuple[str, tuple[int, ...], Any]],
                      get: Callable[[str], np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Streams a safetensors file: `entries` (name, shape, dtype) first, then get(name) per tensor.

  Only one tensor is in host memory at a time.
  """
  head, order = _st_header([(n, tuple(s), np.dtype(d)) for n, s, d in entries], metadata)
  with open(file, "wb") as f:
    f.write(head)
    for name, shape, dt in order:
      a = np.ascontiguousarray(get(name))
      if a.shape != tuple(shape) or a.dtype != dt:
        raise ValueError(f"{name}: got {a.shape} {a.dtype}, header says {tuple(shape)} {dt}")
      f.write(a.tobytes())


@functools.partial(jax.jit, static_argnames=("transposed", "dtype"))
def _fetch(x: jax.Array, layer: jax.Array | None, *, transposed: bool, dtype) -> jax.Array:
  """One HF tensor from a param: the layer's slice (traced index: one compile per shape),
  transposed to [out, in], cast."""
  if layer is not None:
    x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
  return (x.T if transposed else x).astype(dtype)


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _save_entries(config, params: dict[str, Any], tmap: dict[str, tuple], dtype: Any
                  ) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(HF name, HF shape, file dtype) per tensor of `tmap`, in its order; raises when a param's
  shape does not match the config or its dtype has no safetensors name."""
  entries = []
  for name in tmap:
    keys, _, _ = tmap[name]
    dt = np.dtype(dtype) if dtype is not None else np.dtype(_get(params, keys).dtype)
    if dt not in _NP_TO_ST:
      raise ValueError(f"cannot save {name} as {dt}; use one of {sorted(map(str, _NP_TO_ST))}")
    expected = _get(family.module_for(config).param_shapes(config), keys)
    got = tuple(_get(params, keys).shape)
    if got != tuple(expected):
      raise CheckpointError(f"param {'/'.join(keys)}: shape {got} does not match the config's "
                            f"{tuple(expected)}")
    entries.append((name, hf_shape(config, name), dt))
  return entries


def _shard_groups(entries: Sequence[tuple], max_shard_bytes: int) -> list[list[tuple]]:
  """Greedy shards in the entries' (canonical) order: embedding, layer 0, 1, ..., ln_f, head; a
  shard holds at most max_shard_bytes unless one tensor is larger."""
  groups: list[list[tuple]] = [[]]
  size = 0
  for e in entries:
    n = int(np.prod(e[1])) * e[2].itemsize
    if groups[-1] and size + n > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(e)
    size += n
  return groups


def _write_shards(path: str, files: Sequence[str], groups: Sequence[list[tuple]],
                  get: Callable[[str], np.ndarray], writer: bool) -> tuple[dict[str, str], int]:
  """Writes each group's shard file (writer only; the other processes still fetch every tensor
  to join its all-gathers) -> (HF name -> file, total bytes)."""
  weight_map = {}
  total = 0
  for file, group in zip(files, groups):
    if writer:
      write_safetensors(os.path.join(path, file), group, get, metadata={"format": "pt"})
    else:
      for name, _, _ in group:  # everyone joins the all-gathers
        get(name)
    for name, shape, dt in group:
      weight_map[name] = file
      total += int(np.prod(shape)) * dt.itemsize
  return weight_map, total


def _write_index_and_config(path: str, config, weight_map: dict[str, str], total: int,
                            saved: set) -> None:
  """model.safetensors.index.json and config.json (torch_dtype = the files' dtype when they hold
  one, `saved` being the set of dtypes written)."""
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total},
               "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.write("\n")
  hf = config.to_hf_dict()
  if len(saved) == 1:
    hf["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                         np.dtype(np.float64): "float64"}.get(saved.pop(), "bfloat16")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
    f.write("\n")


def save(config: llada.LLaDAConfig, params: dict[str, Any], path: str | os.PathLike, *,
         max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> list[str]:
  """Exports params as an HF LLaDA or Dream checkpoint dir (the config's family); returns the
  shard file names.

  Writes model-0000i-of-0000N.safetensors (at most max_shard_bytes each, unless one tensor is
  larger), model.safetensors.index.json (metadata.total_size, weight_map) and config.json
  (config.to_hf_dict(), original extra keys kept). dtype: tensor dtype in the files (None = the
  params' dtype). Multi-process: every process must call it; process 0 writes. A URI path
  (gs://, s3://, ... through etils.epath) is written locally first, then copied up.
  """
  path = os.fspath(path)
  if "://" in path:  # write locally, then copy the folder up through epath
    local = tempfile.mkdtemp(prefix="bgpo_hf_")
    files = save(config, params, local, max_shard_bytes=max_shard_bytes, dtype=dtype)
    if jax.process_index() == 0:
      from bgpo_jax.checkpoint import copy_tree
      copy_tree(local, path)
    return files
  tmap = hf_tensor_map(config)
  entries = _save_entries(config, params, tmap, dtype)
  groups = _shard_groups(entries, max_shard_bytes)
  n_shards = len(groups)
  files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
  dtypes = {e[0]: e[2] for e in entries}

  def get(name: str) -> np.ndarray:
    keys, layer, transposed = tmap[name]
    return _to_host(_fetch(_get(params, keys), None if layer is None else jnp.int32(layer),
                           transposed=transposed, dtype=dtypes[name]))

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  weight_map, total = _write_shards(path, files, groups, get, writer)
  if writer:
    _write_index_and_config(path, config, weight_map, total, {e[2] for e in entries})
  return files


def iter_hf_tensors(config: llada.LLaDAConfig, params: dict[str, Any]) -> Iterable[tuple[str, jax.Array]]:
  """(HF name, tensor in HF layout) pairs, lazily (for custom exporters / comparisons)."""
  for name, (keys, layer, transposed) in hf_tensor_map(config).items():
    x = _get(params, keys)
    if layer is not None:
      x = x[layer]
    yield name, (x.T if transposed else x)
