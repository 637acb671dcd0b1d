"""LLaDA forward vs an independent float64 NumPy forward; padding, remat, bf16, config, sharding."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bgpo_jax.models import attention, llada
from bgpo_jax.models.sharding import logical_to_sharding, logical_to_spec, make_mesh

BASE = llada.LLaDAConfig.preset("tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                mlp_hidden_size=48, init_std=0.2)
FWD = jax.jit(llada.forward, static_argnums=0)


def _params(config, seed=0):
  """Random params with non-trivial norm weights (ones would hide a missing weight multiply)."""
  p = llada.init_params(config, jax.random.key(seed))
  k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
  p["blocks"]["attn_norm"] = 1 + 0.3 * jax.random.normal(k1, p["blocks"]["attn_norm"].shape)
  p["blocks"]["ff_norm"] = 1 + 0.3 * jax.random.normal(k2, p["blocks"]["ff_norm"].shape)
  p["ln_f"] = 1 + 0.3 * jax.random.normal(k3, p["ln_f"].shape)
  return jax.tree.map(lambda x: x.astype(config.param_jnp_dtype), p)


def _np_forward(config: llada.LLaDAConfig, params, tokens, mask=None) -> np.ndarray:
  """Reference forward in float64, written from SPEC section 1 (HF [out, in] reasoning aside)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  tokens = np.asarray(tokens)
  B, S = tokens.shape
  H, KV, hd = config.n_heads, config.n_kv_heads, config.d_model // config.n_heads
  eps = config.rms_norm_eps

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

  def rope(x):  # x [B,S,h,hd]; rotate-half with frequencies repeated over the two halves
    inv = config.rope_theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(S)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))[None, :, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  x = p["wte"][tokens]
  for layer in range(config.n_layers):
    w = {k: v[layer] for k, v in p["blocks"].items()}
    n = rms(x, w["attn_norm"])
    q = rope((n @ w["q_proj"]).reshape(B, S, H, hd))
    k = rope((n @ w["k_proj"]).reshape(B, S, KV, hd))
    v = (n @ w["v_proj"]).reshape(B, S, KV, hd)
    k = np.repeat(k, H // KV, axis=2)  # query head h reads kv head h // (H / KV)
    v = np.repeat(v, H // KV, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    if mask is not None:
      s = np.where(np.asarray(mask)[:, None, None, :] > 0, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, S, H * hd)
    x = x + ctx @ w["attn_out"]
    m = rms(x, w["ff_norm"])
    g = m @ w["ff_proj"]
    x = x + (g / (1 + np.exp(-g)) * (m @ w["up_proj"])) @ w["ff_out"]
  return rms(x, p["ln_f"]) @ p["ff_out"]


def _tokens(B, S, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, S)), jnp.int32)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_forward_matches_float64_numpy(n_kv_heads):
  config = dataclasses.replace(BASE, n_kv_heads=n_kv_heads)
  params = _params(config)
  tokens = _tokens(3, 10, config.vocab_size)
  mask = jnp.ones((3, 10), jnp.int32).at[1, :4].set(0).at[2, :1].set(0)  # left padding
  got = FWD(config, params, tokens, mask)
  assert got.dtype == jnp.float32
  chex.assert_shape(got, (3, 10, config.vocab_size))
  want = _np_forward(config, params, tokens, mask)
  assert np.abs(want).max() > 1.0  # the comparison is not trivially small
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(FWD(config, params, tokens)),
                             _np_forward(config, params, tokens), rtol=2e-5, atol=2e-5)


def test_left_padding_leaves_real_positions_unchanged():
  config = BASE
  params = _params(config, seed=1)
  real = _tokens(1, 7, config.vocab_size, seed=1)
  alone = FWD(config, params, real)
  for pad_id in (config.pad_token_id, 17):
    padded = jnp.concatenate([jnp.full((1, 5), pad_id, jnp.int32), real], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 7), jnp.int32)], axis=1)
    got = FWD(config, params, padded, mask)
    np.testing.assert_allclose(np.asarray(got[:, 5:]), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_fully_padded_row_is_finite():
  params = _params(BASE)
  tokens = _tokens(2, 6, BASE.vocab_size)
  mask = jnp.zeros((2, 6), jnp.int32).at[1].set(1)
  out = FWD(BASE, params, tokens, mask)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(FWD(BASE, params, tokens[1:])[0]),
                             rtol=1e-5, atol=1e-5)


