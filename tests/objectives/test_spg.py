"""SPG: the loss against the authors' own code (fixture from bgpo_jax/tools/parity/spg.py), the
block-wise mask draw against the authors' mask statistics and its formulas, and the objective
through the real train step on the tiny model."""

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import bgpo_jax.objectives.spg as spg_lib  # registers "spg"
from bgpo_jax import config as config_lib
from bgpo_jax import objectives
from bgpo_jax.diffusion import elbo
from bgpo_jax.models import llada
from bgpo_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "spg.json").read_text())
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402


def _case_inputs(case):
  L, V = case["L"], case["V"]
  x = jnp.asarray(case["x"], jnp.float32)  # [n, B, L] target logits of the stand-in model
  masks = jnp.asarray(case["response_masks"], bool)
  comp = jnp.arange(L)[None] < jnp.asarray(case["lengths"])[:, None]
  adv = jnp.asarray(case["advantages"], jnp.float32)
  logp_of = lambda x: x - jnp.log(jnp.exp(x) + (V - 1))  # its log p(target): x vs V - 1 zero logits
  return x, masks, comp, adv, logp_of


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_loss_and_gradient_match_the_authors(case):
  x, masks, comp, adv, logp_of = _case_inputs(case)
  hp = case["hparams"]

  def objective(x):
    return spg_lib.spg_objective(logp_of(x), masks, comp, adv, logp_estimation=hp["logp_estimation"],
                                 eubo_beta=hp["eubo_beta"], mix_weight=hp["mix_weight"])

  value, grad = jax.jit(jax.value_and_grad(objective))(x)
  # Our objective is the negative of their loss.
  chex.assert_trees_all_close(value, jnp.float32(-case["loss"]), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grad, -jnp.asarray(case["grad_x"], jnp.float32), rtol=1e-5, atol=1e-7)


def _consistent_blocks(resp, length, bl, min_t, max_t, context):
  """The blocks k a response mask [L] can come from under the block_random scheme."""
  L = len(resp)
  reach = (length - 1) // bl + 1
  out = []
  for k in range(reach):
    m = min(bl, length - bl * k)
    frac = lambda t: int(np.floor(np.float32(m) * np.float32(t)))
    lo, hi = max(frac(min_t), 1), min(frac(max_t), m)
    partial = int(resp[k * bl: k * bl + m].sum())
    ok = (resp[length:].all() and resp[(k + 1) * bl:].all() and lo <= partial <= max(hi, lo)
          and (context or not resp[: k * bl].any()))
    if ok:
      out.append(k)
  assert L % bl == 0
  return out


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_authors_masks_have_the_block_structure(case):
  """Every mask the authors drew is one our scheme can draw (ours: the statistics test below)."""
  hp, n = case["hparams"], case["n"]
  lengths = np.asarray(case["lengths"])
  theirs = np.asarray(case["response_masks"], bool)  # [n, B, L]
  for j, b in itertools.product(range(n), range(len(lengths))):
    ks = _consistent_blocks(theirs[j, b], lengths[b], hp["block_length"], hp["min_t"], hp["max_t"],
                            context=hp["p_mask_prompt"] > 0)
    assert ks, (case["name"], j, b, theirs[j, b].astype(int))


def _exact_block_probs(nb, reach):
  """P(k) of one sample: a uniform block index of nb, modulo the blocks the completion reaches."""
  return np.bincount(np.arange(nb) % reach, minlength=nb) / nb


def _exact_distinct_prob(nb, reach, n):
  perms = list(itertools.permutations(range(nb)))
  return np.mean([len({p % reach for p in perm[:n]}) == n for perm in perms])


