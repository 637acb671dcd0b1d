"""Dream: logits vs an independent float64 NumPy forward written from the HF tensor names, the
HF round trip (bit-exact), the reference checkpoint's names and shapes, config round trip."""

import dataclasses
import filecmp
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bgpo_jax.models import dream, family, hf, llada

REF = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "dream-v0-instruct-7b")
needs_ref = pytest.mark.skipif(not os.path.isdir(REF), reason=f"reference files not found at {REF} (../shared absent)")


def _cfg(**kw):
  base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=64,
              rope_theta=1000.0, rms_norm_eps=1e-6, max_sequence_length=64, mask_token_id=63,
              eos_token_id=0, pad_token_id=0, bos_token_id=1)
  return dream.DreamConfig(**{**base, **kw})


def _random_params(cfg, seed=0):
  """init_params, then biases and norm weights randomized too (init sets them to 0 / 1)."""
  params = dream.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  blocks = dict(params["blocks"])
  for k in ("q_bias", "k_bias", "v_bias"):
    blocks[k] = jnp.asarray(rng.normal(0, 0.5, blocks[k].shape), blocks[k].dtype)
  for k in ("attn_norm", "ff_norm"):
    blocks[k] = jnp.asarray(1 + rng.normal(0, 0.2, blocks[k].shape), blocks[k].dtype)
  params = dict(params, blocks=blocks)
  params["ln_f"] = jnp.asarray(1 + rng.normal(0, 0.2, params["ln_f"].shape), params["ln_f"].dtype)
  # Larger weights than 0.02 so that attention is far from uniform and every term shows.
  for k in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
    blocks[k] = blocks[k] * 10.0
  params["wte"] = params["wte"] * 30.0
  params["ff_out"] = params["ff_out"] * 10.0
  return params


def _hf_tensors(cfg, params):
  return {name: np.asarray(t, np.float64) for name, t in hf.iter_hf_tensors(cfg, params)}


def numpy_dream_logits(t, cfg, tokens, attention_mask, shift=True):
  """Dream's reference forward in float64 from HF tensors `t` (name -> [out, in] arrays): Qwen2
  blocks without a causal mask, position ids cumsum(mask) - 1 (pads 1) as Dream's generation,
  padded keys masked, GQA by repeating kv heads, shifted logits."""
  B, S = tokens.shape
  H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
  eps = cfg.rms_norm_eps

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

  pos = np.cumsum(attention_mask, axis=-1) - 1
  pos[attention_mask == 0] = 1
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[..., None] * inv  # [B, S, hd/2]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [B, h, S, hd]
    rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]

  x = t["model.embed_tokens.weight"][tokens]
  for i in range(cfg.n_layers):
    g = lambda n: t[f"model.layers.{i}.{n}"]
    h = norm(x, g("input_layernorm.weight"))
    q = (h @ g("self_attn.q_proj.weight").T + g("self_attn.q_proj.bias")).reshape(B, S, H, hd).transpose(0, 2, 1, 3)
    k = (h @ g("self_attn.k_proj.weight").T + g("self_attn.k_proj.bias")).reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
    v = (h @ g("self_attn.v_proj.weight").T + g("self_attn.v_proj.bias")).reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(attention_mask[:, None, None, :] != 0, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B, S, H * hd)
    x = x + o @ g("self_attn.o_proj.weight").T
    h = norm(x, g("post_attention_layernorm.weight"))
    gate, up = h @ g("mlp.gate_proj.weight").T, h @ g("mlp.up_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ g("mlp.down_proj.weight").T
  logits = norm(x, t["model.norm.weight"]) @ t["lm_head.weight"].T
  return np.concatenate([logits[:, :1], logits[:, :-1]], axis=1) if shift else logits


def test_logits_match_independent_numpy_forward_with_left_padding_and_shift():
  cfg = _cfg()
  params = _random_params(cfg)
  rng = np.random.default_rng(1)
  B, S = 3, 10
  tokens = rng.integers(2, cfg.vocab_size - 1, (B, S)).astype(np.int32)
  attn = np.ones((B, S), np.int32)
  attn[1, :3] = 0  # left padding
  attn[2, :1] = 0
  tokens[attn == 0] = cfg.pad_token_id
  ours = np.asarray(jax.jit(lambda p, x, m: dream.forward(cfg, p, x, m))(params, tokens, attn))
  ref = numpy_dream_logits(_hf_tensors(cfg, params), cfg, tokens, attn)
  assert ours.shape == (B, S, cfg.vocab_size)
  # Compare where the predicting position (i - 1, or 0 for i = 0) is a real token.
  src = np.maximum(np.arange(S) - 1, 0)
  real = attn[:, src] != 0
  np.testing.assert_allclose(ours[real], ref[real], rtol=2e-4, atol=2e-4)
  assert np.abs(ref[real]).max() > 1.0  # not a vacuous comparison
  # The shift is real: the unshifted reference (position i scored from its own output) differs.
  unshifted = numpy_dream_logits(_hf_tensors(cfg, params), cfg, tokens, attn, shift=False)
  assert np.abs(ours[0, 1:] - unshifted[0, 1:]).max() > 1e-2
  np.testing.assert_allclose(ours[0, 1:], unshifted[0, :-1], rtol=2e-4, atol=2e-4)


def test_biases_are_used_and_gqa_groups_map_to_their_kv_head():
  cfg = _cfg()
  params = _random_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(2, 60, (2, 7)), jnp.int32)
  base = dream.forward(cfg, params, tokens)
  for k in ("q_bias", "k_bias", "v_bias"):
    p = jax.tree.map(lambda x: x, params)
    p["blocks"] = dict(p["blocks"], **{k: p["blocks"][k] * 0})
    assert float(jnp.abs(dream.forward(cfg, p, tokens) - base).max()) > 1e-3, k