def test_hidden_states_then_lm_head_is_forward():
  params = _params(BASE)
  tokens = _tokens(2, 5, BASE.vocab_size)
  h = jax.jit(llada.hidden_states, static_argnums=0)(BASE, params, tokens, None)
  chex.assert_shape(h, (2, 5, BASE.d_model))
  assert h.dtype == jnp.float32
  # The head on a subset of positions (as the ELBO does on response tokens only).
  chex.assert_trees_all_close(llada.lm_head(BASE, params, h[:, 2:]), FWD(BASE, params, tokens)[:, 2:],
                              rtol=1e-6, atol=1e-6)


def test_embedding_rows_beyond_vocab_are_not_logits():
  config = dataclasses.replace(BASE, vocab_size=120)  # embedding_size stays 128
  params = _params(config)
  assert params["wte"].shape[0] == 128
  out = FWD(config, params, _tokens(1, 4, 120))
  chex.assert_shape(out, (1, 4, 120))


def _loss(config, params, tokens, mask):
  return jnp.mean(jax.nn.log_softmax(llada.forward(config, params, tokens, mask))[..., 3])


GRAD = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("policy", ["full", "save_attn", "activations"])
def test_remat_same_logits_and_grads(policy):
  params = _params(BASE)
  tokens = _tokens(2, 8, BASE.vocab_size)
  mask = jnp.ones((2, 8), jnp.int32).at[0, :2].set(0)
  remat = dataclasses.replace(BASE, remat_policy=policy)
  v0, g0 = GRAD(BASE, params, tokens, mask)  # compiled once for both policies
  v1, g1 = GRAD(remat, params, tokens, mask)
  chex.assert_trees_all_close(v1, v0, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g0["blocks"]["q_proj"]).max()) > 0


def test_activations_remat_recomputes_no_matmul():
  # remat_policy="activations" (the task configs' choice) saves what each block's backward reads:
  # its gradient has as many matmuls as plain autodiff's ("none"); "full" recomputes the forward.
  params = _params(BASE)
  tokens = _tokens(2, 8, BASE.vocab_size)
  mask = jnp.ones((2, 8), jnp.int32).at[0, :2].set(0)

  def dots(policy):
    config = dataclasses.replace(BASE, remat_policy=policy, attention_impl="bmm")
    grad = jax.value_and_grad(lambda p: _loss(config, p, tokens, mask))
    return str(jax.make_jaxpr(grad)(params)).count("dot_general")

  none, activations, full = dots("none"), dots("activations"), dots("full")
  assert activations == none < full, (none, activations, full)


def test_unrolled_layer_scan_same_logits_and_grads():
  params = _params(BASE)
  tokens = _tokens(2, 8, BASE.vocab_size)
  mask = jnp.ones((2, 8), jnp.int32).at[1, :3].set(0)
  unrolled = dataclasses.replace(BASE, scan_unroll=BASE.n_layers)
  v0, g0 = GRAD(BASE, params, tokens, mask)
  v1, g1 = GRAD(unrolled, params, tokens, mask)
  chex.assert_trees_all_close(v1, v0, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="scan_unroll 0 must be >= 1"):
    dataclasses.replace(BASE, scan_unroll=0)


def test_bfloat16_compute_is_close():
  params = _params(BASE)
  tokens = _tokens(2, 8, BASE.vocab_size)
  ref = FWD(BASE, params, tokens)
  config = dataclasses.replace(BASE, compute_dtype="bfloat16", param_dtype="bfloat16")
  p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = FWD(config, p, tokens)
  assert out.dtype == jnp.float32
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < err < 0.05, err
  # float32 params, bfloat16 compute: dtypes only (eval_shape, no compile).
  mixed = dataclasses.replace(BASE, compute_dtype="bfloat16")
  hidden = jax.eval_shape(functools.partial(llada.hidden_states, mixed), params, tokens)
  assert hidden.dtype == jnp.bfloat16
  assert jax.eval_shape(functools.partial(llada.forward, mixed), params, tokens).dtype == jnp.float32


