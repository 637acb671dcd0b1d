"""generate with a KV cache (SPEC section 4b) against a NumPy reference of the prefix / dual caches and the
threshold and factor rules on a tiny random LLaDA and Dream (QKV biases, GQA, shifted
predictions); the KV-cached forwards; compile counts; config."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax.diffusion import sampler
from bgpo_jax.models import dream, dream_cache, family, llada, llada_cache

# Tiny and GQA (4 heads over 2 kv heads); a large init spreads the logits, so float32 (JAX)
# against float64 (NumPy) never flips a ranking or a threshold comparison by rounding alone.
CFG = llada.LLaDAConfig.preset("tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               mlp_hidden_size=64, init_std=0.5)
MASK = CFG.mask_token_id
PARAMS = llada.init_params(CFG, jax.random.key(3))
NP = jax.tree.map(lambda x: np.asarray(x, np.float64), PARAMS)

# The tiny Dream with the same sizes and special ids (mask 2, pad 0), its QKV biases random
# (init_params sets them to 0, which would hide a dropped bias).
DCFG = dream.DreamConfig.preset("tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                mlp_hidden_size=64, init_std=0.5)
assert DCFG.mask_token_id == MASK and DCFG.pad_token_id == CFG.pad_token_id


def _dream_params():
  p = dream.init_params(DCFG, jax.random.key(4))
  r = np.random.default_rng(4)
  blocks = {k: (jnp.asarray(r.normal(0, 0.5, v.shape), v.dtype) if k.endswith("_bias") else v)
            for k, v in p["blocks"].items()}
  return dict(p, blocks=blocks)


DPARAMS = _dream_params()
FAMILIES = {"llada": (CFG, PARAMS, NP),
            "dream": (DCFG, DPARAMS, jax.tree.map(lambda x: np.asarray(x, np.float64), DPARAMS))}
# Dream predicts position i from the output at i - 1 (models/dream.py).
SHIFT = {"llada": 0, "dream": 1}


def prompts(batch=3, plen=7, pad=(0, 2, 5), seed=1):
  r = np.random.default_rng(seed)
  toks = r.integers(5, 120, size=(batch, plen)).astype(np.int32)
  mask = np.ones((batch, plen), np.int32)
  for row, n in enumerate(pad[:batch]):
    toks[row, :n] = CFG.pad_token_id
    mask[row, :n] = 0
  return toks, mask


# ----------------------------------------------------------------------------- NumPy reference


def _rms(x, w, cfg=CFG):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w


def _rope(x, pos, cfg=CFG):
  hd = x.shape[-1]
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  return x * cos[None, :, None] + rot * sin[None, :, None]


def np_model(tokens, start, key_mask, keys_of=None, fam="llada"):
  """Window [start, start + W) of the model. keys_of(layer, fresh_k, fresh_v) -> the keys and
  values [B, S, KV, hd] its queries attend to (None: the window is the whole sequence).
  Returns (logits of each window position's own output [B, W, V] (no Dream shift), per-layer
  fresh (k, v))."""
  cfg, _, NP = FAMILIES[fam]
  B, W = tokens.shape
  H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  pos = np.arange(start, start + W, dtype=np.float64)
  x = NP["wte"][tokens]
  fresh = []
  for layer in range(cfg.n_layers):
    p = {k: v[layer] for k, v in NP["blocks"].items()}
    b = lambda name: p.get(name, 0.0)  # Dream's QKV biases
    n = _rms(x, p["attn_norm"], cfg)
    q = _rope((n @ p["q_proj"] + b("q_bias")).reshape(B, W, H, hd), pos, cfg)
    k = _rope((n @ p["k_proj"] + b("k_bias")).reshape(B, W, KV, hd), pos, cfg)
    v = (n @ p["v_proj"] + b("v_bias")).reshape(B, W, KV, hd)
    fresh.append((k, v))
    kk, vv = (k, v) if keys_of is None else keys_of(layer, k, v)
    kk, vv = np.repeat(kk, H // KV, axis=2), np.repeat(vv, H // KV, axis=2)  # head h -> kv h // G
    s = np.einsum("bqhd,bshd->bhqs", q, kk) / np.sqrt(hd)
    s = np.where(key_mask[:, None, None, :], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("bhqs,bshd->bqhd", a, vv).reshape(B, W, H * hd) @ p["attn_out"]
    m = _rms(x, p["ff_norm"], cfg)
    g = m @ p["ff_proj"]
    x = x + (g / (1 + np.exp(-g)) * (m @ p["up_proj"])) @ p["ff_out"]
  return _rms(x, NP["ln_f"], cfg) @ NP["ff_out"], fresh


def np_commit(x, logits, s, e, rule, value):
  """One step on block [s, e) of canvas x: rule "count" (value [B] positions), "threshold" or
  "factor" (Fast-dLLM get_transfer_index / get_transfer_index_dynamic)."""
  logits = logits.copy()
  logits[..., MASK] = -np.inf
  cand = logits.argmax(-1)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  conf = np.take_along_axis(p, cand[..., None], -1)[..., 0]
  blk = x[:, s:e]
  masked = blk == MASK
  conf = np.where(masked, conf, -np.inf)
  for r in range(x.shape[0]):
    n = int(masked[r].sum())
    if n == 0:
      continue
    order = np.argsort(-conf[r], kind="stable")[:n]
    if rule == "count":
      take = order[:value[r]]
    elif rule == "threshold":
      take = [j for t, j in enumerate(order) if t == 0 or conf[r, j] >= value]
    else:  # factor
      thr = [-1.0] + [1 - value / (t + 2) for t in range(1, n)]
      top = n - 1
      for t in range(n):
        if conf[r, order[t]] < thr[t]:
          top = t
          break
      take = order[:top + 1 if top in (0, n - 1) else top]
    blk[r, take] = cand[r, take]
  return x


def ref_generate(prompt, pmask, *, cache, gen_length, steps, block_length, rule="count", value=None,
                 fam="llada", cfg_scale=0.0):
  """SPEC section 4b at temperature 0. Returns (tokens, model calls). For Dream (shift 1) the
  block [s, e) is scored from the outputs at [s - 1, e - 1), so its windows start at s - 1 (that
  position recomputed over the cache like the rest of the window). cfg_scale > 0: the model runs
  on [canvas; canvas with the real prompt masked] (each copy its own cache) and the logits are
  un + (cfg + 1) * (cond - un)."""
  sh = SHIFT[fam]
  B, P = prompt.shape
  x = np.concatenate([prompt, np.full((B, gen_length), MASK)], 1)
  key_mask = np.concatenate([pmask, np.ones((B, gen_length), np.int32)], 1).astype(bool)
  if cfg_scale > 0:
    key_mask = np.concatenate([key_mask, key_mask], 0)

  def model_rows(x):
    if cfg_scale == 0:
      return x
    un = x.copy()
    un[:, :P][pmask != 0] = MASK
    return np.concatenate([x, un], 0)

  def guided(logits):
    if cfg_scale == 0:
      return logits
    cond, unc = logits[:B], logits[B:]
    return unc + (cfg_scale + 1.0) * (cond - unc)

  k = steps // (gen_length // block_length)
  calls = 0
  for b in range(gen_length // block_length):
    s, e = P + b * block_length, P + (b + 1) * block_length
    m = (x[:, s:e] == MASK).sum(1)
    i = 0
    while (i < k) if rule == "count" else (x[:, s:e] == MASK).any():
      counts = m // k + (i < m % k)
      lo = s - sh  # the window's first position
      rows = model_rows(x)
      if i == 0 or cache == "none":
        logits, kv = np_model(rows, 0, key_mask, fam=fam)  # full forward; its K, V are the cache
        logits = logits[:, lo:e - sh]
      elif cache == "prefix":
        logits, _ = np_model(rows[:, lo:], lo, key_mask, lambda l, kf, vf: (
            np.concatenate([kv[l][0][:, :lo], kf], 1), np.concatenate([kv[l][1][:, :lo], vf], 1)),
            fam=fam)
        logits = logits[:, :block_length]
      else:  # dual
        logits, _ = np_model(rows[:, lo:e], lo, key_mask, lambda l, kf, vf: (
            np.concatenate([kv[l][0][:, :lo], kf, kv[l][0][:, e:]], 1),
            np.concatenate([kv[l][1][:, :lo], vf, kv[l][1][:, e:]], 1)), fam=fam)
        logits = logits[:, :block_length]
      x = np_commit(x, guided(logits), s, e, rule, counts if rule == "count" else value)
      calls += 1
      i += 1
  return x, calls


# ----------------------------------------------------------------------------- JAX side

_JITTED: dict = {}


def settings(**kw):
  """SamplerSettings for these tests: greedy unless told."""
  kw.setdefault("temperature", 0.0)
  return sampler.SamplerSettings(**kw)


def run(toks, mask, rng=None, fam="llada", return_nfe=False, **kw):
  cfg, params, _ = FAMILIES[fam]
  key = (fam, return_nfe) + tuple(sorted(kw.items()))  # one compile per settings
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(sampler.generate, cfg, settings=settings(**kw),
                                             return_nfe=return_nfe))
  rng = jax.random.key(0) if rng is None else rng
  return jax.tree.map(np.asarray, _JITTED[key](params, jnp.asarray(toks), jnp.asarray(mask),
                                               rng=rng))


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("cache,gen_length,block_length,steps", [
    ("prefix", 12, 4, 6), ("dual", 16, 8, 8), ("dual", 8, 4, 2)])
def test_cached_matches_numpy_reference(cache, gen_length, block_length, steps, fam):
  toks, mask = prompts()
  got = run(toks, mask, fam=fam, cache=cache, gen_length=gen_length, steps=steps,
            block_length=block_length)
  want, _ = ref_generate(toks, mask, cache=cache, gen_length=gen_length, steps=steps,
                         block_length=block_length, fam=fam)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :toks.shape[1]], toks)
  if steps // (gen_length // block_length) > 1:
    # The reference discriminates: the cache changes the tokens of this random model.
    exact, _ = ref_generate(toks, mask, cache="none", gen_length=gen_length, steps=steps,
                            block_length=block_length, fam=fam)
    assert (want != exact).any()


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("cache,rule,value,gen_length,block_length", [
    ("prefix", "threshold", 0.3, 16, 8), ("dual", "threshold", 0.3, 12, 4),
    ("dual", "factor", 1.0, 16, 8)])
def test_parallel_decoding_matches_numpy_reference(cache, rule, value, gen_length, block_length,
                                                   fam):
  # Per-row commit counts differ here (each row commits what passes its own threshold), with
  # left padding of 0 / 2 / 5 positions.
  toks, mask = prompts()
  kw = {rule: value}
  got, nfe = run(toks, mask, fam=fam, cache=cache, gen_length=gen_length, steps=gen_length,
                 block_length=block_length, return_nfe=True, **kw)
  want, calls = ref_generate(toks, mask, cache=cache, gen_length=gen_length, steps=gen_length,
                             block_length=block_length, rule=rule, value=value, fam=fam)
  np.testing.assert_array_equal(got, want)
  assert (got != MASK).all()
  assert int(nfe) == calls < gen_length  # the rule committed several positions at some step


def test_threshold_one_is_one_position_per_step():
  # Threshold 1.0 commits only the most confident position: the fixed schedule with one
  # position per step (steps = gen_length), for every cache.
  toks, mask = prompts()
  a = run(toks, mask, cache="none", gen_length=8, steps=8, block_length=4, threshold=1.0)
  b = run(toks, mask, cache="none", gen_length=8, steps=8, block_length=4)
  np.testing.assert_array_equal(a, b)
  # a lower threshold commits several at once from the same logits: other tokens
  c = run(toks, mask, cache="none", gen_length=8, steps=8, block_length=4, threshold=0.3)
  assert (c != MASK).all() and (c != b).any()


def _generate(toks, mask, rng, fam="llada", **kw):
  cfg, params, _ = FAMILIES[fam]
  model = family.module_for(cfg)
  fn = jax.jit(lambda p, t, m, r: sampler.generate(
      sampler.LogitsModel(lambda a, b: model.hidden_states(cfg, p, a, b),
                          lambda h: model.lm_head(cfg, p, h)),
      None, t, m, settings(**kw), r, ids=sampler.TokenIds(MASK)))
  return np.asarray(fn(params, jnp.asarray(toks), jnp.asarray(mask), rng))


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("temperature,runs", [
    (0.0, (("prefix", 1), ("dual", 1))), (0.7, (("none", 0), ("dual", 1)))])
def test_refreshed_every_step_is_generate(temperature, runs, fam):
  # Same tokens as `generate`, at T > 0 too (same keys per step).
  toks, mask = prompts()
  kw = dict(gen_length=16, steps=8, block_length=8, temperature=temperature)
  rng = jax.random.key(5)
  want = _generate(toks, mask, rng, fam=fam, **kw)
  for cache, refresh in runs:
    np.testing.assert_array_equal(
        run(toks, mask, rng, fam=fam, cache=cache, refresh_every=refresh, **kw), want)
  if temperature == 0:
    # refreshed every 2nd step: differs from both the exact sampler and the block-start cache
    r2 = run(toks, mask, rng, fam=fam, cache="dual", refresh_every=2, **kw)
    r0 = run(toks, mask, rng, fam=fam, cache="dual", **kw)
    assert (r2 != MASK).all() and (r2 != want).any() and (r2 != r0).any()


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_refresh_every_step_with_cfg_is_generate(fam):
  # CFG: for Dream the window's first position (start - 1) is a prompt position, which the
  # unconditional copy masks; the family gets whole rows, so both copies see their own.
  toks, mask = prompts()
  kw = dict(gen_length=8, steps=4, block_length=4, cfg_scale=1.5)
  rng = jax.random.key(2)
  want = _generate(toks, mask, rng, fam=fam, **kw)
  np.testing.assert_array_equal(run(toks, mask, rng, fam=fam, cache="prefix", refresh_every=1,
                                    **kw), want)
  # the cached paths with CFG against the NumPy reference (T = 0)
  for cache in ("prefix", "dual"):
    got = run(toks, mask, rng, fam=fam, cache=cache, **kw)
    ref, _ = ref_generate(toks, mask, cache=cache, gen_length=8, steps=4, block_length=4, fam=fam,
                          cfg_scale=1.5)
    np.testing.assert_array_equal(got, ref)


def _partly_decoded_canvas():
  """The prompts plus a 12-token canvas whose first 5 positions are decoded (token 9): (canvas,
  attention mask, batch, prompt length)."""
  toks, mask = prompts()
  B, P = toks.shape
  canvas = np.concatenate([toks, np.full((B, 12), MASK, np.int32)], 1)
  canvas[:, P:P + 5] = 9
  attn = np.concatenate([mask, np.ones((B, 12), np.int32)], 1)
  return canvas, attn, B, P


def test_dream_window_features_with_fresh_cache_are_hidden_states():
  # Dream's features for [start, start + W) come from the outputs at [start - 1, start + W - 1):
  # with a fresh cache they equal dream.hidden_states (shift inside) for every window.
  canvas, attn, B, P = _partly_decoded_canvas()
  cached = family.cached_forward_for(DCFG)
  assert cached is dream_cache and family.cached_forward_for(CFG) is llada_cache
  full = jax.jit(functools.partial(dream.hidden_states, DCFG))(DPARAMS, canvas, attn)
  h, kv = jax.jit(functools.partial(cached.prefill, DCFG))(DPARAMS, canvas, attn)
  np.testing.assert_allclose(h, full, atol=1e-4)
  window = jax.jit(functools.partial(cached.window_features, DCFG), static_argnums=(2, 3))
  for start, width in ((P, 12), (P + 4, 4), (1, P + 11), (P + 11, 1)):
    win = window(DPARAMS, canvas, start, width, kv, attn)
    np.testing.assert_allclose(win, full[:, start:start + width], atol=1e-4)
  # traced start (the dual cache's fori_loop)
  traced = jax.jit(functools.partial(cached.window_features, DCFG), static_argnums=3)
  np.testing.assert_allclose(traced(DPARAMS, canvas, jnp.int32(P + 4), 4, kv, attn),
                             full[:, P + 4:P + 8], atol=1e-4)
  # the window really starts at start - 1: LLaDA's window (the outputs at [start, start + W))
  # is the unshifted one, and differs
  own = llada_cache.family_window_forward(dream, DCFG, DPARAMS, canvas[:, P:], P, kv, attn)
  assert np.abs(np.asarray(own[:, :11]) - np.asarray(full[:, P + 1:])).max() < 1e-4
  assert np.abs(np.asarray(own) - np.asarray(full[:, P:])).max() > 1e-2
  with pytest.raises(ValueError, match="start >= 1"):
    cached.window_features(DCFG, DPARAMS, canvas, 0, 4, kv, attn)


@pytest.mark.parametrize("impl", ["xla", "bmm", "jax"])
def test_shared_attention_with_queries_shorter_than_keys(impl):
  # llada_cache's window attention is llada.attention: W < S queries over all keys, GQA, padded
  # keys, against a float64 softmax.
  cfg = dataclasses.replace(CFG, attention_impl=impl)
  r = np.random.default_rng(0)
  B, W, S, H, KV, hd = 2, 3, 9, 4, 2, 8
  q, k, v = (r.normal(size=sh).astype(np.float32) for sh in
             ((B, W, H, hd), (B, S, KV, hd), (B, S, KV, hd)))
  key_mask = np.ones((B, S), bool)
  key_mask[1, :4] = False
  got = np.asarray(llada_cache.attention(cfg, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         jnp.asarray(key_mask)))
  kk, vv = np.repeat(k, H // KV, 2).astype(np.float64), np.repeat(v, H // KV, 2).astype(np.float64)
  s = np.einsum("bqhd,bshd->bhqs", q.astype(np.float64), kk) / np.sqrt(hd)
  s = np.where(key_mask[:, None, None, :], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  want = np.einsum("bhqs,bshd->bqhd", a, vv)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_window_forward_with_fresh_cache_is_the_full_forward():
  canvas, attn, B, P = _partly_decoded_canvas()
  full = jax.jit(functools.partial(llada.hidden_states, CFG))(PARAMS, canvas, attn)
  h, kv = jax.jit(functools.partial(llada_cache.prefill, CFG))(PARAMS, canvas, attn)
  window = jax.jit(functools.partial(llada_cache.window_forward, CFG), static_argnums=2)
  np.testing.assert_allclose(h, full, atol=1e-4)
  assert kv[0].shape == (CFG.n_layers, B, P + 12, CFG.n_kv_heads, CFG.head_dim)
  assert llada_cache.cache_bytes(CFG, B, P + 12) == 2 * kv[0].size * 4
  for start, width in ((P, 12), (P + 4, 4), (0, P + 12)):
    win = window(PARAMS, canvas[:, start:start + width], start, kv, attn)
    np.testing.assert_allclose(win, full[:, start:start + width], atol=1e-4)
  # a stale cache changes the window's output (the cache is really read)
  stale = (kv[0] * 0.5, kv[1])
  win = window(PARAMS, canvas[:, P:], P, stale, attn)
  assert np.abs(np.asarray(win) - np.asarray(full[:, P:])).max() > 1e-2


def test_one_compile_per_settings():
  traces = []

  def fn(p, t, m, r):
    traces.append(1)
    return sampler.generate(CFG, p, t, m, settings(cache="prefix", gen_length=8, steps=4,
                                                   block_length=4, temperature=0.5,
                                                   threshold=0.4), r)

  f = jax.jit(fn)
  toks, mask = prompts()
  outs = [np.asarray(f(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(i)))
          for i in range(3)]
  toks2, mask2 = prompts(seed=4)
  f(PARAMS, jnp.asarray(toks2), jnp.asarray(mask2), jax.random.key(0))
  assert len(traces) == 1 and f._cache_size() == 1
  assert any((outs[0] != o).any() for o in outs[1:])  # the key is an argument, not baked in


@pytest.mark.parametrize("kw,msg", [
    (dict(cache="paged"), "unknown cache"),
    (dict(cache="dual", threshold=1.5), "threshold must be"),
    (dict(cache="dual", threshold=0.9, factor=1.0), "two parallel-decoding rules"),
    (dict(cache="dual", factor=-1.0), "factor must be"),
    (dict(cache="dual", refresh_every=-1), "refresh_every"),
])
def test_argument_errors(kw, msg):
  toks, mask = prompts()
  with pytest.raises(ValueError, match=msg):
    sampler.generate(CFG, PARAMS, toks, mask, settings(gen_length=8, steps=4, block_length=4, **kw),
                     jax.random.key(0))


def test_config_keys_validated():
  c = config_lib.base_config()
  c.task.name = "demo"
  c.tokenizer.kind = "char"
  c.model.preset = "tiny"
  config_lib.validate(c)
  for key, value, msg in (("rollout.cache", "paged", "rollout.cache"),
                          ("eval.cache", "kv", "eval.cache"),
                          ("rollout.threshold", 0.0, "rollout.threshold"),
                          ("eval.threshold", 1.2, "eval.threshold"),
                          ("rollout.gather_weights", "maybe", "rollout.gather_weights")):
    bad = c.copy_and_resolve_references()
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=msg):
      config_lib.validate(bad)
  ok = c.copy_and_resolve_references()
  ok.rollout.cache, ok.rollout.threshold, ok.eval.cache, ok.eval.threshold = "dual", 0.9, "prefix", 1.0
  config_lib.validate(ok)
  ok.model.family = "dream"  # the cached forward exists for every family
  config_lib.validate(ok)


# ----------------------------------------------------------------------------- rollout sampler


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_rollout_sampler_cached_threshold_and_inference_params(fam):
  from bgpo_jax import rollout
  from bgpo_jax.tokenizer import CharTokenizer

  tok = CharTokenizer()
  cfg = family.preset(fam, "tiny", init_std=0.5, compute_dtype="bfloat16")
  params = family.module_for(cfg).init_params(cfg, jax.random.key(0))
  settings = rollout.SamplerSettings(gen_length=8, steps=4, block_length=8, temperature=0.0,
                                     cache="dual", threshold=0.5)
  rs = rollout.RolloutSampler(tok, cfg, settings, group_size=2, prompt_buckets=(40,))
  ready = rs.inference_params(params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ready.tree))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # masters untouched
  assert rs.inference_params(ready) is ready and rs.weight_layout() == "local"
  ids = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in ("2+3?", "Hi there")]
  out = rs.sample_ids(ready, ids, jax.random.key(1))
  again = rs.sample_ids(params, ids, jax.random.key(2))  # raw params are cast inside
  assert rs.num_compiled == 1
  np.testing.assert_array_equal(out.tokens, again.tokens)  # T = 0: the key does not matter
  want = jax.jit(lambda p, t, m: sampler.generate(
      cfg, p, t, m, settings, jax.random.key(0), ids=sampler.TokenIds.of(cfg, tok.eot_id)))(
          ready.tree, out.tokens[:, :40], out.prompt_mask)
  np.testing.assert_array_equal(out.tokens, np.asarray(want))


_MESH_SCRIPT = r"""
import json, jax, numpy as np
from bgpo_jax import rollout
from bgpo_jax.models import llada, sharding
from bgpo_jax.tokenizer import CharTokenizer
tok = CharTokenizer()
cfg = llada.LLaDAConfig.preset("tiny", init_std=0.5)
params = llada.init_params(cfg, jax.random.key(0))
settings = rollout.SamplerSettings(gen_length=8, steps=4, block_length=8, temperature=0.0,
                                   cache="dual")
