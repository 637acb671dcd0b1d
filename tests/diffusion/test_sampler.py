"""generate() with a logits function against a plain NumPy implementation of SPEC section 4, plus
schedule, jit, sharding."""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bgpo_jax.diffusion import sampler

VOCAB = 24
MASK = 23
EOS = 1
EOT = 2
DIM = 16


def make_toy_logits_fn(seed: int = 0):
  """A small bidirectional 'model': each position sees its token, its position and the mean of
  all real (attention_mask 1) tokens, so the context matters and padding does not."""
  r = np.random.default_rng(seed)
  emb = jnp.asarray(r.normal(size=(VOCAB, DIM)), jnp.float32)
  mix = jnp.asarray(r.normal(size=(DIM, DIM)) / np.sqrt(DIM), jnp.float32)
  out = jnp.asarray(r.normal(size=(DIM, VOCAB)) * 1.5, jnp.float32)
  freqs = jnp.asarray(r.uniform(0.1, 1.0, size=(DIM,)), jnp.float32)

  def hidden_fn(tokens, attention_mask):
    tokens = jnp.asarray(tokens)
    am = jnp.asarray(attention_mask, jnp.float32)
    x = jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float32) @ emb  # (a gather needs out_sharding
    # under an Explicit mesh; a one-hot matmul keeps the batch sharding)
    pos = jnp.sin(jnp.arange(tokens.shape[1], dtype=jnp.float32)[:, None] * freqs)
    ctx = jnp.sum(x * am[..., None], 1) / jnp.maximum(jnp.sum(am, 1, keepdims=True), 1.0)
    return jnp.tanh(x + pos + (ctx @ mix)[:, None, :] * 2.0)

  def head_fn(h):
    return h @ out

  def logits_fn(tokens, attention_mask):
    return head_fn(hidden_fn(tokens, attention_mask))

  logits_fn.hidden_fn, logits_fn.head_fn = hidden_fn, head_fn
  return logits_fn


def ref_generate(logits_fn, prompt, pmask, *, gen_length, steps, block_length, cfg_scale=0.0,
                 mask_id=MASK, eos_id=None, suppress_eos=False, conf_ids=()):
  """SPEC section 4 at temperature 0, one row and one step at a time, float64 softmax."""
  prompt = np.asarray(prompt)
  pmask = np.asarray(pmask)
  b, plen = prompt.shape
  x = np.concatenate([prompt, np.full((b, gen_length), mask_id)], 1).astype(np.int32)
  attn = np.concatenate([pmask, np.ones((b, gen_length))], 1).astype(np.int32)
  num_blocks = gen_length // block_length
  s = steps // num_blocks
  for blk in range(num_blocks):
    lo, hi = plen + blk * block_length, plen + (blk + 1) * block_length
    m = (x[:, lo:hi] == mask_id).sum(1)
    for i in range(s):
      logits = np.asarray(logits_fn(x, attn), np.float64)
      if cfg_scale > 0:
        un = x.copy()
        un[:, :plen][pmask == 1] = mask_id
        lu = np.asarray(logits_fn(un, attn), np.float64)
        logits = lu + (cfg_scale + 1) * (logits - lu)
      logits[..., mask_id] = -np.inf  # never propose the mask token itself
      if suppress_eos:
        logits[..., eos_id] = -np.inf
      cand = logits.argmax(-1)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      conf = np.take_along_axis(p, cand[..., None], -1)[..., 0]
      conf = np.where(np.isin(cand, conf_ids), conf - 2.0, conf)
      conf[x != mask_id] = -np.inf
      conf[:, hi:] = -np.inf
      k = m // s + (i < m % s)
      for r in range(b):
        idx = np.argsort(-conf[r], kind="stable")[:k[r]]
        x[r, idx] = cand[r, idx]
  return x


def prompts(batch=3, plen=6, pad=(0, 2, 4), seed=1):
  r = np.random.default_rng(seed)
  toks = r.integers(3, MASK, size=(batch, plen)).astype(np.int32)
  mask = np.ones((batch, plen), np.int32)
  for row, n in enumerate(pad[:batch]):
    toks[row, :n] = EOS  # left padding with the pad (= EOS) id, as LLaDA does
    mask[row, :n] = 0
  return toks, mask


_JITTED: dict = {}
_IDS = ("mask_id", "eos_id", "eot_id")


def settings(**kw):
  """SamplerSettings for these tests: greedy unless told."""
  kw.setdefault("temperature", 0.0)
  return sampler.SamplerSettings(**kw)


