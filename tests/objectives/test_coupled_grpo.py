"""Coupled-GRPO (bgpo_jax/objectives/coupled_grpo.py): parity with the authors' code
(apple/ml-diffucoder, fixture from bgpo_jax/tools/parity/coupled_grpo.py), hand-checked
properties, the mask draw, and the objective through the real train step on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import objectives
from bgpo_jax.objectives import coupled_grpo as cg  # registers "coupled_grpo"
from bgpo_jax.objectives.base import RolloutInputs

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "coupled_grpo.json").read_text())


def _vocab_logp(x, vocab):
  """The parity script's stand-in model: logit x at the target, 0 at the V - 1 others."""
  return x - jnp.log(jnp.exp(x) + (vocab - 1))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_matches_the_authors_loss_and_gradient(case):
  x = jnp.asarray(case["x"], jnp.float32)  # [3, B, L]: full, m, ~m
  mask = jnp.asarray(case["mask"], bool)
  t = jnp.full((x.shape[1],), case["ratio"], jnp.float32)
  rmask = jnp.asarray(case["response_mask"], jnp.float32)
  adv = jnp.asarray(case["advantages"], jnp.float32)
  old = None if case["old_logps"] is None else jnp.asarray(case["old_logps"], jnp.float32)
  ref = None if case["ref_logps"] is None else jnp.asarray(case["ref_logps"], jnp.float32)
  assert case["weights"][0] == 1.0 and case["weights"][2] == pytest.approx(1.0 / (1.0 - case["ratio"]))

  def logps(x):
    lp = _vocab_logp(x, case["vocab"])
    return cg.coupled_token_logps(lp[0], lp[1], lp[2], mask, t)

  chex.assert_trees_all_close(jax.jit(logps)(x), jnp.asarray(case["authors_logps"]), rtol=1e-5, atol=1e-6)

  def objective(x):
    new = logps(x)
    return cg.coupled_grpo_objective(new, new if old is None else old, ref, adv, rmask,
                                     clip_low=case["clip_low"], clip_high=case["clip_high"],
                                     beta=case["beta"], token_average="batch")

  value, grad = jax.jit(jax.value_and_grad(objective))(x)
  chex.assert_trees_all_close(value, -case["loss"], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(grad, -jnp.asarray(case["grad_x"]), rtol=1e-5, atol=1e-7)
  if old is not None:  # the off-policy cases exercise the clip on both sides
    r = np.exp(np.asarray(case["authors_logps"]) - np.asarray(old))
    live = np.asarray(case["response_mask"]) > 0
    assert np.any(live & (r > 1 + case["clip_high"])) and np.any(live & (r < 1 - case["clip_low"]))


def test_fixture_is_the_authors_current_code():
  assert FIXTURE["source"] == "apple/ml-diffucoder src/open_r1/coupled_grpo.py"
  assert len(FIXTURE["commit"]) == 40


# ----------------------------------------------------------------------------- mask draw


def test_authors_mask_properties_are_the_formulas_we_implement():
  m = FIXTURE["masks"]
  # Every property held for every seed: the pair is complementary over the completion, the full
  # forward masks it all, the prompt is never masked, weights 1, 1/t, 1/(1 - t).
  assert all(v == 1.0 for v in m["checks"].values()), m["checks"]
  t = np.asarray(m["t"])
  assert t.min() >= 0.2 and t.max() <= 0.8 and t.min() < 0.25 and t.max() > 0.75
  # One t for the whole batch: each row's masked fraction scatters around the same t.
  frac = np.asarray(m["mask_fraction"])  # [seeds, B]
  assert np.abs(frac.mean(axis=1) - t).max() < 0.15


def test_mask_draw():
  seeds = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, 32, dtype=np.uint64), jnp.uint32)
  L = 1024
  draw = jax.jit(cg.coupled_masks, static_argnums=(1, 2, 3))
  t, m = draw(seeds, L)
  assert t.shape == (32,) and t.dtype == jnp.float32 and m.shape == (32, L) and m.dtype == jnp.bool_
  assert float(t.min()) >= 0.2 and float(t.max()) < 0.8
  assert float(t.max() - t.min()) > 0.4  # rows draw their own t
  # Masked fraction ~ t per row (binomial sd <= sqrt(0.25 / L) ~ 0.016).
  assert float(jnp.max(jnp.abs(jnp.mean(m, axis=1) - t))) < 0.07
  # A pure function of each row's seed: same seeds, same masks, whatever the other rows.
  t2, m2 = draw(seeds[::-1], L)
  chex.assert_trees_all_equal((t2, m2), (t[::-1], m[::-1]))
  t3, m3 = draw(seeds + 1, L)
  assert not bool(jnp.any(t3 == t)) and float(jnp.mean(m3 != m)) > 0.3
  # Another range.
  t4, _ = draw(seeds, 8, 0.5, 0.5)
  chex.assert_trees_all_close(t4, jnp.full((32,), 0.5))