def test_remat_scan_unroll_and_bf16_compute_keep_the_logits():
  cfg = _cfg()
  params = _random_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(2, 60, (2, 8)), jnp.int32)
  ref = dream.forward(cfg, params, tokens)
  for kw in (dict(remat_policy="full"), dict(remat_policy="save_attn", scan_unroll=2), dict(remat_policy="activations")):
    c = dataclasses.replace(cfg, **kw)
    np.testing.assert_allclose(jax.jit(lambda p: dream.forward(c, p, tokens))(params), ref, rtol=1e-5, atol=1e-5)
  bf = dataclasses.replace(cfg, compute_dtype="bfloat16")
  got = dream.forward(bf, params, tokens)
  assert got.dtype == jnp.float32
  assert float(jnp.abs(got - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_init_params_shapes_axes_and_counts():
  cfg = dream.DreamConfig.preset("tiny")
  params = dream.init_params(cfg, jax.random.key(0))
  shapes = dream.param_shapes(cfg)
  axes = dream.param_logical_axes(cfg)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in flat_p:
    keys = tuple(p.key for p in path)
    s, a = shapes, axes
    for k in keys:
      s, a = s[k], a[k]
    assert tuple(x.shape) == tuple(s) and len(a) == x.ndim, (keys, x.shape, s, a)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert float(jnp.abs(params["blocks"]["q_bias"]).max()) == 0.0  # Dream's reference init: zero biases
  assert float(params["blocks"]["attn_norm"].min()) == 1.0
  assert family.module_for(cfg) is dream and family.module_for(llada.LLaDAConfig.preset("tiny")) is llada
  # Every logical name has a rule of the shared table (so LLaDA's sharding applies).
  from bgpo_jax.models.sharding import DEFAULT_LOGICAL_RULES
  names = {n for a in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)) for n in a}
  assert names <= {r for r, _ in DEFAULT_LOGICAL_RULES}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_is_bit_exact(tmp_path, dtype):
  cfg = _cfg(param_dtype=dtype)
  params = _random_params(cfg)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  a, b = tmp_path / "a", tmp_path / "b"
  files = hf.save(cfg, params, a, max_shard_bytes=20_000)
  assert len(files) > 1  # sharded
  index = json.loads((a / hf.INDEX_FILE).read_text())
  assert set(index["weight_map"]) == set(dream.hf_tensor_map(cfg))
  hf_cfg = json.loads((a / "config.json").read_text())
  assert hf_cfg["model_type"] == "Dream" and hf_cfg["torch_dtype"] == dtype
  cfg2, params2 = hf.load(a, dtype=None)
  assert isinstance(cfg2, dream.DreamConfig)
  assert cfg2 == dataclasses.replace(cfg, compute_dtype=dtype)  # compute dtype follows torch_dtype
  jax.tree.map(lambda x, y: (np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)),
                             None)[1], params, params2)
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  hf.save(cfg2, params2, b, max_shard_bytes=20_000)
  for f in files + [hf.INDEX_FILE, "config.json"]:
    assert filecmp.cmp(a / f, b / f, shallow=False), f
  # And HF layout: q_proj.weight is [out, in] = our q_proj transposed; biases as stored.
  from safetensors.numpy import load_file
  stored = {}
  for f in files:
    stored.update(load_file(str(a / f)))
  np.testing.assert_array_equal(stored["model.layers.1.self_attn.q_proj.weight"],
                                np.asarray(params["blocks"]["q_proj"][1]).T)
  np.testing.assert_array_equal(stored["model.layers.0.self_attn.k_proj.bias"],
                                np.asarray(params["blocks"]["k_bias"][0]))
  np.testing.assert_array_equal(stored["lm_head.weight"], np.asarray(params["ff_out"]).T)


