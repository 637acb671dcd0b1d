"""ESPO (bgpo_jax/objectives/espo.py): parity with the authors' loss, ELBO and mask counts
(fixture written by bgpo_jax/tools/parity/espo.py from ML-GSAI/ESPO), the objective's properties,
its mask draw, and the objective through the real train step on the tiny model."""

import dataclasses
import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bgpo_jax.objectives.espo as espo  # registers "espo" before any config is built
from bgpo_jax import objectives
from bgpo_jax.diffusion import elbo
from bgpo_jax.models import llada
from bgpo_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "espo.json").read_text())


def _logp(x, vocab):
  """The parity stand-in model's log p(target) for target logit x, all other logits 0."""
  return x - jnp.log(jnp.exp(x) + vocab - 1)


def _elbos(x, masks, L, vocab, complement=True):
  """Per-sample ELBOs [n, B] from the stand-in's logits x [calls, B, L] (calls: the masked then the
  complementary pass of each sample) and the masks [n, B, L], with our weights."""
  masks = jnp.asarray(masks, bool)
  w, wc = espo.espo_weights(masks.sum(-1), L, complement)
  lp = _logp(x, vocab).reshape((masks.shape[0], -1) + masks.shape[1:])  # [n, passes, B, L]
  l = w * jnp.sum(jnp.where(masks, lp[:, 0], 0.0), -1)
  if complement:
    l = l + wc * jnp.sum(jnp.where(~masks, lp[:, 1], 0.0), -1)
  return l


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", FIXTURE["loss_cases"], ids=lambda c: c["name"])
def test_loss_matches_the_authors(case):
  L, V = case["L"], case["V"]
  x = jnp.asarray(case["x"], jnp.float32)
  masks = np.asarray(case["masks"], bool)
  adv = jnp.asarray(case["advantages"], jnp.float32)
  old = jnp.asarray(case["old_elbo"], jnp.float32)
  ref = jnp.asarray(case["ref_elbo"], jnp.float32) if case["beta"] else None
  chex.assert_trees_all_close(_elbos(x, masks, L, V), jnp.asarray(case["elbo"]), rtol=1e-5, atol=1e-5)

  def objective(x):
    l = _elbos(x, masks, L, V)
    return espo.espo_objective(l, l if case["on_policy"] else old, adv, length=L, clip_low=case["eps_low"],
                               clip_high=case["eps_high"], elbo_ref=ref, kl_beta=case["beta"],
                               kl_estimator=case["kl_estimator"])

  value, grad = jax.jit(jax.value_and_grad(objective))(x)
  chex.assert_trees_all_close(value, jnp.float32(-case["loss"]), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grad, -jnp.asarray(case["grad_x"], jnp.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", FIXTURE["elbo_cases"], ids=lambda c: c["name"])
def test_elbo_matches_the_authors(case):
  """One MC sample with (reduce_var) and without the complementary pass, including rows with
  k = 0 or k = L (the stratified counts of 4 rows of L = 7 always hit one of them)."""
  L, V = case["L"], case["V"]
  x = jnp.asarray(case["x"], jnp.float32)
  masks = np.asarray(case["masks"], bool)[None]
  k = masks.sum(-1)
  assert ((k == 0) | (k == L)).any()
  f = lambda x: _elbos(x, masks, L, V, case["complement"])[0]
  chex.assert_trees_all_close(f(x), jnp.asarray(case["elbo"]), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.grad(lambda x: jnp.sum(f(x)))(x), jnp.asarray(case["grad_x"]), rtol=1e-5,
                              atol=1e-6)


def test_mask_counts_match_the_authors_distribution():
  """Each row's count is uniform on 0..L in theirs (stratified over rows) and in ours (per row),
  and p_mask = k / (L+1); their half-integer offsets reach only half the counts (math recipe)."""
  st = FIXTURE["mask_stats"]
  L, seeds = st["L"], st["seeds"]
  assert st["p_mask_is_k_over_L_plus_1"]
  expected = seeds / (L + 1)
  chi2 = lambda h: float(np.sum((np.asarray(h) - expected) ** 2 / expected))
  # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4.
  assert all(chi2(h) < 30 for h in st["hist"])
  _, k = espo.espo_masks(jnp.arange(seeds, dtype=jnp.uint32), 1, L)
  assert chi2(np.bincount(np.asarray(k[0]), minlength=L + 1)) < 30
  assert st["half_offset"]["distinct_counts_per_row"] == [257, 129]
  _, k = espo.espo_masks(jnp.arange(4096, dtype=jnp.uint32) + 7, 1, 256)
  assert len(np.unique(np.asarray(k))) == 257


# ------------------------------------------------------------------------------ properties


def _arrays(seed=0, n=3, B=6, L=16.0):
  rng = np.random.default_rng(seed)
  new = jnp.asarray(rng.normal(-20, 3, (n, B)), jnp.float32)
  old = new - jnp.asarray(rng.normal(0, 0.3 * L, (1, B)) + rng.normal(0, 1, (n, B)), jnp.float32)
  ref = new - jnp.asarray(rng.normal(0, 2, (n, B)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=B), jnp.float32)
  return new, old, ref, adv


def test_on_policy_value_and_gradient():
  new, _, _, adv = _arrays()
  n, B = new.shape
  for eps in (0.2, 0.0):
    f = lambda l: espo.espo_objective(l, l, adv, length=16.0, clip_low=eps, clip_high=eps)
    np.testing.assert_allclose(f(new), jnp.mean(adv), rtol=1e-6)
    # d/dl_j of mean_b A_b exp(mean_j d_j): A_b / (n L B), whatever eps (torch.clamp's gradient at r = 1).
    chex.assert_trees_all_close(jax.grad(f)(new), jnp.broadcast_to(adv / (n * 16.0 * B), new.shape), rtol=1e-6)


def test_clipping_stops_the_gradient_outside_the_range():
  L = 8.0
  new = jnp.zeros((2, 4))
  old = -L * jnp.asarray([[0.3, -0.3, 0.3, -0.3]] * 2)  # log-ratios +0.3, -0.3 (ratio 1.35, 0.74)
  adv = jnp.asarray([1.0, 1.0, -1.0, -1.0])
  g = jax.grad(lambda l: espo.espo_objective(l, old, adv, length=L, clip_low=0.2, clip_high=0.2))(new)
  # Clipped: r > 1.2 with A > 0, r < 0.8 with A < 0; the others keep the ratio's gradient.
  np.testing.assert_array_equal(np.asarray(g[:, [0, 3]]), 0.0)
  assert (np.asarray(g[:, 1]) > 0).all() and (np.asarray(g[:, 2]) < 0).all()
  value = espo.espo_objective(new, old, adv, length=L, clip_low=0.2, clip_high=0.2)
  r = np.exp([0.3, -0.3, 0.3, -0.3])
  np.testing.assert_allclose(value, np.mean([1.2, r[1], -r[2], -0.8]), rtol=1e-6)


def test_kl_estimators():
  new, _, _, _ = _arrays()
  lbar = jnp.mean(new, 0)
  for est in ("k2", "k3"):
    kl, g = jax.value_and_grad(lambda l: jnp.sum(espo.espo_kl(l, lbar, length=16.0, estimator=est)))(lbar)
    assert kl == 0 and (g == 0).all()  # zero with zero gradient at the reference
  # k1: value D / L, gradient (1 + D) / L (the authors' gradient correction).
  D = jnp.asarray([0.5, -2.0])
  ref = jnp.zeros(2)
  kl, g = jax.value_and_grad(lambda l: jnp.sum(espo.espo_kl(l, ref, length=4.0, estimator="k1")))(D)
  np.testing.assert_allclose(kl, jnp.sum(D) / 4.0)
  np.testing.assert_allclose(g, (1 + D) / 4.0)
  np.testing.assert_allclose(espo.espo_kl(D, ref, length=4.0, estimator="k2"), D ** 2 / 8.0)
  np.testing.assert_allclose(espo.espo_kl(D, ref, length=4.0, estimator="k3"), (np.exp(-D) + D - 1) / 4.0, rtol=1e-6)
  with pytest.raises(ValueError, match="kl_estimator 'k4'"):
    espo.espo_kl(D, ref, length=4.0, estimator="k4")


def test_bound_is_below_and_exact_on_policy():
  for est in ("k2", "k3"):
    kw = dict(length=16.0, clip_low=0.2, clip_high=0.28, kl_beta=0.05, kl_estimator=est)
    gap = jax.jit(lambda new, old, ref, adv: espo.espo_objective(new, old, adv, elbo_ref=ref, **kw)
                  - espo.espo_bound_objective(new, old, adv, elbo_ref=ref, **kw))
    for seed in range(4):
      assert gap(*_arrays(seed)) >= -1e-6
  new, _, _, adv = _arrays(7)
  for eps in (0.2, 0.0):
    kw = dict(length=16.0, clip_low=eps, clip_high=eps)
    whole = jax.value_and_grad(lambda l: espo.espo_objective(l, l, adv, **kw))(new)
    bound = jax.value_and_grad(lambda l: espo.espo_bound_objective(l, l, adv, **kw))(new)
    chex.assert_trees_all_close(bound, whole, rtol=1e-6)


def test_hparams_are_checked():
  assert espo.ESPOHparams() == espo.ESPOHparams(clip_low=0.2, clip_high=0.2, kl_estimator="k2", complement=True,
                                                resample_masks=True, bound=False)
  with pytest.raises(ValueError, match="clip_low 1.5 must lie in"):
    espo.ESPOHparams(clip_low=1.5)
  with pytest.raises(ValueError, match="kl_estimator 'kl'"):
    espo.ESPOHparams(kl_estimator="kl")


# ------------------------------------------------------------------------------ masks


def test_mask_draw():
  seeds = jnp.asarray([3, 9, 27, 81], jnp.uint32)
  m, k = espo.espo_masks(seeds, 5, 12)
  assert m.shape == (5, 4, 12) and m.dtype == jnp.bool_ and k.shape == (5, 4)
  np.testing.assert_array_equal(m.sum(-1), k)
  assert ((k >= 0) & (k <= 12)).all()
  m2, _ = espo.espo_masks(seeds, 5, 12)
  np.testing.assert_array_equal(m, m2)  # a pure function of the seeds
  m3, _ = espo.espo_masks(seeds[::-1], 5, 12)
  np.testing.assert_array_equal(m3[:, ::-1], m)  # a row's masks follow its seed, not its position
  m4, _ = espo.espo_masks(seeds + 1, 5, 12)
  assert not np.array_equal(m, m4)
  assert len({tuple(r) for r in np.asarray(m).reshape(-1, 12)}) > 15  # samples of a row differ
  w, wc = espo.espo_weights(jnp.asarray([0, 1, 6, 12]), 12)
  np.testing.assert_allclose(w, [0.0, 13 / 2, 13 / 12, 13 / 24])
  np.testing.assert_allclose(wc, [13 / 24, 13 / 22, 13 / 12, 0.0])
  w, wc = espo.espo_weights(jnp.asarray([0, 4]), 12, complement=False)
  np.testing.assert_allclose(w, [0.0, 13 / 4]) and wc is None


def test_host_fields_resample_per_update():
  inputs = objectives.RolloutInputs(step=0, rows=4, gen_length=8, updates=3, lengths=np.full(4, 8), rl={},
                                    masks=None, row_seeds=lambda u: np.arange(4, dtype=np.uint32) + 100 * u)
  f = objectives.get("espo").host_fields(inputs)
  assert len(f) == 3 and len({id(x) for x in f}) == 3 and f[2]["row_seeds"][0] == 200
  inputs.rl = {"espo": {"resample_masks": False}}
  f = objectives.get("espo").host_fields(inputs)
  assert len({id(x) for x in f}) == 1 and f[0]["row_seeds"][0] == 0


# ------------------------------------------------------------------------------ the train step

B, P, L, N = 4, 4, 8, 2


def _direct_elbos(cfg, p, batch):
  """[n, B] ELBO samples built from elbo_term directly: the masked and the complementary pass."""
  masks, counts = espo.espo_masks(batch["row_seeds"], N, L)
  w, wc = espo.espo_weights(counts, L)
  t = lambda m, x: elbo.elbo_term(cfg, p, batch["tokens"], batch["attention_mask"], m, x)
  return jnp.stack([t(masks[j], w[j]) + t(~masks[j], wc[j]) for j in range(N)])


@pytest.fixture(scope="module")
def tiny():
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  params = llada.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.mask_token_id, (B, P + L)), jnp.int32),
           "attention_mask": jnp.ones((B, P + L), jnp.int32).at[0, 0].set(0),
           "advantages": jnp.asarray([1.0, -0.5, 0.0, 1.5], jnp.float32),
           "row_seeds": jnp.asarray([11, 22, 33, 44], jnp.uint32)}
  return cfg, params, batch, jax.jit(lambda p: _direct_elbos(cfg, p, batch))(params)