ids = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in ("2+3?", "Hi", "a", "bc")]
plain = rollout.RolloutSampler(tok, cfg, settings, group_size=2, prompt_buckets=(40,))
want = plain.sample_ids(params, ids, jax.random.key(1)).tokens
mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
from bgpo_jax.train import state
sharded = jax.device_put(params, state.param_shardings(cfg, mesh))
res = {}
for gw in ("on", "off"):
  rs = rollout.RolloutSampler(tok, cfg, settings, group_size=2, prompt_buckets=(40,), mesh=mesh,
                              gather_weights=gw)
  ready = rs.inference_params(sharded)
  toks, mask, _ = rs.pad_prompt_ids(ids)
  toks, mask = np.repeat(toks, 2, 0), np.repeat(mask, 2, 0)
  toks = jax.make_array_from_process_local_data(rs._batch_sharding, toks)
  mask = jax.make_array_from_process_local_data(rs._batch_sharding, mask)
  with jax.set_mesh(mesh):
    compiled = rs._generate.lower(ready.tree, toks, mask, jax.random.key(1)).compile()
    got = compiled(ready.tree, toks, mask, jax.random.key(1))
  hlo = compiled.as_text()
  res[gw] = dict(layout=rs.weight_layout(), equal=bool((np.asarray(got) == want).all()),
                 q_spec=str(ready.tree["blocks"]["q_proj"].sharding.spec),
                 all_gathers=hlo.count("all-gather-start") + hlo.count("all-gather("))