def test_config_presets_and_validation():
  tiny = llada.LLaDAConfig.preset("tiny")
  assert 0.8e6 < tiny.num_params() < 1.3e6 and tiny.vocab_size == 128
  small = llada.LLaDAConfig.preset("small")
  assert 0.9e8 < small.num_params() < 1.5e8
  big = llada.LLaDAConfig.preset("llada_8b")
  assert (big.d_model, big.n_layers, big.n_heads, big.n_kv_heads, big.mlp_hidden_size,
          big.vocab_size, big.mask_token_id, big.eos_token_id) == (
          4096, 32, 32, 32, 12288, 126464, 126336, 126081)
  assert hash(tiny) == hash(llada.LLaDAConfig.preset("tiny"))
  assert llada.LLaDAConfig.from_hf(tiny.to_hf_dict(), param_dtype="float32") == tiny
  with pytest.raises(ValueError, match="d_model 100 is not a multiple of n_heads 3"):
    dataclasses.replace(tiny, d_model=100, n_heads=3)
  with pytest.raises(ValueError, match="n_heads 4 is not a multiple of n_kv_heads 3"):
    dataclasses.replace(tiny, n_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy 'bogus'"):
    dataclasses.replace(tiny, remat_policy="bogus")
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    llada.LLaDAConfig.preset("huge")


def test_param_logical_axes_match_params():
  config = llada.LLaDAConfig.preset("tiny")
  shapes = jax.eval_shape(functools.partial(llada.init_params, config), jax.random.key(0))
  axes = llada.param_logical_axes(config)
  is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(shapes)
  for a, s in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(shapes)):
    assert len(a) == s.ndim
  params = llada.init_params(config, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(params["ln_f"]), np.ones(config.d_model))
  assert 0.015 < float(jnp.std(params["blocks"]["ff_proj"])) < 0.025


def test_logical_to_spec_rules():
  mesh = make_mesh()  # 1 device: everything replicated
  assert logical_to_spec(("layers", "embed", "heads"), mesh) == PartitionSpec(None, None, None)

  class FakeMesh:  # only .shape is read by logical_to_spec
    shape = {"data": 2, "fsdp": 4, "tensor": 2}

  m = FakeMesh()
  assert logical_to_spec(("layers", "embed", "heads"), m) == PartitionSpec(None, "fsdp", "tensor")
  assert logical_to_spec(("vocab", "embed"), m) == PartitionSpec("tensor", "fsdp")
  assert logical_to_spec(("batch", "seq"), m) == PartitionSpec(("data", "fsdp"), None)
  # kv_heads 6 not divisible by tensor=4 -> replicated; a mesh axis is never used twice.
  m.shape = {"fsdp": 2, "tensor": 4}
  assert logical_to_spec(("embed", "kv_heads"), m, shape=(8, 6)) == PartitionSpec("fsdp", None)
  assert logical_to_spec(("heads", "mlp"), m) == PartitionSpec("tensor", None)
  with pytest.raises(ValueError, match="logical axis 'nope' has no sharding rule"):
    logical_to_spec(("nope",), m)
  tree = logical_to_sharding(llada.param_logical_axes(BASE), mesh)
  assert tree["blocks"]["q_proj"].spec == PartitionSpec(None, None, None)


# --- attention implementations: every one agrees with the original grouped einsum
# ("xla", the previous implementation's math, kept selectable) in float32 on logits and on every
# parameter gradient, with left padding and a fully padded row.

def _mixed_loss(config, params, tokens, mask):
  # Touches every logit (the [..., 3] column alone would leave most head rows without gradient).
  logits = llada.forward(config, params, tokens, mask)
  return jnp.mean(jax.nn.log_softmax(logits) * jnp.cos(jnp.arange(logits.shape[-1]))) + jnp.mean(logits ** 2)