def _step(cfg, scfg, params, batch):
  return jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b))(params, batch)


def test_train_step_matches_the_pure_objective(tiny):
  cfg, params, batch, l0 = tiny
  grads = {}
  for bound in (False, True):
    hp = objectives.get("espo").hparams({"bound": bound})
    scfg = step_lib.StepConfig(objective="espo", num_mc_samples=N, gen_length=L, micro_batch_size=0 if bound else 2,
                               hparams=hp)
    assert objectives.get("espo").units(scfg) == (N if bound else 1)
    obj, grads[bound], aux = _step(cfg, scfg, params, batch)
    np.testing.assert_allclose(obj, jnp.mean(batch["advantages"]), rtol=1e-5)  # on-policy: ratio 1
    np.testing.assert_allclose(aux["elbo"], jnp.mean(l0), rtol=1e-5)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads[bound]))

  def direct(p):
    l = _direct_elbos(cfg, p, batch)
    return espo.espo_objective(l, l, batch["advantages"], length=L)

  chex.assert_trees_all_close(grads[False], jax.jit(jax.grad(direct))(params), rtol=2e-4, atol=1e-7)
  # On-policy the bound's gradient is the authors' objective's.
  chex.assert_trees_all_close(grads[True], grads[False], rtol=2e-4, atol=1e-7)


