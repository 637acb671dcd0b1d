"""The scanned train step: BGPO's accumulated gradient equals grad of VRPO-OL on-policy, micro-batching
and off-policy bookkeeping change nothing they should not, and a jitted, donated step updates."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bgpo_jax import objectives
from bgpo_jax.config import base_config
from bgpo_jax.diffusion import elbo, masking
from bgpo_jax.models import llada
from bgpo_jax.objectives.bgpo import ElboHparams
from bgpo_jax.objectives.diffu_grpo import DiffuGRPOHparams
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import rl_batch as rl_batch_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib

B, P, L, N = 8, 6, 16, 4


def _model_cfg():
  return dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=2)


def make_batch(model_cfg, seed=0, n=N, b=B, estimator="stratified"):
  rng = np.random.default_rng(seed)
  vocab = [i for i in range(model_cfg.vocab_size) if i not in (model_cfg.mask_token_id,)]
  tokens = rng.choice(vocab, size=(b, P + L)).astype(np.int32)
  attn = np.ones((b, P + L), np.int32)
  attn[: b // 2, :2] = 0  # left padding on half the rows
  tokens[attn == 0] = model_cfg.pad_token_id
  masks, weights = masking.sample_masks(jax.random.key(seed), b, L, n, estimator=estimator)
  adv = rng.normal(size=(b,)).astype(np.float32)
  adv[0] = 0.0
  return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attn), "advantages": jnp.asarray(adv),
          "mc_masks": masks, "mc_weights": weights}


@pytest.fixture(scope="module")
def setup():
  cfg = _model_cfg()
  params = llada.init_params(cfg, jax.random.key(1))
  return cfg, params, make_batch(cfg)


def _elbo_stack(cfg, params, batch):
  return jnp.stack([elbo.elbo_term(cfg, params, batch["tokens"], batch["attention_mask"],
                                   batch["mc_masks"][j], batch["mc_weights"][j]) for j in range(N)])


def test_scanned_bgpo_gradient_equals_grad_of_vrpo_on_policy(setup):
  cfg, params, batch = setup
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L)
  obj, grads, _ = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b))(params, batch)

  def vrpo(p):
    l = _elbo_stack(cfg, p, batch)
    return objectives.vrpo_objective(l, jax.lax.stop_gradient(l), batch["advantages"],
                                     lengths=jnp.full((B,), float(L)))

  ref_obj, ref_grads = jax.jit(jax.value_and_grad(vrpo))(params)  # op by op is slow on CPU
  np.testing.assert_allclose(obj, ref_obj, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(obj, batch["advantages"].mean(), rtol=1e-5, atol=1e-6)  # on-policy R = A
  chex.assert_trees_all_close(grads, ref_grads, rtol=2e-4, atol=1e-7)
  assert float(jnp.abs(jax.tree.leaves(grads)[0]).max()) > 0


def test_vrpo_step_matches_bgpo_step_on_policy(setup):
  cfg, params, batch = setup
  g = {}
  for name in ("bgpo", "vrpo_ol"):
    scfg = step_lib.StepConfig(objective=name, num_mc_samples=N, gen_length=L)
    g[name] = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b)[1])(params, batch)
  chex.assert_trees_all_close(g["bgpo"], g["vrpo_ol"], rtol=2e-4, atol=1e-7)


def test_micro_batching_does_not_change_gradient(setup):
  cfg, params, batch = setup
  out = {}
  for mb in (0, 2, 4):
    scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, micro_batch_size=mb)
    out[mb] = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b)[:2])(params, batch)
  for mb in (2, 4):
    np.testing.assert_allclose(out[mb][0], out[0][0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out[mb][1], out[0][1], rtol=1e-4, atol=1e-7)


def test_micro_batch_must_divide_batch(setup):
  cfg, params, batch = setup
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, micro_batch_size=3)
  with pytest.raises(ValueError, match="not a multiple of micro_batch_size 3"):
    step_lib.accumulate_gradients(cfg, scfg, params, batch)


def test_old_terms_pass_and_off_policy_step(setup):
  cfg, params, batch = setup
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, micro_batch_size=4,
                             off_policy=True, hparams=ElboHparams(clip_eps=0.2, dual_clip=3.0))
  old = jax.jit(lambda p, b: step_lib.compute_old_terms(cfg, scfg, p, b))(params, batch)
  chex.assert_shape(old, (N, B))
  chex.assert_trees_all_close(old, _elbo_stack(cfg, params, batch), rtol=1e-5, atol=1e-5)
  # Old terms from the same params: the off-policy step is the on-policy step (clipping inactive).
  off = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b)[1])(params, dict(batch, old_elbo=old))
  on_cfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L)
  on = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, on_cfg, p, b)[1])(params, batch)
  chex.assert_trees_all_close(off, on, rtol=2e-4, atol=1e-7)
  # With different old terms the gradient differs: they are really used.
  shifted = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b)[1])(
      params, dict(batch, old_elbo=old - 3.0 * L))
  assert not np.allclose(jax.tree.leaves(shifted)[0], jax.tree.leaves(on)[0])


def test_diffu_grpo_and_sft_gradients_are_finite(setup):
  cfg, params, batch = setup
  b = dict(batch, response_mask=jnp.ones((B, L), jnp.float32), row_seeds=jnp.arange(B, dtype=jnp.uint32))
  for name in ("diffu_grpo", "sft"):
    scfg = step_lib.StepConfig(objective=name, num_mc_samples=N, gen_length=L, micro_batch_size=4)
    obj, grads, _ = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, scfg, p, bb))(params, b)
    assert np.isfinite(float(obj))
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    assert np.isfinite(norm) and norm > 0, name


def test_jitted_step_updates_and_donates(setup):
  cfg, params, batch = setup
  c = base_config()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 0
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=jax.tree.map(jnp.copy, params))
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, micro_batch_size=4)
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  compiled = step.lower(state, batch).compile()
  mem = step_lib.memory_report(compiled)
  assert mem["temp_bytes"] > 0 and mem["total_bytes"] > 0
  before = jax.tree.map(np.asarray, state.params)
  new_state, metrics = compiled(state, batch)
  assert int(new_state.step) == 1
  for k in ("train/loss", "train/grad_norm", "train/lr", "train/param_norm"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["train/grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new_state.params, before)
  assert max(jax.tree.leaves(moved)) > 1e-5
  # Zero-advantage batch: BGPO gradient is exactly zero.
  zero_adv = dict(batch, advantages=jnp.zeros((B,), jnp.float32))
  _, g, _ = step_lib.accumulate_gradients(cfg, scfg, params, zero_adv)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) == 0.0


def test_steps_improve_their_objective(setup):
  """Repeated updates on one batch raise the objective (guards the sign of the update)."""
  cfg, params, batch = setup
  c = base_config()
  c.optim.learning_rate = 3e-3
  c.optim.grad_clip_norm = 0.0
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  fresh = lambda: jax.tree.map(jnp.copy, params)  # the step donates the state's buffers
  # SFT: the loss (minus the ELBO per token) falls.
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=fresh())
  scfg = step_lib.StepConfig(objective="sft", num_mc_samples=N, gen_length=L)
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  losses = []
  for _ in range(4):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  # BGPO: the ELBO of the positive-advantage rows rises relative to the negative ones.
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=fresh())
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L)
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  adv = np.asarray(batch["advantages"])
  before = np.asarray(_elbo_stack(cfg, params, batch)).mean(0)
  for _ in range(3):
    state, _ = step(state, batch)
  after = np.asarray(_elbo_stack(cfg, state.params, batch)).mean(0)
  gain = after - before
  assert gain[adv > 0].mean() > gain[adv < 0].mean() + 0.1, (gain, adv)


def test_skipping_zero_advantage_groups_keeps_the_update(setup):
  cfg, params, batch = setup
  g = 2
  adv = np.asarray(batch["advantages"]).copy()
  adv[0:2] = 0.0  # group 0: all rewards equal
  adv[4:6] = 0.0  # group 2
  rows, scale = rl_batch_lib.live_group_rows(adv, g, unit=1)
  np.testing.assert_array_equal(rows, [2, 3, 6, 7])
  assert scale == 0.5
  full = dict(batch, advantages=jnp.asarray(adv))
  kept = {k: (v[:, rows] if k in step_lib.BATCH_AXIS else v[rows]) for k, v in full.items()}
  kept["advantages"] = kept["advantages"] * scale
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L)
  f = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b)[:2])
  (o_full, g_full), (o_kept, g_kept) = f(params, full), f(params, kept)
  np.testing.assert_allclose(o_kept, o_full, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(g_kept, g_full, rtol=2e-4, atol=1e-8)
  # Padding to a power of two keeps zero-advantage groups as filler; all-live keeps everything.
  rows3, _ = rl_batch_lib.live_group_rows(np.r_[np.ones(2), np.zeros(6)], g, unit=1)
  assert len(rows3) == 2
  rows4, s4 = rl_batch_lib.live_group_rows(np.r_[np.ones(6), np.zeros(2)], g, unit=1)
  assert len(rows4) == 8 and s4 == 1.0
  rows5, _ = rl_batch_lib.live_group_rows(np.zeros(8), g, unit=2)
  assert len(rows5) == 4  # no live group: still one (zero) update of `unit` groups


def test_state_dtypes_survive_the_step_with_bf16_params():
  """bf16 parameters: the updated state keeps every dtype (donation works, no recompilation)."""
  cfg = dataclasses.replace(_model_cfg(), param_dtype="bfloat16", compute_dtype="bfloat16")
  c = base_config()
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  abstract, shardings = state_lib.abstract_train_state(cfg, optimizer, mesh)
  batch = make_batch(cfg)
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=2, gen_length=L)
  fn = functools.partial(step_lib.train_step, cfg, scfg, optimizer, schedule)
  out, _ = jax.eval_shape(fn, abstract, batch)
  chex.assert_trees_all_equal_dtypes(out, abstract)


def test_reset_moments_keeps_the_schedule_and_restarts_adam():
  c = base_config()
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 4
  c.optim.grad_clip_norm = 0.0
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=20)
  params = {"w": jnp.ones((3,), jnp.float32)}
  state = optimizer.init(params)
  for i in range(6):
    _, state = optimizer.update({"w": jnp.full((3,), 10.0 * (i + 1))}, state, params)
  reset = optim_lib.reset_moments(state)
  adam = [s for s in jax.tree.leaves(reset, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and int(adam[0].count) == 0
  chex.assert_trees_all_close(adam[0].mu, {"w": jnp.zeros(3)})
  chex.assert_trees_all_close(adam[0].nu, {"w": jnp.zeros(3)})
  chex.assert_trees_all_equal_dtypes(reset, state)
  # The schedule's count is kept (the learning rate follows the global step): Adam's first step
  # after the reset moves each weight by lr(6) = 1e-2 (warmup over), whatever the old moments.
  updates, _ = optimizer.update({"w": jnp.array([0.1, -2.0, 30.0])}, reset, params)
  chex.assert_trees_all_close(updates, {"w": jnp.array([-1e-2, 1e-2, -1e-2])}, rtol=1e-5)


# ----------------------------------------------------------------------------- KL, clipping, masks


def _jitted_state(cfg, params, lr=3e-3):
  c = base_config()
  c.optim.learning_rate = lr
  c.optim.grad_clip_norm = 0.0
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=jax.tree.map(jnp.copy, params))
  return state, shardings, optimizer, schedule, mesh


@pytest.mark.parametrize("objective", ["bgpo", "vrpo_ol", "diffu_grpo"])
def test_kl_is_zero_at_the_reference_and_positive_after_an_update(setup, objective):
  cfg, params, batch = setup
  if objective == "diffu_grpo":
    batch = dict(batch, response_mask=jnp.ones((B, L), jnp.float32),
                 row_seeds=jnp.arange(B, dtype=jnp.uint32) * 7 + 1)
  scfg = step_lib.StepConfig(objective=objective, num_mc_samples=N, gen_length=L, kl_beta=0.5)
  state, shardings, optimizer, schedule, mesh = _jitted_state(cfg, params)
  reference = jax.tree.map(jnp.copy, params)  # float32: the step-0 KL is exactly the policy's own
  terms = jax.jit(lambda p, b: step_lib.compute_old_terms(cfg, scfg, p, b))
  key = "ref_logps" if objective == "diffu_grpo" else "ref_elbo"
  b = dict(batch, **{key: terms(reference, batch)})
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, b)
  state, m0 = step(state, b)
  state, m1 = step(state, b)
  kl0, kl1 = float(m0["train/kl"]), float(m1["train/kl"])
  assert kl0 < 1e-9, kl0  # policy = reference
  assert kl1 > 100 * max(kl0, 1e-12) and np.isfinite(kl1), (kl0, kl1)
  # The KL term is in the objective: with kl_beta the objective falls below the one without.
  no_kl = dataclasses.replace(scfg, kl_beta=0.0)
  o_kl, _, aux = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, scfg, p, bb))(state.params, b)
  o_no = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, no_kl, p, bb)[0])(state.params, b)
  np.testing.assert_allclose(float(o_no - o_kl), 0.5 * float(aux["kl"]), rtol=1e-3)
  assert float(o_kl) < float(o_no)


def test_bgpo_kl_is_the_mean_of_per_sample_k3(setup):
  """BGPO's KL is sum_j k3(x_j)/n per response, x_j = (l_ref - l)/L: per sample, scan-friendly."""
  cfg, params, batch = setup
  ref_params = jax.tree.map(lambda p: p * 1.05, params)
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, kl_beta=1.0)
  ref = jax.jit(lambda p, b: step_lib.compute_old_terms(cfg, scfg, p, b))(ref_params, batch)
  b = dict(batch, ref_elbo=ref)
  obj, _, aux = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, scfg, p, bb))(params, b)
  l = _elbo_stack(cfg, params, batch)
  expect_kl = np.mean(np.asarray(objectives.k3((ref - l) / L)))
  np.testing.assert_allclose(float(aux["kl"]), expect_kl, rtol=1e-4)
  np.testing.assert_allclose(float(obj), float(batch["advantages"].mean()) - expect_kl, rtol=1e-4, atol=1e-6)
  assert expect_kl > 0