MIXED_GRAD = jax.jit(jax.value_and_grad(_mixed_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
@pytest.mark.parametrize("impl", ["bmm", "jax"])
def test_attention_impl_matches_einsum(impl, n_kv_heads):
  ref_cfg = dataclasses.replace(BASE, n_kv_heads=n_kv_heads, attention_impl="xla")
  cfg = dataclasses.replace(ref_cfg, attention_impl=impl)
  params = _params(ref_cfg, seed=3)
  tokens = _tokens(3, 9, BASE.vocab_size, seed=3)
  mask = jnp.ones((3, 9), jnp.int32).at[1, :4].set(0).at[2].set(0)  # left padding; all-pad row
  chex.assert_trees_all_close(FWD(cfg, params, tokens, mask), FWD(ref_cfg, params, tokens, mask),
                              rtol=1e-5, atol=1e-5)
  v0, g0 = MIXED_GRAD(ref_cfg, params, tokens, mask)
  v1, g1 = MIXED_GRAD(cfg, params, tokens, mask)
  chex.assert_trees_all_close(v1, v0, rtol=1e-6, atol=1e-6)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    scale = float(jnp.abs(a).max())
    assert scale > 0, path  # every parameter gets a gradient
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale, err_msg=str(path[0]))


def _previous_forward(config, params, tokens, mask):
  """The model as first implemented, in float32 JAX, differentiated by JAX's autodiff:
  grouped-einsum attention with a where-masked softmax, concatenate RoPE, SwiGLU as written."""
  B, S = tokens.shape
  H, KV, hd, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.rms_norm_eps

  def rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps) * w

  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  ang = jnp.arange(S, dtype=jnp.float32)[:, None] * inv[None]
  cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))

  def rope(x):
    rot = jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]

  def block(x, w):
    n = rms(x, w["attn_norm"])
    q = rope((n @ w["q_proj"]).reshape(B, S, H, hd)).reshape(B, S, KV, H // KV, hd)
    k = rope((n @ w["k_proj"]).reshape(B, S, KV, hd))
    v = (n @ w["v_proj"]).reshape(B, S, KV, hd)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / np.sqrt(hd)
    s = jnp.where(mask.astype(bool)[:, None, None, None, :], s, jnp.finfo(jnp.float32).min)
    ctx = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(s, -1), v).reshape(B, S, H * hd)
    x = x + ctx @ w["attn_out"]
    m = rms(x, w["ff_norm"])
    return x + (jax.nn.silu(m @ w["ff_proj"]) * (m @ w["up_proj"])) @ w["ff_out"], None

  x, _ = jax.lax.scan(block, params["wte"][tokens], params["blocks"])
  return rms(x, params["ln_f"]) @ params["ff_out"]


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_logits_and_grads_equal_previous_implementation(n_kv_heads):
  # Logits and every parameter gradient of today's model (auto attention = bmm on CPU, custom
  # MLP / attention backward, per-half RoPE) against the previous implementation's math.
  config = dataclasses.replace(BASE, n_kv_heads=n_kv_heads)
  params = _params(config, seed=5)
  tokens = _tokens(3, 9, BASE.vocab_size, seed=5)
  mask = jnp.ones((3, 9), jnp.int32).at[1, :4].set(0).at[2, :1].set(0)

  def loss(fwd, p):
    logits = fwd(p)
    return jnp.mean(jax.nn.log_softmax(logits) * jnp.cos(jnp.arange(logits.shape[-1]))) + jnp.mean(logits ** 2)

  new = lambda p: llada.forward(config, p, tokens, mask)  # noqa: E731
  old = lambda p: _previous_forward(config, p, tokens, mask)  # noqa: E731
  (l1, g1), (l0, g0), y1, y0 = jax.jit(lambda p: (jax.value_and_grad(functools.partial(loss, new))(p),
                                                  jax.value_and_grad(functools.partial(loss, old))(p),
                                                  new(p), old(p)))(params)
  chex.assert_trees_all_close(y1, y0, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(l1, l0, rtol=1e-6, atol=1e-6)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    scale = float(jnp.abs(a).max())
    assert scale > 0, path
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale, err_msg=str(path[0]))


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_block_keeps_only_the_residuals_its_backward_needs(n_kv_heads, capsys):
  # What one block saves for its backward (the layer scan stacks it per layer): the input x, the
  # attention's q / k / v and output, ctx (attn_out's weight gradient), the mid-block residual
  # stream and the SwiGLU's gate / up. The norms, the flattened matmul inputs and the SwiGLU
  # product are recomputed (llada.norm_dense / swiglu_dense); plain autodiff kept 12
  # [B, S, D]-sized buffers and 3 [B, S, mlp]-sized ones here.
  config = dataclasses.replace(BASE, n_kv_heads=n_kv_heads, attention_impl="bmm")
  B, S, D, F = 2, 8, config.d_model, config.mlp_hidden_size
  params = _params(config, seed=2)
  p0 = jax.tree.map(lambda a: a[0], params["blocks"])
  cos, sin = llada.rope_tables(S, config.head_dim, config.rope_theta)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  key_mask = jnp.ones((B, S), bool).at[1, :3].set(False)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda p, x: llada._block(config, x, p, cos, sin, key_mask), p0, x)
  saved = capsys.readouterr().out.strip().splitlines()  # "f32[2,8,32] from the argument x", ...
  sizes = [int(np.prod([int(d) for d in line.split("[", 1)[1].split("]", 1)[0].split(",") if d]))
           for line in saved if "from the argument p" not in line]
  kv = B * S * n_kv_heads * config.head_dim
  # [B, S, D]: x, q, the attention output, ctx, the mid-block stream; k and v are [B, S, KV*hd].
  assert sizes.count(B * S * D) == (5 if kv != B * S * D else 7), saved
  assert sizes.count(kv) == (2 if kv != B * S * D else 7), saved
  assert sizes.count(B * S * F) == 2, saved  # gate, up (not silu(gate) * up)
  assert sum(sizes) <= 5 * B * S * D + 2 * kv + 2 * B * S * F + 8 * B * S + 4 * S * config.head_dim, saved