def test_mask_statistics_match_the_authors_and_the_formulas():
  st = FIXTURE["mask_stats"]
  L, bl, n, P, lengths, draws, p = (st[k] for k in ("L", "block_length", "n", "P", "lengths", "draws", "p_mask_prompt"))
  nb, reps = L // bl, 2000
  rows = np.repeat(np.asarray(lengths), reps)
  keys = spg_lib._row_keys(jnp.arange(rows.size, dtype=jnp.uint32))
  real = np.ones((rows.size, P), bool)
  draw = lambda k, q: spg_lib.spg_masks(k, rows, real, num_samples=n, gen_length=L, block_length=bl,
                                        p_mask_prompt=q)
  # The context mask has its own key: with and without it the blocks and partial masks are equal,
  # and the difference is the context mask (the parity script pairs the authors' draws the same way).
  _, clean = map(np.asarray, draw(keys, 0.0))
  pm, rm = map(np.asarray, draw(keys, p))  # [n, rows, P], [n, rows, L]
  assert not np.any(clean & ~rm)
  pos = np.arange(L)
  comp = pos[None] < rows[:, None]  # [rows, L]
  k = np.argmax(clean & comp[None], axis=-1)  # the partially masked block's first token ...
  k = k // bl  # ... is in the first block with a masked completion token: [n, rows]
  earlier = pos[None, None] < (k * bl)[..., None]
  assert not np.any((rm & ~clean) & ~earlier)  # context masking: earlier blocks only (and the prompt)
  in_k = (pos[None, None] // bl == k[..., None]) & comp[None]
  partial = np.sum(clean & in_k, axis=-1)  # [n, rows]
  m = np.minimum(bl, rows[None] - bl * k)
  assert np.all((1 <= partial) & (partial <= m))
  later_or_past = (pos[None, None] // bl > k[..., None]) | ~comp[None]
  assert np.all(clean[later_or_past])  # every token of the later blocks and past the completion
  for r, length in enumerate(lengths):
    sl = slice(r * reps, (r + 1) * reps)
    reach = (length - 1) // bl + 1
    exact = _exact_block_probs(nb, reach)
    ours = np.bincount(k[:, sl].ravel(), minlength=nb) / (n * reps)
    theirs = np.asarray(st["block_counts"][r], float) / (n * draws)
    np.testing.assert_allclose(ours, exact, atol=0.03, err_msg=f"length {length}")
    np.testing.assert_allclose(theirs, exact, atol=0.03, err_msg=f"authors, length {length}")
    for kk in range(reach):
      mk = min(bl, length - bl * kk)
      uniform = np.r_[0.0, np.full(mk, 1.0 / mk), np.zeros(bl - mk)]
      mine = np.bincount(partial[:, sl][k[:, sl] == kk], minlength=bl + 1)
      for c in (mine, np.asarray(st["partial_counts"][r][kk], float)):
        np.testing.assert_allclose(c / c.sum(), uniform, atol=0.06)
    want = _exact_distinct_prob(nb, reach, n)
    distinct = np.mean([len(set(k[:, i])) == n for i in range(sl.start, sl.stop)])
    assert abs(distinct - want) < 0.04 and abs(st["distinct_blocks"][r] / draws - want) < 0.04
  ctx = st["context"]
  assert ctx["other_changed"] == 0  # the authors' context mask: the prompt and earlier blocks only
  for rate in ((rm & ~clean).sum() / earlier.sum(), pm.mean(), ctx["earlier_masked"] / ctx["earlier_total"],
               ctx["prompt_masked"] / ctx["prompt_total"]):
    assert abs(rate - p) < 0.01, rate


def test_mask_draw_is_a_function_of_the_row_seed():
  kw = dict(num_samples=2, gen_length=12, block_length=4)
  lengths, real = np.array([12, 7, 3]), np.ones((3, 2), bool)
  a = spg_lib.spg_masks(spg_lib._row_keys(jnp.array([1, 2, 3], jnp.uint32)), lengths, real, **kw)
  b = spg_lib.spg_masks(spg_lib._row_keys(jnp.array([1, 2, 3], jnp.uint32)), lengths, real, **kw)
  chex.assert_trees_all_equal(a, b)
  # A row's masks depend on its own seed only (not on its neighbours or its position).
  c = spg_lib.spg_masks(spg_lib._row_keys(jnp.array([3, 9, 1], jnp.uint32)), lengths[[2, 1, 0]], real, **kw)
  np.testing.assert_array_equal(c[1][:, 0], a[1][:, 2])
  np.testing.assert_array_equal(c[1][:, 2], a[1][:, 0])
  d = spg_lib.spg_masks(spg_lib._row_keys(jnp.array([4, 5, 6], jnp.uint32)), lengths, real, **kw)
  assert not np.array_equal(np.asarray(a[1]), np.asarray(d[1]))
  # A narrower range of the partially masked fraction, short and long completions, no context masking.
  lens = np.array([16, 13, 8, 6, 1] * 40)
  prompt = np.ones((lens.size, 3), bool)
  pm, rm = map(np.asarray, spg_lib.spg_masks(spg_lib._row_keys(jnp.arange(lens.size, dtype=jnp.uint32)), lens,
                                             prompt, num_samples=2, gen_length=16, block_length=8, min_t=0.25,
                                             max_t=0.75, p_mask_prompt=0.0))
  assert not pm.any()
  for j, b in itertools.product(range(2), range(lens.size)):
    assert len(_consistent_blocks(rm[j, b], lens[b], 8, 0.25, 0.75, context=False)) == 1
  with pytest.raises(ValueError, match="multiple of block_length"):
    spg_lib.spg_masks(spg_lib._row_keys(jnp.array([1, 2, 3], jnp.uint32)), lengths, real, num_samples=2,
                      gen_length=12, block_length=5)
  with pytest.raises(ValueError, match=r"num_samples 4 must lie in \[1, 3\]"):
    spg_lib.spg_masks(spg_lib._row_keys(jnp.array([1, 2, 3], jnp.uint32)), lengths, real, num_samples=4,
                      gen_length=12, block_length=4)


# ------------------------------------------------------------------------------ properties


def test_hand_checked_values():
  # One sample, every completion token masked (t = 1): EUBO = ELBO = the mean log-prob.
  logp = jnp.log(jnp.array([[[0.5, 0.25, 0.9, 0.1]]]))  # [1, 1, 4]
  comp = jnp.array([[True, True, True, False]])
  masks = jnp.ones((1, 1, 4), bool)
  mean = jnp.mean(logp[0, 0, :3])
  for est in spg_lib.LOGP_ESTIMATIONS:
    got = spg_lib.spg_objective(logp, masks, comp, jnp.array([-2.0]), logp_estimation=est, eubo_beta=1.5)
    np.testing.assert_allclose(got, 0.0 if est == "zero" else -2.0 * mean, rtol=1e-6)
  # Half of the completion masked (t = 1/2): per token log(p^beta / t) / beta = l + log(2) / beta.
  masks = jnp.array([[[True, False, True, True]]])
  eubo = spg_lib.spg_eubo(logp, masks, comp, eubo_beta=2.0)
  np.testing.assert_allclose(eubo, [(logp[0, 0, 0] + logp[0, 0, 2]) / 2 + np.log(1.5) / 2.0], rtol=1e-6)
  # Two samples: a token masked in both takes log((p^b/t1 + p^b/t2) / 2) / b.
  logp2 = jnp.log(jnp.array([[[0.5, 0.5]], [[0.2, 0.5]]]))  # [2, 1, 2]
  m2 = jnp.array([[[True, True]], [[True, False]]])
  got = spg_lib.spg_eubo(logp2, m2, jnp.ones((1, 2), bool), eubo_beta=1.0)
  tok0 = np.log((0.5 / 1.0 + 0.2 / 0.5) / 2)
  tok1 = np.log((0.5 / 1.0) / 2)
  np.testing.assert_allclose(got, [(tok0 + tok1) / 2], rtol=1e-6)


def test_branches_mix_and_length_weights():
  rng = np.random.default_rng(0)
  n, B, L = 3, 4, 8
  logp = jnp.asarray(-rng.exponential(size=(n, B, L)), jnp.float32)
  masks = jnp.asarray(rng.random((n, B, L)) < 0.5, bool)
  comp = jnp.arange(L)[None] < jnp.array([8, 5, 3, 6])[:, None]
  adv = jnp.array([1.0, -1.0, 0.5, -0.5])
  f = lambda est, **kw: spg_lib.spg_objective(logp, masks, comp, adv, logp_estimation=est, **kw)
  w = 0.3
  np.testing.assert_allclose(f("mix", mix_weight=w), w * f("eubo") + (1 - w) * f("elbo"), rtol=1e-6)
  np.testing.assert_allclose(f("mix", mix_weight=1.0), f("eubo"), rtol=1e-6)
  # Rows with A > 0 all take the ELBO; "zero" drops the others; rows with A = 0 add nothing.
  pos = jnp.where(adv > 0, adv, 0.0)
  np.testing.assert_allclose(spg_lib.spg_objective(logp, masks, comp, pos, logp_estimation="eubo"),
                             spg_lib.spg_objective(logp, masks, comp, pos, logp_estimation="zero"), rtol=1e-6)
  # The default row weights are |c_b| / mean |c_b| (the authors' token-weighted batch mean).
  lens = np.array([8, 5, 3, 6.0])
  np.testing.assert_allclose(spg_lib.length_weights(comp), lens / lens.mean(), rtol=1e-6)
  np.testing.assert_allclose(f("elbo", row_weights=jnp.ones(B)) * B,
                             jnp.sum(adv * jnp.mean(spg_lib.spg_sample_means(logp, masks, comp), 0)), rtol=1e-6)
  with pytest.raises(ValueError, match="logp_estimation 'ppo'"):
    f("ppo")


@pytest.mark.parametrize("est", ["elbo", "zero"])
def test_per_sample_terms_sum_to_the_objective_and_its_gradient(est):
  rng = np.random.default_rng(1)
  n, B, L = 3, 4, 8
  logp = jnp.asarray(-rng.exponential(size=(n, B, L)), jnp.float32)
  masks = jnp.asarray(rng.random((n, B, L)) < 0.5, bool)
  comp = jnp.arange(L)[None] < jnp.array([8, 5, 3, 6])[:, None]
  adv = jnp.array([1.0, -1.0, 0.5, -0.5])
  rho = spg_lib.length_weights(comp)
  whole = lambda lp: spg_lib.spg_objective(lp, masks, comp, adv, logp_estimation=est)

  def summed(lp):
    terms = [spg_lib.spg_sample_terms(spg_lib.spg_sample_means(lp[j], masks[j], comp), adv, rho, num_samples=n,
                                      logp_estimation=est) for j in range(n)]
    return jnp.mean(jnp.sum(jnp.stack(terms), axis=0))

  chex.assert_trees_all_close(jax.value_and_grad(whole)(logp), jax.value_and_grad(summed)(logp), rtol=1e-6,
                              atol=1e-8)
  with pytest.raises(ValueError, match="not linear"):
    spg_lib.spg_sample_terms(jnp.zeros(B), adv, rho, num_samples=n, logp_estimation="mix")


def test_hparams_validation():
  H = spg_lib.SPGHparams
  assert H().logp_estimation == "mix" and H().eubo_beta == 1.5 and H().block_length == 32
  for kw, msg in ((dict(logp_estimation="x"), "logp_estimation 'x'"), (dict(eubo_beta=0.0), "eubo_beta 0.0"),
                  (dict(mix_weight=1.5), "mix_weight 1.5"), (dict(block_length=0), "block_length 0"),
                  (dict(min_t=0.8, max_t=0.5), "min_t 0.8 and max_t 0.5"),
                  (dict(p_mask_prompt=1.0), "p_mask_prompt 1.0"),
                  (dict(length_weighting="token"), "length_weighting 'token'")):
    with pytest.raises(ValueError, match=msg):
      H(**kw)


# ------------------------------------------------------------------------------ the train step


def _tiny_batch(cfg, B=4, P=4, L=8, weighting="group"):
  rng = np.random.default_rng(0)
  lengths = np.array([8, 5, 3, 1])[:B]
  attn = np.ones((B, P + L), np.int32)
  attn[0, 0] = 0  # a left-padded prompt
  rl = ml_collections.ConfigDict({"group_size": 2, "spg": {"length_weighting": weighting}})
  inputs = objectives.RolloutInputs(
      step=0, rows=B, gen_length=L, updates=2, lengths=lengths, rl=rl, masks=None,
      row_seeds=lambda u: np.arange(B, dtype=np.uint32) * 7 + 100 * u + 1)
  fields = objectives.get("spg").host_fields(inputs)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.mask_token_id, (B, P + L)), jnp.int32),
           "attention_mask": jnp.asarray(attn), "advantages": jnp.asarray([0.5, -1.0, 1.5, -0.25], jnp.float32)}
  return batch, fields, lengths