def test_train_step_off_policy_with_kl(tiny):
  """Old and reference terms from compute_old_terms (the same masks as the step's), then a step
  at other params: its value is espo_objective of those params' ELBOs."""
  cfg, params, batch, l0 = tiny
  hp = objectives.get("espo").hparams({})
  scfg = step_lib.StepConfig(objective="espo", num_mc_samples=N, gen_length=L, micro_batch_size=2, off_policy=True,
                             kl_beta=0.05, hparams=hp)
  terms = jax.jit(lambda p: step_lib.compute_old_terms(cfg, scfg, p, batch))
  old = terms(params)
  chex.assert_trees_all_close(old, l0, rtol=1e-5)
  ref = terms(jax.tree.map(lambda x: x * 1.05, params))
  new_params = jax.tree.map(lambda x: x * 0.98, params)
  obj, grads, aux = _step(cfg, scfg, new_params, dict(batch, old_elbo=old, ref_elbo=ref))
  want = espo.espo_objective(terms(new_params), old, batch["advantages"], length=L, elbo_ref=ref, kl_beta=0.05)
  np.testing.assert_allclose(obj, want, rtol=1e-5)
  assert aux["kl"] > 0 and aux["abs_d"] > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_recipe(tmp_path):
  sys.path.insert(0, str(ROOT))
  from bgpo_jax import config as config_lib
  from configs import countdown, code

  c = countdown.get_config("espo")
  c.tokenizer.kind, c.task.data_dir = "char", str(tmp_path)  # validate wants them; the recipe sets neither
  assert c.rl.objective == "espo" and c.rl.kl_beta == 3e-3 and c.rl.espo.clip_low == 0.0
  assert (c.rl.group_size, c.rl.prompts_per_step, c.rl.updates_per_batch, c.rl.num_mc_samples) == (6, 16, 8, 2)
  assert (c.optim.learning_rate, c.optim.grad_clip_norm, c.rollout.steps) == (3e-6, 0.2, 128)
  assert c.rl.advantage_baseline == "leave_one_out" and not c.rl.advantage_std
  config_lib.validate(c)
  c = code.get_config("espo")
  c.tokenizer.kind, c.task.data_dir = "char", str(tmp_path)
  assert (c.rl.group_size, c.rl.kl_beta, c.optim.learning_rate, c.optim.grad_clip_norm) == (10, 1e-2, 1e-6, 0.8)
  assert c.rl.espo.clip_low == 0.2
  c.rl.espo.clip_high = 2.0
  with pytest.raises(config_lib.ConfigError, match="clip_high 2.0"):
    config_lib.validate(c)


def test_remat_auto_follows_the_bound():
  from bgpo_jax import config as config_lib
  c = config_lib.base_config()
  c.rl.objective, c.model.remat_policy = "espo", "auto"
  assert config_lib.resolved_remat_policy(c) == "full"  # all n samples' graphs at once
  c.rl.espo.bound = True
  assert config_lib.resolved_remat_policy(c) == "activations"  # one sample at a time, like BGPO