@pytest.mark.parametrize("step_elements", [1, 4 * 18 * 9])  # 1 or 3 of 6 (row, kv head) pairs
def test_bmm_looped_attention_matches_einsum(monkeypatch, step_elements):
  # The looped bmm attention (lax.map over groups of (row, kv head) pairs; the tests' tiny
  # shapes otherwise fit one group and run unlooped), GQA with padding and an all-pad row:
  # logits and every gradient against the einsum path. Fresh jits: the module-level ones may
  # hold a trace made with the default step size.
  monkeypatch.setattr(attention, "_BMM_STEP_ELEMENTS", step_elements)
  ref_cfg = dataclasses.replace(BASE, attention_impl="xla")
  cfg = dataclasses.replace(BASE, attention_impl="bmm")
  params = _params(cfg, seed=7)
  tokens = _tokens(3, 9, BASE.vocab_size, seed=7)
  mask = jnp.ones((3, 9), jnp.int32).at[1, :4].set(0).at[2].set(0)
  grad = lambda c: jax.jit(jax.value_and_grad(functools.partial(_mixed_loss, c)))(params, tokens, mask)  # noqa: E731
  hlo = jax.jit(functools.partial(llada.forward, cfg)).lower(params, tokens, mask).as_text()
  assert hlo.count("stablehlo.while") == 2  # the layer scan and, inside it, the attention's loop
  with monkeypatch.context() as m:  # an accelerator gets one batched matmul, no loop
    m.setattr(jax, "default_backend", lambda: "gpu")
    hlo = jax.jit(functools.partial(llada.forward, cfg)).lower(params, tokens, mask).as_text()
  assert hlo.count("stablehlo.while") == 1
  chex.assert_trees_all_close(jax.jit(functools.partial(llada.forward, cfg))(params, tokens, mask),
                              FWD(ref_cfg, params, tokens, mask), rtol=1e-5, atol=1e-5)
  (v0, g0), (v1, g1) = grad(ref_cfg), grad(cfg)
  chex.assert_trees_all_close(v1, v0, rtol=1e-6, atol=1e-6)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * float(jnp.abs(a).max()),
                               err_msg=str(path[0]))