def test_normalize_length_divides_by_the_canvas_length(setup):
  cfg, params, batch = setup
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L, off_policy=True)
  old = jax.jit(lambda p, b: step_lib.compute_old_terms(cfg, scfg, p, b))(params, batch)
  shift = 3.0
  b = dict(batch, old_elbo=old - shift)  # l_theta - l_old = shift for every sample
  for normalize, expect in ((True, shift / L), (False, shift)):
    c = dataclasses.replace(scfg, hparams=ElboHparams(normalize_length=normalize))
    _, _, aux = jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, c, p, bb))(params, b)
    np.testing.assert_allclose(float(aux["abs_d"]), expect, rtol=1e-3)


@pytest.mark.parametrize("objective", ["bgpo", "vrpo_ol", "diffu_grpo"])
def test_dual_clip_is_honoured_by_every_objective(setup, objective):
  """Old terms far below the current ones (ratio >> 1): for A < 0 the dual clip bounds the term at
  c * A and removes its gradient, for every objective."""
  cfg, params, batch = setup
  adv = jnp.full((B,), -1.0)
  b = dict(batch, advantages=adv)
  if objective == "diffu_grpo":
    b = dict(b, response_mask=jnp.ones((B, L), jnp.float32), row_seeds=jnp.arange(B, dtype=jnp.uint32))
  scfg = step_lib.StepConfig(objective=objective, num_mc_samples=N, gen_length=L, off_policy=True,
                             hparams=objectives.get(objective).hparams({"normalize_length": False}))
  old = jax.jit(lambda p, bb: step_lib.compute_old_terms(cfg, scfg, p, bb))(params, b)
  b = dict(b, **{("old_logps" if objective == "diffu_grpo" else "old_elbo"): old - 5.0})
  f = lambda c: jax.jit(lambda p, bb: step_lib.accumulate_gradients(cfg, c, p, bb)[:2])(params, b)
  o_free, _ = f(scfg)
  o_dual, g_dual = f(dataclasses.replace(scfg, hparams=dataclasses.replace(scfg.hparams, dual_clip=3.0)))
  assert float(o_free) < -3.0 - 1e-3  # unclipped: exp(5) * A
  np.testing.assert_allclose(float(o_dual), -3.0, rtol=1e-5)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_dual)) == 0.0