# Dream's cached window (one position more than LLaDA's) under the same mesh, FSDP layout
from bgpo_jax.models import family
dcfg = family.preset("dream", "tiny", init_std=0.5)
dparams = family.module_for(dcfg).init_params(dcfg, jax.random.key(0))
dplain = rollout.RolloutSampler(tok, dcfg, settings, group_size=2, prompt_buckets=(40,))
dwant = dplain.sample_ids(dparams, ids, jax.random.key(1)).tokens
ds = rollout.RolloutSampler(tok, dcfg, settings, group_size=2, prompt_buckets=(40,), mesh=mesh,
                            gather_weights="off")
dsharded = jax.device_put(dparams, state.param_shardings(dcfg, mesh))
with jax.set_mesh(mesh):
  dgot = ds.sample_ids(ds.inference_params(dsharded), ids, jax.random.key(1)).tokens
res["dream_equal"] = bool((np.asarray(dgot) == dwant).all())
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow  # an 8-device subprocess
def test_mesh_gathered_inference_weights():
  """On a (1, 4, 2) mesh of 8 CPU devices (a subprocess): with gather_weights on, the inference
  copy is replicated over fsdp (tensor split kept) and the compiled sampler all-gathers fewer
  arrays than from the FSDP layout; both give the single-device tokens, and so does Dream's
  cached sampler from the FSDP layout."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
  p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  on, off = res["on"], res["off"]
  assert on["layout"] == "gathered" and off["layout"] == "sharded"
  assert "fsdp" not in on["q_spec"] and "tensor" in on["q_spec"] and "fsdp" in off["q_spec"]
  assert on["equal"] and off["equal"]
  assert on["all_gathers"] < off["all_gathers"], res
  assert res["dream_equal"], res  # Dream's cached sampler on the mesh: the single-device tokens


def test_build_rollout_sampler_wires_the_keys():
  from bgpo_jax import tasks
  from bgpo_jax.tokenizer import CharTokenizer

  c = config_lib.base_config()
  c.rollout.cache, c.rollout.threshold, c.rollout.suppress_eos = "prefix", 0.8, True
  c.rollout.suppress_eos_confidence, c.rollout.gather_weights = True, "off"
  c.eval.cache = "dual"
  cfg = llada.LLaDAConfig.preset("tiny")
  train = tasks.build_rollout_sampler(c, cfg, CharTokenizer(), None, "rollout")
  ev = tasks.build_rollout_sampler(c, cfg, CharTokenizer(), None, "eval")
  s, e = train.settings, ev.settings
  assert (s.cache, s.threshold, s.suppress_eos, s.suppress_eos_confidence) == ("prefix", 0.8, True, True)
  assert (e.cache, e.threshold, e.suppress_eos) == ("dual", None, True)
  assert train.gather_weights == "off" and train.group_size == c.rl.group_size and ev.group_size == 1


def test_compilation_cache_dir(tmp_path):
  from bgpo_jax import tasks

  c = config_lib.base_config()
  c.compilation_cache_dir = "off"
  assert tasks.enable_compilation_cache(c, str(tmp_path)) is None
  before = jax.config.jax_compilation_cache_dir
  c.compilation_cache_dir = ""
  try:
    assert tasks.enable_compilation_cache(c, str(tmp_path)) == str(tmp_path / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    assert (tmp_path / "jax_cache").is_dir()
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