def test_bmm_attention_bfloat16_close_to_einsum():
  ref_cfg = dataclasses.replace(BASE, compute_dtype="bfloat16", attention_impl="xla")
  cfg = dataclasses.replace(ref_cfg, attention_impl="bmm")
  params = _params(BASE)
  tokens = _tokens(2, 8, BASE.vocab_size)
  mask = jnp.ones((2, 8), jnp.int32).at[0, :3].set(0)
  (v0, g0), (v1, g1) = MIXED_GRAD(ref_cfg, params, tokens, mask), MIXED_GRAD(cfg, params, tokens, mask)
  assert abs(float(v1 - v0)) < 1e-2 * abs(float(v0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert float(jnp.linalg.norm(b - a)) < 0.05 * float(jnp.linalg.norm(a))


@pytest.mark.parametrize("S", [128, 72])  # the kernel's block; a length it pads up to 128
def test_splash_attention_interpreted_matches_einsum(S):
  # The Pallas TPU kernel runs in interpret mode on CPU: the key padding (segment ids), the
  # sequence padding and the GQA mapping are checked here; speed only on a TPU.
  cfg = dataclasses.replace(BASE, attention_impl="xla")
  B, H, KV, hd = 2, 4, 2, 32
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(B, S, h, hd)), jnp.float32) for h in (H, KV, KV))
  key_mask = jnp.ones((B, S), bool).at[1, :40].set(False)

  def out_and_grads(impl, mask):
    c = dataclasses.replace(cfg, attention_impl=impl)
    f = lambda q, k, v: llada._attention(c, q, k, v, mask)  # noqa: E731
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

  for mask in (key_mask, None):
    got, want = jax.jit(lambda: (out_and_grads("splash", mask), out_and_grads("xla", mask)))()
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=2e-5)


def test_key_length_attention_matches_einsum():
  # The cuDNN path's key padding: each row's real keys sorted first and masked by count
  # (kv_seqlen), for left padding and holes, GQA; run here through jax.nn's XLA implementation
  # (the same call with implementation="xla"). Rows without a real key only need to be finite.
  cfg = dataclasses.replace(BASE, attention_impl="xla")
  B, S, H, KV, hd = 4, 10, 4, 2, 8
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.normal(size=(B, S, h, hd)), jnp.float32) for h in (H, KV, KV))
  key_mask = jnp.ones((B, S), bool).at[1, :4].set(False).at[2, 3].set(False).at[2, 7].set(False).at[3].set(False)
  ref = lambda q, k, v: llada._attention(cfg, q, k, v, key_mask)[:3]  # noqa: E731
  got = lambda q, k, v: llada._key_length_attention(q, k, v, key_mask, hd ** -0.5, "xla")  # noqa: E731
  out = jax.jit(got)(q, k, v)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out[:3], jax.jit(ref)(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[:3]))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(jax.grad(loss(got), argnums=(0, 1, 2)))(q, k, v),
                              jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v), rtol=1e-5, atol=1e-6)
  window = q[:, 2:5]  # the cached sampler's queries: a window shorter than the keys
  chex.assert_trees_all_close(jax.jit(got)(window, k, v)[:3], jax.jit(ref)(window, k, v), rtol=1e-5, atol=1e-6)