def test_coupled_token_logps_hand_computed():
  a = jnp.array([[-1.0, -2.0, -3.0]])
  b = jnp.array([[-0.5, -9.0, -0.25]])  # used where m
  c = jnp.array([[-9.0, -0.6, -9.0]])  # used where not m
  m = jnp.array([[True, False, True]])
  got = cg.coupled_token_logps(a, b, c, m, jnp.array([0.25]))
  want = [[(-1.0 - 0.5 / 0.25) / 2, (-2.0 - 0.6 / 0.75) / 2, (-3.0 - 0.25 / 0.25) / 2]]
  chex.assert_trees_all_close(got, jnp.array(want), rtol=1e-6)


# ----------------------------------------------------------------------------- loss properties

B = 4
ADV = jnp.array([1.2, -0.8, 0.0, -1.5], jnp.float32)


def test_on_policy_value_is_mean_advantage_and_kl_zero_at_reference():
  k1, k2 = jax.random.split(jax.random.key(3))
  logp = -jnp.abs(jax.random.normal(k1, (B, 7)))
  mask = (jax.random.uniform(k2, (B, 7)) < 0.7).at[:, 0].set(True)
  f = jax.jit(jax.value_and_grad(lambda x, beta: cg.coupled_grpo_objective(x, x, x, ADV, mask, beta=beta)))
  count = jnp.sum(mask, axis=1, keepdims=True)
  for beta in (0.0, 0.01, 1.0):
    v, g = f(logp, beta)
    chex.assert_trees_all_close(v, jnp.mean(ADV), rtol=1e-6)
    chex.assert_trees_all_close(g, jnp.where(mask, ADV[:, None] / (B * count), 0.0), rtol=1e-6, atol=1e-9)


def test_clipping_and_kl_hand_computed():
  new = jnp.array([[math.log(1.7), math.log(0.3), 1e6]])
  old = jnp.array([[0.0, 0.0, -1e6]])
  mask = jnp.array([[1, 1, 0]])  # the third token is garbage and not counted
  a = jnp.array([1.0])
  # eps 0.5: min(1.7, 1.5) = 1.5 ; min(0.3, 0.5) = 0.3 -> 0.9
  assert float(cg.coupled_grpo_objective(new, old, None, a, mask)) == pytest.approx(0.9, rel=1e-6)
  # A < 0: min(-1.7, -1.5) = -1.7 ; min(-0.3, -0.5) = -0.5 -> -1.1
  assert float(cg.coupled_grpo_objective(new, old, None, -a, mask)) == pytest.approx(-1.1, rel=1e-6)
  # Asymmetric: [0.8, 1.28]: min(1.7, 1.28) = 1.28 ; min(0.3, 0.8) = 0.3
  v = cg.coupled_grpo_objective(new, old, None, a, mask, clip_low=0.2, clip_high=0.28)
  assert float(v) == pytest.approx((1.28 + 0.3) / 2, rel=1e-6)
  # Dual clip 1.6 for A < 0: max(-1.7, -1.6) = -1.6 ; -0.5
  v = cg.coupled_grpo_objective(new, old, None, -a, mask, dual_clip=1.6)
  assert float(v) == pytest.approx((-1.6 - 0.5) / 2, rel=1e-6)
  # KL: ref - new = log 2 on both tokens: k3 = 2 - log 2 - 1.
  v = cg.coupled_grpo_objective(new, old, new + math.log(2.0), a, mask, beta=0.1)
  assert float(v) == pytest.approx(0.9 - 0.1 * (1.0 - math.log(2.0)), rel=1e-6)