def run_jit(logits_fn, toks, mask, rng=None, head_fn=None, **kw):
  kw.setdefault("mask_id", MASK)
  key = (logits_fn, head_fn, tuple(sorted(kw.items())))  # one compile per settings, not per call
  if key not in _JITTED:
    ids = sampler.TokenIds(**{k: kw.pop(k) for k in _IDS if k in kw})
    model = sampler.LogitsModel(logits_fn, head_fn)
    s = settings(**kw)
    _JITTED[key] = jax.jit(lambda t, m, r: sampler.generate(model, None, t, m, s, r, ids=ids))
  fn = _JITTED[key]
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(fn(jnp.asarray(toks), jnp.asarray(mask), rng))


@pytest.mark.parametrize("gen_length,block_length,steps", [
    (8, 8, 8), (8, 8, 3), (12, 4, 6), (10, 5, 6)])
def test_matches_numpy_reference_greedy(gen_length, block_length, steps):
  fn = make_toy_logits_fn()
  toks, mask = prompts()
  got = run_jit(fn, toks, mask, gen_length=gen_length, steps=steps, block_length=block_length)
  want = ref_generate(fn, toks, mask, gen_length=gen_length, steps=steps,
                      block_length=block_length)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :toks.shape[1]], toks)
  assert not (got == MASK).any()


@pytest.mark.parametrize("cfg_scale", [0.5, 2.0])
def test_matches_reference_with_cfg(cfg_scale):
  fn = make_toy_logits_fn(3)
  toks, mask = prompts(seed=4)
  kw = dict(gen_length=12, steps=6, block_length=4, cfg_scale=cfg_scale)
  got = run_jit(fn, toks, mask, **kw)
  np.testing.assert_array_equal(got, ref_generate(fn, toks, mask, **kw))
  # Guidance changes the answer for this context-dependent toy (else the test proves nothing).
  plain = run_jit(fn, toks, mask, gen_length=12, steps=6, block_length=4)
  assert (plain != got).any()


def test_matches_reference_with_eos_suppression():
  fn = make_toy_logits_fn(5)
  toks, mask = prompts(seed=6)
  base = dict(gen_length=12, steps=6, block_length=4)
  plain = run_jit(fn, toks, mask, **base)
  assert ((plain[:, 6:] == EOS) | (plain[:, 6:] == EOT)).any(), "toy never proposes EOS/EOT"

  got = run_jit(fn, toks, mask, eos_id=EOS, suppress_eos=True, **base)
  np.testing.assert_array_equal(
      got, ref_generate(fn, toks, mask, eos_id=EOS, suppress_eos=True, **base))
  assert not (got[:, 6:] == EOS).any()

  got = run_jit(fn, toks, mask, eos_id=EOS, eot_id=EOT, suppress_eos_confidence=True, **base)
  np.testing.assert_array_equal(
      got, ref_generate(fn, toks, mask, conf_ids=(EOS, EOT), **base))


def test_schedule_formula():
  sched = np.asarray(sampler.transfer_schedule(jnp.array([7, 8, 3, 0]), 3))
  want = np.array([[3, 2, 2], [3, 3, 2], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(sched, want)


def test_commits_per_step_follow_schedule():
  """Counts the masks the model sees at each call: their differences are the commits."""
  seen = []
  toy = make_toy_logits_fn()

  def logits_fn(tokens, attn):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), tokens, ordered=True)
    return toy(tokens, attn)

  toks, mask = prompts()
  gen_length, block_length, steps = 15, 5, 6  # 3 blocks, 2 steps each: 3 then 2
  out = run_jit(logits_fn, toks, mask, gen_length=gen_length, steps=steps,
                block_length=block_length)
  assert len(seen) == steps
  masks_seen = np.array([(t == MASK).sum(1) for t in seen] + [(out == MASK).sum(1)])
  commits = masks_seen[:-1] - masks_seen[1:]
  np.testing.assert_array_equal(commits, np.tile([[3], [2]], (3, 3)))
  for t in seen:  # prompt never changed; later blocks untouched
    np.testing.assert_array_equal(t[:, :6], toks)
  # Blocks are decoded left to right: after block 0's steps, blocks 1 and 2 are all masks.
  assert (seen[2][:, 6 + 5:] == MASK).all() and not (seen[2][:, 6:11] == MASK).any()