def test_host_fields():
  cfg = llada.LLaDAConfig.preset("tiny")
  _, fields, lengths = _tiny_batch(cfg)
  assert len(fields) == 2 and fields[0] is not fields[1]
  f = fields[0]
  assert set(f) == {"response_mask", "length_weights", "row_seeds"}
  np.testing.assert_array_equal(f["response_mask"].sum(1), lengths)
  # Groups of 2: lengths 8, 5 | 3, 1.
  np.testing.assert_allclose(f["length_weights"], [8 / 6.5, 5 / 6.5, 3 / 2, 1 / 2], rtol=1e-6)
  np.testing.assert_allclose(_tiny_batch(cfg, weighting="batch")[1][0]["length_weights"], lengths / lengths.mean(),
                             rtol=1e-6)
  np.testing.assert_array_equal(_tiny_batch(cfg, weighting="none")[1][0]["length_weights"], np.ones(4))
  # One group is one authors' device batch: rho equals their in-batch weighting.
  comp = np.arange(8)[None] < lengths[:2, None]
  np.testing.assert_allclose(f["length_weights"][:2], spg_lib.length_weights(comp), rtol=1e-6)
  assert f["row_seeds"].dtype == np.uint32 and not np.array_equal(f["row_seeds"], fields[1]["row_seeds"])
  assert len(set(f["row_seeds"].tolist())) == 4