def test_sequence_vs_batch_token_average_and_errors():
  new = jnp.log(jnp.array([[1.1, 1.1, 1.1, 1.1], [0.9, 1.0, 1.0, 1.0]]))
  old = jnp.zeros_like(new)
  mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
  a = jnp.ones(2)
  assert float(cg.coupled_grpo_objective(new, old, None, a, mask)) == pytest.approx(1.0, rel=1e-6)
  bat = cg.coupled_grpo_objective(new, old, None, a, mask, token_average="batch")
  assert float(bat) == pytest.approx((4 * 1.1 + 0.9) / 5, rel=1e-6)
  with pytest.raises(ValueError, match="token_average"):
    cg.coupled_grpo_objective(new, old, None, a, mask, token_average="x")
  with pytest.raises(ValueError, match="advantages"):
    cg.coupled_grpo_objective(new, old, None, jnp.ones(3), mask)
  with pytest.raises(ValueError, match="dual_clip"):
    cg.coupled_grpo_objective(new, old, None, a, mask, dual_clip=0.5)


def test_hparams_defaults_and_validation():
  hp = cg.CoupledGRPOHparams()
  assert (hp.clip_low, hp.clip_high, hp.mask_ratio_min, hp.mask_ratio_max) == (0.5, 0.5, 0.2, 0.8)
  assert hp.dual_clip is None and hp.token_average == "sequence" and not hp.resample_masks
  for bad, match in ((dict(clip_low=1.0), "clip_low 1.0"), (dict(clip_high=-0.1), "clip_high"),
                     (dict(dual_clip=1.0), "dual_clip"), (dict(mask_ratio_min=0.9), "mask_ratio_min 0.9"),
                     (dict(mask_ratio_max=1.0), "mask_ratio_max 1.0"), (dict(token_average="x"), "token_average")):
    with pytest.raises(ValueError, match=match):
      cg.CoupledGRPOHparams(**bad)


# ----------------------------------------------------------------------------- the train step

P, L = 4, 8


def _inputs(rows, lengths, resample=False, updates=2):
  section = {"coupled_grpo": {"resample_masks": resample}}
  seeds = lambda u: (np.arange(rows, dtype=np.uint32) * 7919 + 1000 * u + 17).astype(np.uint32)
  return RolloutInputs(step=0, rows=rows, gen_length=L, updates=updates, lengths=np.asarray(lengths), rl=section,
                       masks=lambda n, e: (_ for _ in ()).throw(AssertionError("MC masks unused")), row_seeds=seeds)


def test_host_fields_share_or_resample_masks():
  obj = objectives.get("coupled_grpo")
  shared = obj.host_fields(_inputs(4, [8, 3, 1, 5]))
  assert len(shared) == 2 and shared[0] is shared[1]
  np.testing.assert_array_equal(shared[0]["response_mask"].sum(axis=1), [8, 3, 1, 5])
  fresh = obj.host_fields(_inputs(4, [8, 3, 1, 5], resample=True))
  assert fresh[0] is not fresh[1] and not np.array_equal(fresh[0]["row_seeds"], fresh[1]["row_seeds"])


@pytest.fixture(scope="module")
def tiny():
  from bgpo_jax.models import llada
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  params = llada.init_params(cfg, jax.random.key(0))
  perturb = lambda p, k: jax.tree.map(lambda x, kk: x + 0.05 * jax.random.normal(kk, x.shape, x.dtype), p,
                                      jax.tree.unflatten(jax.tree.structure(p),
                                                         list(jax.random.split(k, len(jax.tree.leaves(p))))))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.mask_token_id, (B, P + L)), jnp.int32)
  attn = jnp.ones((B, P + L), jnp.int32).at[1, :2].set(0)  # one left-padded prompt
  fields = objectives.get("coupled_grpo").host_fields(_inputs(B, [8, 3, 1, 5]))[0]
  batch = {"tokens": tokens, "attention_mask": attn, "advantages": ADV,
           **{k: jnp.asarray(v) for k, v in fields.items()}}
  perturb = jax.jit(perturb)
  return dict(cfg=cfg, params=params, old=perturb(params, jax.random.key(1)), ref=perturb(params, jax.random.key(2)),
              batch=batch)