def test_diffu_grpo_prompt_masks_are_per_row_and_per_seed(setup):
  """Each row's prompt mask comes from its own seed: identical prompts get different masks, a new
  seed (the next inner update) gives new masks, and micro-batching changes nothing."""
  cfg, params, batch = setup
  tokens = jnp.tile(batch["tokens"][:1], (B, 1))  # one prompt repeated: only the seeds differ
  attn = jnp.ones_like(tokens)
  seeds0 = jnp.arange(B, dtype=jnp.uint32) + 10
  seeds1 = seeds0 + 1000
  masked = lambda s: np.asarray(elbo.one_step_masked_tokens(
      tokens, attn, gen_length=L, rng=step_lib._row_keys(s), prompt_mask_prob=0.5,
      mask_id=cfg.mask_token_id)[:, :P] == cfg.mask_token_id)
  m0, m1 = masked(seeds0), masked(seeds1)
  assert len({r.tobytes() for r in m0}) > 1  # rows differ
  assert (m0 != m1).any()  # inner updates differ
  b = dict(batch, tokens=tokens, attention_mask=attn, response_mask=jnp.ones((B, L), jnp.float32),
           row_seeds=seeds0)
  out = {}
  for mb in (0, 2):
    scfg = step_lib.StepConfig(objective="diffu_grpo", num_mc_samples=1, gen_length=L, micro_batch_size=mb,
                               hparams=DiffuGRPOHparams(prompt_mask_prob=0.5))
    out[mb] = np.asarray(jax.jit(lambda p, bb: step_lib.compute_old_terms(cfg, scfg, p, bb))(params, b))
  np.testing.assert_allclose(out[2], out[0], rtol=1e-5, atol=1e-5)