@pytest.mark.parametrize("est,micro", [("mix", 2), ("elbo", 0)])
def test_train_step_matches_the_loss_function(est, micro):
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  params = llada.init_params(cfg, jax.random.key(0))
  batch, fields, _ = _tiny_batch(cfg)
  batch = dict(batch, **{k: jnp.asarray(v) for k, v in fields[0].items()})
  L, n, bl = 8, 2, 4
  hp = objectives.get("spg").hparams({"logp_estimation": est, "block_length": bl, "eubo_beta": 1.5})
  scfg = step_lib.StepConfig(objective="spg", num_mc_samples=n, gen_length=L, micro_batch_size=micro, hparams=hp)
  assert scfg.impl.units(scfg) == (n if est == "elbo" else 1)
  obj, grads, aux = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b))(params, batch)

  tokens, attn = batch["tokens"], batch["attention_mask"]
  comp = batch["response_mask"] > 0
  pm, rm = spg_lib.spg_masks(spg_lib._row_keys(batch["row_seeds"]), comp.sum(1), attn[:, :-L] != 0, num_samples=n,
                             gen_length=L, block_length=bl)
  noisy = jnp.where(jnp.concatenate([pm, rm], -1), cfg.mask_token_id, tokens[None])

  def direct(p):
    logp = jnp.stack([elbo.response_token_logps(cfg, p, noisy[j], attn, tokens[:, -L:]) for j in range(n)])
    return spg_lib.spg_objective(logp, rm, comp, batch["advantages"], logp_estimation=est, eubo_beta=1.5,
                                 row_weights=batch["length_weights"])

  want, want_grads = jax.jit(jax.value_and_grad(direct))(params)
  assert np.isfinite(obj) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(obj, want, rtol=1e-5, atol=1e-7)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)
  assert aux["abs_d"] == 0 and aux["kl"] == 0 and aux["elbo"] < 0

  # Inner updates (off_policy) read no stored terms: the same batch and step; a KL weight is refused.
  off = dataclasses.replace(scfg, off_policy=True)
  assert {f.name for f in scfg.impl.batch_fields(off)} == set(batch)
  if est == "mix":
    jax.eval_shape(lambda p, b: step_lib.accumulate_gradients(cfg, off, p, b), params, batch)
  else:
    with pytest.raises(ValueError, match="SPG has no KL term"):
      jax.eval_shape(lambda p, b: step_lib.accumulate_gradients(cfg, dataclasses.replace(scfg, kl_beta=0.04), p, b),
                     params, batch)