def _direct(cfg, scfg, params, batch, old, ref):
  """jax.value_and_grad of the pure loss on the model's coupled log-probs, the whole batch at once
  (and the log-probs)."""
  from bgpo_jax.diffusion import elbo
  hp = scfg.hparams

  def f(p):
    t, m = cg.coupled_masks(batch["row_seeds"], L)
    lp = [elbo.response_token_logps(cfg, p, elbo.masked_sequence(batch["tokens"], mk, cfg.mask_token_id),
                                    batch["attention_mask"], batch["tokens"][:, -L:])
          for mk in (jnp.ones_like(m), m, ~m)]
    new = cg.coupled_token_logps(*lp, m, t)
    value = cg.coupled_grpo_objective(new, old, ref, batch["advantages"], batch["response_mask"],
                                      clip_low=hp.clip_low, clip_high=hp.clip_high, beta=scfg.kl_beta)
    return value, new

  (value, new), grads = jax.value_and_grad(f, has_aux=True)(params)
  return value, grads, new


def _close(got, want, rel=2e-4):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert scale > 0
  chex.assert_trees_all_close(got, want, rtol=rel, atol=rel * scale)


def test_train_step_matches_the_pure_loss(tiny):
  """Off-policy with the KL through the real step (old / reference terms from compute_old_terms),
  against jax.grad of the pure loss; then the same compiled step on-policy: old = reference = the
  current params' own terms gives the value mean(A) (ratio 1, KL 0)."""
  from bgpo_jax.train import step as step_lib
  scfg = step_lib.StepConfig(objective="coupled_grpo", num_mc_samples=1, gen_length=L, micro_batch_size=2,
                             off_policy=True, kl_beta=0.05)
  assert scfg.impl.units(scfg) == 1 and scfg.impl.remat_policy == "full"
  terms = jax.jit(lambda p, b: step_lib.compute_old_terms(tiny["cfg"], scfg, p, b))
  step = jax.jit(lambda p, b: step_lib.accumulate_gradients(tiny["cfg"], scfg, p, b))
  direct = jax.jit(lambda p, b: _direct(tiny["cfg"], scfg, p, b, b["old_logps"], b["ref_logps"]))
  batch = dict(tiny["batch"], old_logps=terms(tiny["old"], tiny["batch"]), ref_logps=terms(tiny["ref"], tiny["batch"]))
  assert batch["old_logps"].shape == (B, L)
  obj, grads, aux = step(tiny["params"], batch)
  want, want_grads, new = direct(tiny["params"], batch)
  assert np.isfinite(float(obj)) and float(aux["kl"]) > 0 and float(aux["abs_d"]) > 0
  chex.assert_trees_all_close(obj, want, rtol=1e-5)
  _close(grads, want_grads)
  # old_terms draws the same pair per row as the step: the current params' terms are its log-probs.
  own = terms(tiny["params"], batch)
  chex.assert_trees_all_close(own, new, rtol=1e-5, atol=1e-6)
  batch = dict(batch, old_logps=own, ref_logps=own)
  obj, grads, aux = step(tiny["params"], batch)
  want, want_grads, _ = direct(tiny["params"], batch)
  chex.assert_trees_all_close(obj, jnp.mean(ADV), rtol=1e-5)
  assert float(aux["kl"]) < 1e-6 and float(aux["abs_d"]) < 1e-6 and np.isfinite(float(aux["elbo"]))
  _close(grads, want_grads)


# ----------------------------------------------------------------------------- config


def test_recipe_and_config():
  from bgpo_jax import config as config_lib
  sys.path.insert(0, str(ROOT))
  from configs import code, demo

  c = code.get_config("coupled_grpo")
  assert c.rl.objective == "coupled_grpo" and c.rl.kl_beta == 0.01 and c.rl.group_size == 10
  assert c.rl.prompts_per_step == 8 and c.rl.updates_per_batch == 2 and not c.rl.advantage_std
  assert c.rl.coupled_grpo.clip_low == 0.5 and c.optim.grad_clip_norm == 0.2 and c.rollout.block_length == 256
  hp = objectives.get("coupled_grpo").hparams_from_config(c.rl)
  assert hp == cg.CoupledGRPOHparams()

  d = demo.get_config()
  d.rl.objective = "coupled_grpo"
  config_lib.validate(d)
  d.rl.coupled_grpo.token_average = "batch"
  d.rl.skip_zero_advantage = True
  with pytest.raises(config_lib.ConfigError, match="skip_zero_advantage"):
    config_lib.validate(d)
  d.rl.coupled_grpo.token_average = "sequence"
  d.rl.coupled_grpo.mask_ratio_min = 0.0
  with pytest.raises(config_lib.ConfigError, match="mask_ratio_min 0.0"):
    config_lib.validate(d)
