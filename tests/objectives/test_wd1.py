"""wd1: parity with the authors' loss (fixture from bgpo_jax/tools/parity/wd1.py), the weights'
properties, the one-step mask, and the objective through the real train step on a tiny LLaDA."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bgpo_jax.objectives.wd1  # noqa: F401  (registers "wd1")
from bgpo_jax import config as config_lib
from bgpo_jax import objectives
from bgpo_jax.diffusion import elbo
from bgpo_jax.models import llada
from bgpo_jax.objectives.diffu_grpo import _row_keys
from bgpo_jax.objectives.wd1 import WD1Hparams, sequence_sums, wd1_group_weights, wd1_objective, wd1_row_terms
from bgpo_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "wd1.json").read_text())


def _mask(lengths, L):
  return (np.arange(L)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", FIXTURE["loss_cases"], ids=lambda c: c["name"])
def test_matches_the_authors_loss_and_gradient(case):
  G = case["group_size"]
  logp = jnp.asarray(case["logp"], jnp.float32)
  adv = objectives.group_advantages(jnp.asarray(case["rewards"]).reshape(-1, G), normalize_std=False).reshape(-1)
  chex.assert_trees_all_close(adv, jnp.asarray(case["advantages"], jnp.float32), atol=1e-6)
  mask = _mask(case["lengths"], logp.shape[1])
  f = lambda x: wd1_objective(x, adv, mask, group_size=G, negative_weight=case["negative_weight"])
  value, grad = jax.value_and_grad(f)(logp)
  # The authors minimize their loss; ours is the objective to maximize.
  chex.assert_trees_all_close(value, -jnp.float32(case["loss"]), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grad, -jnp.asarray(case["grad_logp"], jnp.float32), rtol=1e-5, atol=1e-7)


def test_the_authors_token_logps_are_a_log_softmax_at_the_response_positions():
  t = FIXTURE["token_logps"]
  logits, tokens, L = jnp.asarray(t["logits"]), jnp.asarray(t["tokens"]), t["gen_length"]
  ours = jnp.take_along_axis(jax.nn.log_softmax(logits[:, -L:]), tokens[:, -L:, None], axis=-1)[..., 0]
  chex.assert_trees_all_close(ours, jnp.asarray(t["logps"]), rtol=1e-5, atol=1e-6)


def test_mask_scheme_matches_the_authors_statistics():
  m = FIXTURE["mask"]
  assert m["response_masked_fraction"] == 1.0 and m["p_mask_response_values"] == [1.0]
  np.testing.assert_allclose(m["p_mask_prompt_values"], [m["p_mask_prompt"]], rtol=1e-6)
  assert m["same_seed_same_mask"] and m["other_seed_other_mask"]
  p, B, P, L, mask_id = m["p_mask_prompt"], 256, m["prompt_len"], m["gen_length"], 999
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 900, (B, P + L)), jnp.int32)
  attn = jnp.ones((B, P + L), jnp.int32).at[:, :5].set(0)  # left padding
  seeds = jnp.arange(B, dtype=jnp.uint32) * 3 + 11
  draw = jax.jit(lambda s: elbo.one_step_masked_tokens(tokens, attn, gen_length=L, rng=_row_keys(s), prompt_mask_prob=p,
                                               mask_id=mask_id))
  noisy = np.asarray(draw(seeds)) == mask_id
  assert noisy.shape == (B, P + L) and noisy[:, P:].all()  # the whole response, as theirs
  real = noisy[:, 5:P]
  # Their masked fraction of the prompt, and ours of the real prompt tokens, are both ~ p.
  se = np.sqrt(p * (1 - p) / real.size)
  assert abs(real.mean() - p) < 5 * se and abs(m["prompt_masked_fraction"] - p) < 0.05
  # Padding: theirs is masked like any prompt position (no attention mask); ours never is.
  assert m["padding_masked_fraction"] > 0 and not noisy[:, :5].any()
  np.testing.assert_array_equal(np.asarray(draw(seeds)), np.asarray(draw(seeds)))
  assert not np.array_equal(np.asarray(draw(seeds)), np.asarray(draw(seeds + 1)))
  # A row's mask is its own: the same seed gives the same row in another batch.
  np.testing.assert_array_equal(np.asarray(draw(seeds))[3], np.asarray(
      elbo.one_step_masked_tokens(tokens[3:4], attn[3:4], gen_length=L, rng=_row_keys(seeds[3:4]),
                                  prompt_mask_prob=p, mask_id=mask_id))[0])


# ------------------------------------------------------------------------------ properties


def test_weights_hand_computed_and_invariant_to_a_shift():
  a = jnp.array([[1.0, 0.0, -1.0, 0.0]])
  e = np.exp([1.0, 0.0, -1.0, 0.0])
  pos, neg = e / e.sum(), e[[2, 1, 0, 3]] / e.sum()
  chex.assert_trees_all_close(wd1_group_weights(a), jnp.asarray([pos - neg], jnp.float32), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(wd1_group_weights(a, negative_weight=0.0), jnp.asarray([pos], jnp.float32), rtol=1e-6)
  chex.assert_trees_all_close(wd1_group_weights(a + 5.0), wd1_group_weights(a), atol=1e-6)
  chex.assert_trees_all_close(wd1_group_weights(a, psi=2.0), wd1_group_weights(2.0 * a), atol=1e-7)
  # Positive advantage -> positive weight, negative -> negative; weights sum to 0 for lambda = 1.
  w = wd1_group_weights(jnp.array([[2.0, 0.5, -0.3, -2.2]]))
  assert np.all(np.sign(w) == [1, 1, -1, -1]) and abs(float(w.sum())) < 1e-6


def test_all_equal_group_adds_nothing_but_positive_only_is_sft():
  logp = -jnp.abs(jax.random.normal(jax.random.key(0), (4, 5)))
  mask = _mask([5, 3, 2, 5], 5)
  tie = jnp.zeros(4)
  v, g = jax.value_and_grad(lambda x: wd1_objective(x, tie, mask, group_size=4))(logp)
  assert float(v) == 0.0 and float(jnp.abs(g).max()) == 0.0
  v = wd1_objective(logp, tie, mask, group_size=4, negative_weight=0.0)
  chex.assert_trees_all_close(v, jnp.mean(sequence_sums(logp, mask)) , rtol=1e-6)  # mean log-likelihood
  # A zero-advantage row of a mixed group does get a weight (the softmaxes are not symmetric).
  assert abs(float(wd1_group_weights(jnp.array([[2.0, 0.0, -1.0, -1.0]]))[0, 1])) > 1e-3


def test_tokens_after_the_stop_token_and_non_finite_masked_values_do_not_count():
  logp = jnp.array([[-1.0, -2.0, -jnp.inf], [-0.5, -0.5, -0.5]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  v = wd1_row_terms(logp, jnp.array([2.0, -1.0]), mask)
  chex.assert_trees_all_close(v, jnp.array([-6.0, 1.5]))
  g = jax.grad(lambda x: jnp.sum(wd1_row_terms(x, jnp.array([2.0, -1.0]), mask)))(logp)
  assert np.isfinite(np.asarray(g)).all() and float(g[0, 2]) == 0.0


def test_kl_is_zero_at_the_reference_and_subtracted():
  logp = -jnp.abs(jax.random.normal(jax.random.key(1), (4, 6)))
  mask, adv = _mask([6, 4, 6, 1], 6), jnp.array([1.0, -1.0, 0.5, -0.5])
  f = jax.jit(jax.value_and_grad(lambda x, ref, beta: wd1_objective(x, adv, mask, group_size=2, logp_ref=ref,
                                                                      beta=beta)))
  base, g0 = f(logp, logp, 0.0)
  at_ref, g = f(logp, logp, 0.3)
  chex.assert_trees_all_close((at_ref, g), (base, g0), atol=1e-6)
  ref = logp - 0.4
  kl = jnp.mean(objectives.sequence_means(objectives.k3(ref - logp), mask))
  v, _ = f(logp, ref, 0.3)
  chex.assert_trees_all_close(v, base - 0.3 * kl, rtol=1e-6)
  assert float(kl) > 0


def test_row_terms_sum_over_interleaved_micro_batches_to_the_whole_batch():
  logp = -jnp.abs(jax.random.normal(jax.random.key(2), (8, 5)))
  adv = jax.random.normal(jax.random.key(3), (8,))
  mask = _mask([5, 1, 3, 5, 2, 5, 4, 5], 5)
  whole = wd1_objective(logp, adv, mask, group_size=4)
  w = 4 * wd1_group_weights(adv.reshape(2, 4)).reshape(-1)
  parts = [jnp.sum(wd1_row_terms(logp[k::2], w[k::2], mask[k::2])) for k in range(2)]  # as the step splits
  chex.assert_trees_all_close(sum(parts) / 8, whole, rtol=1e-6)


def test_hparams_ranges_and_config_section():
  with pytest.raises(ValueError, match="psi 0.0 must be > 0"):
    WD1Hparams(psi=0.0)
  with pytest.raises(ValueError, match="negative_weight -1.0 must be >= 0"):
    WD1Hparams(negative_weight=-1.0)
  with pytest.raises(ValueError, match="prompt_mask_prob 1.0 must lie in"):
    WD1Hparams(prompt_mask_prob=1.0)
  with pytest.raises(ValueError, match="group_size"):
    wd1_objective(jnp.zeros((6, 2)), jnp.zeros(6), jnp.ones((6, 2)), group_size=4)
  assert objectives.config_section(objectives.get("wd1")) == {"psi": 1.0, "negative_weight": 1.0,
                                                              "prompt_mask_prob": 0.15}
  assert not objectives.get("wd1").exact_group_skipping


def test_recipe_is_the_authors():
  sys.path.insert(0, str(ROOT))
  from configs import math as math_config, sudoku as sudoku_config
  c = math_config.get_config("wd1")
  assert (c.rl.objective, c.rl.kl_beta, c.rl.group_size, c.rl.prompts_per_step, c.rl.updates_per_batch) == (
      "wd1", 0.0, 6, 8, 12)
  assert not c.rl.advantage_std and c.rl.wd1.negative_weight == 1.0 and c.rl.wd1.prompt_mask_prob == 0.15
  assert (c.optim.learning_rate, c.optim.grad_clip_norm, c.rollout.gen_length, c.rollout.temperature) == (
      3e-6, 0.2, 256, 0.9)
  assert objectives.get("wd1").warnings(c) == ()
  assert sudoku_config.get_config("wd1").rl.updates_per_batch == 8
  c.rl.advantage_std = True
  assert "advantage_std" in objectives.get("wd1").warnings(c)[0]


# ------------------------------------------------------------------------------ the train step

B, G, P, L = 8, 4, 6, 8


@dataclasses.dataclass
class _Inputs(objectives.RolloutInputs):
  advantages: np.ndarray | None = None  # what wd1 reads from the rollout (see WD1.host_fields)


@pytest.fixture(scope="module")
def tiny():
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  params = llada.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (B, P + L)).astype(np.int32)  # never the mask token
  attn = np.ones((B, P + L), np.int32)
  attn[::3, :2] = 0  # some left-padded prompts
  rewards = np.array([[1, 0, 0, 1], [0.5, 2.0, 0.0, 0.5]], np.float32)
  adv = np.asarray(objectives.group_advantages(jnp.asarray(rewards), normalize_std=False)).reshape(-1)
  lengths = np.array([8, 3, 1, 8, 5, 8, 2, 7])
  rl = config_lib.base_config().rl
  rl.group_size = G
  rl.updates_per_batch = 2
  inputs = _Inputs(step=0, rows=B, gen_length=L, updates=2, lengths=lengths, rl=rl, masks=None,
                   row_seeds=lambda u: (np.arange(B, dtype=np.uint32) * 7 + 100 * u + 1), advantages=adv)
  fields = objectives.get("wd1").host_fields(inputs)
  batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attn), "advantages": jnp.asarray(adv)}
  return cfg, params, batch, fields, adv, lengths


def _logps(cfg, params, b):
  return elbo.one_step_token_logps(cfg, params, b["tokens"], b["attention_mask"], gen_length=L,
                                   rng=_row_keys(b["row_seeds"]), prompt_mask_prob=0.15)


def test_host_fields(tiny):
  _, _, _, fields, adv, lengths = tiny
  assert len(fields) == 2 and fields[0] is not fields[1]
  assert not np.array_equal(fields[0]["row_seeds"], fields[1]["row_seeds"])  # fresh masks per update
  np.testing.assert_array_equal(fields[0]["response_mask"], _mask(lengths, L))
  w = fields[0]["wd1_weights"]
  assert w.dtype == np.float32 and w.shape == (B,)
  np.testing.assert_allclose(w, G * np.asarray(wd1_group_weights(adv.reshape(-1, G))).reshape(-1), rtol=1e-6)
  np.testing.assert_allclose(w.reshape(-1, G).sum(axis=1), 0.0, atol=1e-6)


def test_step_gradient_is_the_gradient_of_the_whole_batch_objective(tiny):
  cfg, params, batch, fields, adv, lengths = tiny
  b = dict(batch, **{k: jnp.asarray(v) for k, v in fields[0].items()})
  # Two interleaved micro-batches: each holds half of every group.
  scfg = step_lib.StepConfig(objective="wd1", gen_length=L, micro_batch_size=4, off_policy=True)
  assert {f.name for f in objectives.batch_layout(scfg)} == {"tokens", "attention_mask", "advantages",
                                                             "response_mask", "row_seeds", "wd1_weights"}
  obj, grads, aux = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, scfg, p, bb))(params, b)
  mask = jnp.asarray(_mask(lengths, L))
  want, want_grads = jax.jit(jax.value_and_grad(
      lambda p: wd1_objective(_logps(cfg, p, b), jnp.asarray(adv), mask, group_size=G)))(params)
  np.testing.assert_allclose(obj, want, rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  assert scale > 0
  chex.assert_trees_all_close(grads, want_grads, rtol=2e-4, atol=1e-5 * scale)
  lp = _logps(cfg, params, b)
  np.testing.assert_allclose(aux["elbo"], jnp.mean(sequence_sums(lp, mask)), rtol=1e-5)
  assert float(aux["abs_d"]) == 0.0 and float(aux["kl"]) == 0.0


def test_step_with_kl_to_a_reference(tiny):
  cfg, params, batch, fields, adv, lengths = tiny
  b = dict(batch, **{k: jnp.asarray(v) for k, v in fields[1].items()})
  scfg = step_lib.StepConfig(objective="wd1", gen_length=L, kl_beta=0.5)
  impl = objectives.get("wd1")
  terms = jax.jit(lambda p, bb: impl.old_terms(cfg, scfg, p, bb))
  run = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, scfg, p, bb))
  mask = jnp.asarray(_mask(lengths, L))
  lp = terms(params, b)  # the policy's own token log-probs on this update's masks
  no_kl = float(wd1_objective(lp, jnp.asarray(adv), mask, group_size=G))
  # At the reference the KL vanishes.
  o, _, aux = run(params, dict(b, ref_logps=lp))
  assert float(aux["kl"]) < 1e-9
  np.testing.assert_allclose(float(o), no_kl, rtol=1e-5)
  # Away from it the objective drops by beta * KL.
  ref = terms(jax.tree.map(lambda p: p * 1.5, params), b)
  o, g, aux = run(params, dict(b, ref_logps=ref))
  assert float(aux["kl"]) > 1e-3 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  np.testing.assert_allclose(no_kl - float(o), 0.5 * float(aux["kl"]), rtol=1e-3, atol=1e-6 * abs(no_kl))
  want = wd1_objective(lp, jnp.asarray(adv), mask, group_size=G, logp_ref=ref, beta=0.5)
  np.testing.assert_allclose(float(o), float(want), rtol=1e-5)