def test_load_rejects_a_checkpoint_with_a_missing_bias(tmp_path):
  cfg = _cfg()
  params = _random_params(cfg)
  hf.save(cfg, params, tmp_path)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  del index["weight_map"]["model.layers.1.self_attn.v_proj.bias"]
  (tmp_path / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(hf.CheckpointError, match="model.layers.1.self_attn.v_proj.bias"):
    hf.load(tmp_path)


def test_from_hf_rejects_unsupported_features():
  hf_cfg = _cfg().to_hf_dict()
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    dream.DreamConfig.from_hf(dict(hf_cfg, tie_word_embeddings=True))
  with pytest.raises(ValueError, match="not a known family"):
    family.config_from_hf(dict(hf_cfg, model_type="qwen2"))
  assert isinstance(family.config_from_hf(llada.LLaDAConfig.preset("tiny").to_hf_dict()), llada.LLaDAConfig)


@needs_ref
def test_reference_config_round_trips_and_is_the_preset():
  with open(os.path.join(REF, "config.json")) as f:
    ref = json.load(f)
  cfg = family.config_from_hf(REF)
  assert isinstance(cfg, dream.DreamConfig)
  assert cfg == dream.DreamConfig.preset("dream_7b")
  assert cfg.to_hf_dict() == ref  # every key written back, same values
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.rope_theta) == (28, 4, 128, 1e-6, 1e6)
  assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (152064, 151666, 151643, 151643)


@needs_ref
def test_every_reference_tensor_maps_with_the_right_shape():
  with open(os.path.join(REF, "model.safetensors.index.json")) as f:
    index = json.load(f)
  with open(os.path.join(REF, "config.json")) as f:
    c = json.load(f)
  cfg = family.config_from_hf(REF)
  tmap = hf.hf_tensor_map(cfg)
  assert set(index["weight_map"]) == set(tmap)  # no tensor missing, none extra
  # Expected HF shapes written from the config's numbers (torch Linear: [out, in]).
  D, I, V, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  want = {"embed_tokens.weight": (V, D), "norm.weight": (D,), "lm_head.weight": (V, D),
          "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
          "q_proj.weight": (q, D), "q_proj.bias": (q,), "k_proj.weight": (kv, D), "k_proj.bias": (kv,),
          "v_proj.weight": (kv, D), "v_proj.bias": (kv,), "o_proj.weight": (D, q),
          "gate_proj.weight": (I, D), "up_proj.weight": (I, D), "down_proj.weight": (D, I)}
  abstract = jax.eval_shape(lambda: dream.init_params(cfg, jax.random.key(0)))
  total = 0
  for name in index["weight_map"]:
    short = ".".join(name.split(".")[-2:])
    assert hf.hf_shape(cfg, name) == want[short], name
    keys, layer, transposed = tmap[name]
    leaf = abstract
    for k in keys:
      leaf = leaf[k]
    shape = leaf.shape[1:] if layer is not None else leaf.shape
    assert (tuple(reversed(shape)) if transposed else tuple(shape)) == want[short], name
    total += int(np.prod(want[short])) * 2  # bf16 bytes
  assert total == index["metadata"]["total_size"] == cfg.num_params() * 2