def test_sampling_matches_softmax_of_logits_over_temperature():
  probs_logits = jnp.array([0.0, 1.0, 2.0, -1.0, 0.5], jnp.float32)

  def fn(tokens, attn):  # context independent, mask id 5 outside this toy vocabulary of 5
    return jnp.broadcast_to(probs_logits, tokens.shape + (5,))

  toks = np.zeros((512, 1), np.int32)
  mask = np.ones_like(toks)
  for temp in (1.0, 0.5):
    # One step commits every position, so low-confidence selection adds no bias.
    out = run_jit(fn, toks, mask, rng=jax.random.key(7), gen_length=8, steps=1, block_length=8,
                  temperature=temp, mask_id=5)[:, 1:]
    freq = np.bincount(out.ravel(), minlength=5) / out.size
    want = np.asarray(jax.nn.softmax(probs_logits / temp))
    se = np.sqrt(want * (1 - want) / out.size)
    assert np.all(np.abs(freq - want) < 5 * se + 1e-3), (temp, freq, want)


def test_temperature_and_random_remasking_are_keyed():
  fn = make_toy_logits_fn()
  toks, mask = prompts()
  for kw in (dict(temperature=1.0), dict(remasking="random")):
    kw.update(gen_length=12, steps=6, block_length=4)
    a = run_jit(fn, toks, mask, rng=jax.random.key(1), **kw)
    b = run_jit(fn, toks, mask, rng=jax.random.key(1), **kw)
    c = run_jit(fn, toks, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert not (a == MASK).any()
    np.testing.assert_array_equal(a[:, :6], toks)


def test_jit_no_recompile_and_sharded_inputs():
  fn = make_toy_logits_fn()
  traces = []

  @jax.jit
  def gen(params_scale, toks, mask, rng):
    traces.append(1)
    return sampler.generate(lambda t, a: fn(t, a) * params_scale, None, toks, mask,
                            settings(gen_length=8, steps=4, block_length=4, temperature=0.7), rng,
                            ids=sampler.TokenIds(MASK))

  toks, mask = prompts(batch=4, pad=(0, 1, 2, 3))
  a = gen(jnp.float32(1.0), toks, mask, jax.random.key(0))
  gen(jnp.float32(2.0), toks + 1, mask, jax.random.key(1))
  assert len(traces) == 1 and gen._cache_size() == 1

  # Auto mesh (jax.sharding.Mesh) and an Explicit one (jax.make_mesh's default) under set_mesh.
  for mesh in (jax.sharding.Mesh(jax.devices()[:1], ("data",)), jax.make_mesh((1,), ("data",))):
    shard = NamedSharding(mesh, P("data"))
    st = jax.device_put(jnp.asarray(toks), shard)
    sm = jax.device_put(jnp.asarray(mask), shard)
    with jax.set_mesh(mesh):
      b = gen(jnp.float32(1.0), st, sm, jax.random.key(0))
    chex.assert_trees_all_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.is_equivalent_to(shard, 2)


def test_response_only_logits_and_block_head():
  fn = make_toy_logits_fn()
  toks, mask = prompts()
  kw = dict(gen_length=8, steps=4, block_length=4, cfg_scale=1.0)
  full = run_jit(fn, toks, mask, **kw)
  np.testing.assert_array_equal(full, ref_generate(fn, toks, mask, **kw))
  resp = run_jit(lambda t, a: fn(t, a)[:, -8:], toks, mask, **kw)
  np.testing.assert_array_equal(full, resp)
  # Features + a head applied to the current block only: same tokens.
  split = run_jit(fn.hidden_fn, toks, mask, head_fn=fn.head_fn, **kw)
  np.testing.assert_array_equal(full, split)


@pytest.mark.parametrize("kw,msg", [
    (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
    (dict(steps=3), "not a multiple of the number of blocks"),
    (dict(steps=16), "exceeds gen_length"),
    (dict(temperature=-0.1), "temperature"),
    (dict(remasking="top_p"), "unknown remasking"),
    (dict(suppress_eos=True), "needs eos_id"),
])
def test_argument_errors(kw, msg):
  args = dict(gen_length=8, steps=4, block_length=4)
  args.update(kw)
  toks, mask = prompts()
  with pytest.raises(ValueError, match=msg):
    sampler.generate(make_toy_logits_fn(), None, jnp.asarray(toks), jnp.asarray(mask),
                     settings(**args), jax.random.key(0), ids=sampler.TokenIds(MASK))


def test_mask_token_in_prompt_is_rejected():
  toks, mask = prompts()
  toks[1, 4] = MASK
  with pytest.raises(ValueError, match="holds the mask id"):
    sampler.generate(make_toy_logits_fn(), None, toks, mask,
                     settings(gen_length=8, steps=4, block_length=4), jax.random.key(0),
                     ids=sampler.TokenIds(MASK))
  toks[1, 4] = 5
  toks[1, 0] = MASK  # a padded position may hold anything
  sampler.check_prompt(toks, mask, MASK)
