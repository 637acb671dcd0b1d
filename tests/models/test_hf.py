"""HF checkpoint import/export: layout, bit-exact round trip, errors, the real 8B tensor index."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from bgpo_jax.models import hf, llada
from bgpo_jax.models.sharding import logical_to_sharding, make_mesh

SHARED = Path(__file__).resolve().parents[3] / "shared"
REF = SHARED / "reference" / "llada-8b-instruct"

# Tiny, GQA (4 heads, 2 kv heads), 2 layers: keeps every test well under a second.
CONFIG = llada.LLaDAConfig.preset("tiny", n_layers=2, d_model=64, mlp_hidden_size=96)


def _hf_tensors(config: llada.LLaDAConfig, dtype, seed=0) -> dict[str, np.ndarray]:
  """Random tensors in HF naming and [out, in] layout, written independently of hf.py."""
  rng = np.random.default_rng(seed)
  d, m, v = config.d_model, config.mlp_hidden_size, config.embedding_size
  hd = config.head_dim
  q, kv = config.n_heads * hd, config.n_kv_heads * hd
  shapes = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
            "model.transformer.ff_out.weight": (v, d)}
  for i in range(config.n_layers):
    b = f"model.transformer.blocks.{i}."
    shapes.update({b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,),
                   b + "q_proj.weight": (q, d), b + "k_proj.weight": (kv, d),
                   b + "v_proj.weight": (kv, d), b + "attn_out.weight": (d, q),
                   b + "ff_proj.weight": (m, d), b + "up_proj.weight": (m, d),
                   b + "ff_out.weight": (d, m)})
  return {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}


def _write_hf(path: Path, config: llada.LLaDAConfig, tensors: dict[str, np.ndarray],
              n_files: int = 3, hf_config: dict | None = None, single: bool = False) -> None:
  path.mkdir(parents=True, exist_ok=True)
  cfg = config.to_hf_dict() if hf_config is None else hf_config
  cfg["torch_dtype"] = "bfloat16" if next(iter(tensors.values())).dtype == ml_dtypes.bfloat16 \
    else "float32"
  cfg["init_fn"] = "custom_marker"  # an extra key export must keep
  (path / "config.json").write_text(json.dumps(cfg))
  if single:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return
  names = sorted(tensors)
  weight_map = {}
  for j in range(n_files):
    file = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
    part = {k: tensors[k] for k in names[j::n_files]}
    save_file(part, str(path / file), metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  total = sum(t.nbytes for t in tensors.values())
  (path / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _expected_param(tensors, name, config):
  keys, layer, transposed = hf.hf_tensor_map(config)[name]
  t = tensors[name]
  return keys, layer, (t.T if transposed else t)


@pytest.mark.parametrize("dtype,single", [(ml_dtypes.bfloat16, False), (np.float32, True)])
def test_load_maps_every_tensor(tmp_path, dtype, single):
  tensors = _hf_tensors(CONFIG, dtype)
  _write_hf(tmp_path, CONFIG, tensors, single=single)
  config, params = hf.load(tmp_path, dtype=np.dtype(dtype))
  assert config == dataclasses.replace(CONFIG, param_dtype=np.dtype(dtype).name,
                                       compute_dtype=np.dtype(dtype).name)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    params, jax.eval_shape(functools.partial(llada.init_params, config), jax.random.key(0)))
  for name in tensors:
    keys, layer, want = _expected_param(tensors, name, config)
    got = params
    for k in keys:
      got = got[k]
    got = np.asarray(got if layer is None else got[layer])
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8),
                                  err_msg=name)


def test_load_casts_dtype(tmp_path):
  tensors = _hf_tensors(CONFIG, ml_dtypes.bfloat16)
  _write_hf(tmp_path, CONFIG, tensors)
  config, params = hf.load(tmp_path, dtype=jnp.float32, compute_dtype="float32")
  assert config.param_dtype == "float32" and params["wte"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(params["ff_out"]),
                                tensors["model.transformer.ff_out.weight"].T.astype(np.float32))


def test_save_round_trip_bit_exact(tmp_path):
  src, out1, out2 = tmp_path / "src", tmp_path / "out1", tmp_path / "out2"
  tensors = _hf_tensors(CONFIG, ml_dtypes.bfloat16, seed=1)
  _write_hf(src, CONFIG, tensors)
  config, params = hf.load(src)
  files = hf.save(config, params, out1, max_shard_bytes=40_000)
  assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  index = json.loads((out1 / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for name, file in index["weight_map"].items():
    with safe_open(str(out1 / file), framework="np") as f:
      got = f.get_tensor(name)
    assert got.dtype == ml_dtypes.bfloat16, name
    assert got.tobytes() == tensors[name].tobytes(), name
  cfg = json.loads((out1 / "config.json").read_text())
  assert cfg["init_fn"] == "custom_marker" and cfg["torch_dtype"] == "bfloat16"
  assert llada.LLaDAConfig.from_hf(cfg) == config
  # load(save(load(x))) saves to byte-identical files.
  config2, params2 = hf.load(out1)
  hf.save(config2, params2, out2, max_shard_bytes=40_000)
  assert sorted(os.listdir(out1)) == sorted(os.listdir(out2))
  for file in os.listdir(out1):
    assert (out1 / file).read_bytes() == (out2 / file).read_bytes(), file


def test_streaming_writer_matches_safetensors_library(tmp_path):
  arrays = {"b.weight": np.ones((3, 5), ml_dtypes.bfloat16), "a.weight": np.arange(7, dtype=np.float32),
            "c": np.full((2, 2), 3, ml_dtypes.bfloat16)}
  save_file(arrays, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
  hf.write_safetensors(str(tmp_path / "ours.safetensors"),
                       [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.__getitem__,
                       metadata={"format": "pt"})
  assert (tmp_path / "lib.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_load_errors_name_the_problem(tmp_path):
  tensors = _hf_tensors(CONFIG, np.float32)
  missing = dict(tensors)
  del missing["model.transformer.blocks.1.k_proj.weight"]
  _write_hf(tmp_path / "missing", CONFIG, missing)
  with pytest.raises(hf.CheckpointError, match=r"1 missing tensors: model\.transformer\.blocks\.1\.k_proj"):
    hf.load(tmp_path / "missing")

  extra = dict(tensors, **{"model.transformer.rotary.inv_freq": np.ones(4, np.float32)})
  _write_hf(tmp_path / "extra", CONFIG, extra)
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensors.*rotary\.inv_freq"):
    hf.load(tmp_path / "extra")
  hf.load(tmp_path / "extra", strict=False)  # ignorable

  bad = dict(tensors)
  bad["model.transformer.blocks.0.up_proj.weight"] = np.ones((5, 64), np.float32)
  _write_hf(tmp_path / "shape", CONFIG, bad)
  with pytest.raises(hf.CheckpointError,
                     match=r"blocks\.0\.up_proj\.weight: wrong shape, expected \(96, 64\), got \(5, 64\)"):
    hf.load(tmp_path / "shape")

  cfg = dict(CONFIG.to_hf_dict(), alibi=True, weight_tying=True)
  _write_hf(tmp_path / "alibi", CONFIG, tensors, hf_config=cfg)
  with pytest.raises(ValueError, match=r"unsupported LLaDA config features: alibi=True.*weight_tying=True"):
    hf.load(tmp_path / "alibi")
  for key, value in [("include_bias", True), ("layer_norm_type", "default"),
                     ("activation_type", "gelu"), ("block_type", "sequential")]:
    with pytest.raises(ValueError, match=key):
      llada.LLaDAConfig.from_hf(dict(CONFIG.to_hf_dict(), **{key: value}))
  (tmp_path / "no_weights").mkdir()
  (tmp_path / "no_weights" / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
  with pytest.raises(FileNotFoundError, match="model.safetensors.index.json or model.safetensors"):
    hf.load(tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
    hf.load(tmp_path / "does_not_exist")


def test_load_onto_mesh(tmp_path):
  tensors = _hf_tensors(CONFIG, ml_dtypes.bfloat16)
  _write_hf(tmp_path, CONFIG, tensors)
  mesh = make_mesh()
  config, params = hf.load(tmp_path, mesh=mesh)
  want = logical_to_sharding(llada.param_logical_axes(config), mesh,
                             shapes=llada.param_shapes(config))
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  _, plain = hf.load(tmp_path)
  chex.assert_trees_all_equal(params, plain)


def test_loaded_checkpoint_forward_matches_init_params(tmp_path):
  """Exporting random init params and importing them gives the same logits."""
  config = dataclasses.replace(CONFIG, param_dtype="float32", compute_dtype="float32")
  params = llada.init_params(config, jax.random.key(3))
  hf.save(config, params, tmp_path)
  config2, params2 = hf.load(tmp_path, dtype=jnp.float32)
  assert config2 == config
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  fwd = jax.jit(llada.forward, static_argnums=0)
  chex.assert_trees_all_equal(fwd(config, params, tokens), fwd(config2, params2, tokens))


def test_llada_8b_tensor_index_maps_onto_param_tree():
  if not REF.exists():
    pytest.skip(f"shared reference dir {REF} not present")
  config = llada.LLaDAConfig.from_hf(REF)
  # The architecture is the preset's; logits_chunk is a runtime knob the preset sets (HF: none).
  assert config == llada.LLaDAConfig.preset("llada_8b", logits_chunk=config.logits_chunk)
  index = json.loads((REF / "model.safetensors.index.json").read_text())
  names = set(index["weight_map"])
  assert len(names) == 291
  assert names == set(hf.hf_tensor_map(config))
  abstract = jax.eval_shape(functools.partial(llada.init_params, config), jax.random.key(0))
  total = 0
  for name in names:
    keys, layer, transposed = hf.hf_tensor_map(config)[name]
    leaf = abstract
    for k in keys:
      leaf = leaf[k]
    assert leaf.dtype == jnp.bfloat16
    shape = leaf.shape[1:] if layer is not None else leaf.shape
    shape = tuple(reversed(shape)) if transposed else tuple(shape)
    assert shape == hf.hf_shape(config, name), name
    total += int(np.prod(shape)) * 2
  assert total == index["metadata"]["total_size"]
  assert config.num_params() * 2 == total