# ------------------------------------------------------------------------------ config


def test_config_checks_and_recipe():
  c = demo.get_config()
  c.rl.objective = "spg"
  assert c.rl.spg.block_length == 32 and c.rl.spg.logp_estimation == "mix"
  with pytest.raises(config_lib.ConfigError, match="gen_length 16 is not a multiple of config.rl.spg.block_length 32"):
    config_lib.validate(c)
  c.rl.spg.block_length = 4
  with pytest.raises(config_lib.ConfigError, match="num_mc_samples 8 exceeds the 4 blocks"):
    config_lib.validate(c)
  c.rl.num_mc_samples = 2
  config_lib.validate(c)
  assert any("block_length 4 differs" in w for w in objectives.get("spg").warnings(c))
  c.rl.kl_beta = 0.04
  with pytest.raises(config_lib.ConfigError, match="needs reference terms, which rl.objective .spg. does not define"):
    config_lib.validate(c)
  c.rl.kl_beta = 0.0
  c.rl.spg.eubo_beta = -1.0
  with pytest.raises(config_lib.ConfigError, match="config.rl.spg: eubo_beta -1.0"):
    config_lib.validate(c)

  from configs import math as math_config, sudoku as sudoku_config
  m = math_config.get_config("spg")
  rl = m.rl
  assert (rl.objective, rl.num_mc_samples, rl.updates_per_batch, rl.group_size, rl.kl_beta) == ("spg", 2, 4, 6, 0.0)
  assert (rl.spg.logp_estimation, rl.spg.eubo_beta) == ("mix", 1.5)
  assert (m.rollout.gen_length, m.rollout.block_length) == (256, 32)
  assert m.optim.learning_rate == 3e-6 and not m.rl.advantage_std and m.rl.spg.length_weighting == "group"
  s = sudoku_config.get_config("spg")
  assert s.rl.spg.eubo_beta == 1.0 and s.rollout.temperature == 0.3
  objectives.get("spg").check_config(m)