def _saved_residual_lines(config, capsys, B=2, S=128):
  """print_saved_residuals of one block under remat_policy="activations" (left-padded keys)."""
  params = llada.init_params(config, jax.random.key(0))
  p0 = jax.tree.map(lambda a: a[0], params["blocks"])
  cos, sin = llada.rope_tables(S, config.head_dim, config.rope_theta)
  x = jnp.ones((B, S, config.d_model), config.compute_jnp_dtype)
  key_mask = jnp.ones((B, S), bool).at[1, :40].set(False)
  block = jax.checkpoint(lambda p, x: llada._block(config, x, p, cos, sin, key_mask),
                         policy=llada._REMAT_POLICIES["activations"])
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda p, x: jnp.sum(block(p, x).astype(jnp.float32)), p0, x)
  return capsys.readouterr().out.strip().splitlines()


def test_splash_residuals_saved_under_activations(capsys):
  # The task configs' remat_policy="activations" keeps the splash kernel's output and log-sum-exp
  # (named "attn_out"), so the backward runs no second forward kernel per layer (it did before).
  config = dataclasses.replace(BASE, attention_impl="splash", remat_policy="activations")
  B, S, H, hd = 2, 128, config.n_heads, config.head_dim
  saved = "\n".join(_saved_residual_lines(config, capsys, B, S))
  assert f"f32[{B},{H},{S},{hd}]" in saved and f"f32[{B},{H},{S}]" in saved, saved


def test_cudnn_attention_traces_with_key_padding_and_saves_its_residuals(monkeypatch, capsys):
  # cuDNN's kernel needs a GPU, but jax.nn checks its shapes while tracing: with the cuDNN
  # detection patched, the model's cuDNN path traces on CPU. A [B, 1, 1, S] bool mask failed
  # there ("Bias must have same seq length as QKV"), i.e. on every GPU with padded prompts;
  # the key counts pass. Under "activations" the kernel's context and softmax statistics are
  # saved (by primitive: they carry no name).
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)
  config = dataclasses.replace(BASE, d_model=64, attention_impl="cudnn", compute_dtype="bfloat16",
                               remat_policy="activations")
  B, S, H, hd = 2, 128, config.n_heads, config.head_dim
  params = llada.init_params(config, jax.random.key(0))
  tokens = _tokens(B, S, config.vocab_size)
  mask = jnp.ones((B, S), jnp.int32).at[0, :5].set(0)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(llada.forward(config, p, tokens, mask))))(params))
  assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr
  saved = _saved_residual_lines(config, capsys, B, S)
  # q and the kernel's context have the same shape; its softmax statistics are [B, H, S] float32.
  assert sum(line.startswith(f"bf16[{B},{S},{H},{hd}] ") for line in saved) == 2, saved
  assert any(line.startswith(f"f32[{B},{H},{S}] ") for line in saved), saved


def test_attention_impl_auto_per_platform():
  f32, bf16 = BASE, dataclasses.replace(BASE, compute_dtype="bfloat16")
  assert llada.attention_impl_for(f32, "cpu") == "bmm"
  assert llada.attention_impl_for(f32, "tpu") == "splash"
  assert llada.attention_impl_for(bf16, "gpu") == "cudnn"
  assert llada.attention_impl_for(f32, "gpu") == "bmm"  # no float32 cuDNN flash kernel
  assert llada.attention_impl_for(dataclasses.replace(bf16, attention_impl="xla"), "gpu") == "xla"
  assert llada.attention_impl_for(BASE) == "bmm"  # this CPU
  assert llada.attention_impl_for(bf16, "cuda") == "cudnn"
  assert llada.attention_impl_for(bf16, "rocm") == "bmm"  # cuDNN is NVIDIA's


@pytest.mark.parametrize("version, impl", [("cuda 12080", "cudnn"), ("rocm 6.3.1", "bmm")])
def test_attention_impl_auto_tells_cuda_from_rocm(monkeypatch, version, impl):
  # Both GPU backends report jax.default_backend() == "gpu"; only the client's version differs.
  class Client:
    platform_version = version

  class Device:
    client = Client()

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
  assert llada.attention_impl_for(dataclasses.replace(BASE, compute_dtype="bfloat16")) == impl
  assert llada.attention_impl_for(BASE) == "bmm"  # float32 on either
  with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
    dataclasses.replace(BASE, attention_impl="flash")
