"""Tests for bgpo_jax.objectives: BGPO bound properties, on-policy equivalence, clipping, safety.

The model-level tests at the end check the same equivalences on gradients w.r.t. the
parameters of a tiny LLaDA, with ELBO terms from bgpo_jax.diffusion.elbo and shared masks.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import objectives as obj

N, B = 4, 6
# Advantages of both signs and zero.
ADV = jnp.array([1.3, -0.7, 0.0, 2.0, -2.5, 0.4], jnp.float32)
LENGTHS = jnp.array([16.0, 8.0, 32.0, 16.0, 4.0, 12.0], jnp.float32)


def _elbos(seed: int, scale: float = 5.0) -> jax.Array:
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (N, B), jnp.float32) - 40.0


@functools.partial(jax.jit, static_argnames="clip_eps")
def _bgpo_per_response(d, adv, clip_eps=None):
  """BGPO R_lb of each response: [draws, n] d, [draws] A -> [draws] (via B=1 calls)."""
  return jax.vmap(lambda dd, a: obj.bgpo_objective(dd[:, None], jnp.zeros_like(dd)[:, None],
                                                   a[None], clip_eps=clip_eps))(d, adv)


@functools.partial(jax.jit, static_argnames="clip_eps")
def _vrpo_per_response(d, adv, clip_eps=None):
  return jax.vmap(lambda dd, a: obj.vrpo_objective(dd[:, None], jnp.zeros_like(dd)[:, None],
                                                   a[None], clip_eps=clip_eps))(d, adv)


# ---------------------------------------------------------------------------------------------
# On-policy equivalence
# ---------------------------------------------------------------------------------------------

ON_POLICY_CASES = [
    dict(),
    dict(lengths=LENGTHS),
    dict(clip_eps=0.2),
    dict(lengths=LENGTHS, clip_eps=0.2),
]


@pytest.mark.parametrize("kw", ON_POLICY_CASES, ids=["plain", "lengths", "clip", "lengths+clip"])
def test_on_policy_value_and_grad_bgpo_equals_vrpo(kw):
  elbo = _elbos(0)
  bgpo_kw = dict(kw, dual_clip=3.0) if "clip_eps" in kw else kw
  # Passing the same array as old: it is stop-gradiented inside, as in the on-policy trainer.
  f_bgpo = lambda e: obj.bgpo_objective(e, e, ADV, **bgpo_kw)
  f_vrpo = lambda e: obj.vrpo_objective(e, e, ADV, **kw)
  v_b, g_b = jax.value_and_grad(f_bgpo)(elbo)
  v_v, g_v = jax.value_and_grad(f_vrpo)(elbo)
  chex.assert_trees_all_close(v_b, v_v, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(v_b, jnp.mean(ADV), rtol=1e-6)
  chex.assert_trees_all_close(g_b, g_v, rtol=1e-6, atol=1e-9)
  # And the closed form A_b / (n B L_b) for every sample.
  scale = kw.get("lengths", jnp.ones((B,)))
  expected = jnp.broadcast_to(ADV / (N * B * scale), (N, B))
  chex.assert_trees_all_close(g_b, expected, rtol=1e-6, atol=1e-9)


def test_on_policy_with_separate_old_array_matches_stop_gradient():
  elbo = _elbos(1)
  old = jnp.array(elbo)  # equal values, a separate (constant) array
  g1 = jax.grad(lambda e: obj.bgpo_objective(e, old, ADV))(elbo)
  g2 = jax.grad(lambda e: obj.bgpo_objective(e, e, ADV))(elbo)
  g3 = jax.grad(lambda e: obj.bgpo_objective(e, jax.lax.stop_gradient(e), ADV))(elbo)
  chex.assert_trees_all_close(g1, g2, rtol=1e-7)
  chex.assert_trees_all_close(g1, g3, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Lower bound R_lb <= R per response
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_bgpo_is_lower_bound_of_vrpo_per_response(clip_eps):
  draws = 4000
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
  # Log-ratio scales from tiny (near on-policy) to extreme (|d| up to 50).
  scales = jnp.array([1e-3, 0.05, 0.5, 2.0, 10.0, 50.0])[jax.random.randint(k1, (draws,), 0, 6)]
  d = jnp.clip(scales[:, None] * jax.random.normal(k2, (draws, N)), -50.0, 50.0)
  adv = jax.random.normal(k3, (draws,)) * 2.0
  adv = adv.at[::7].set(0.0)  # zero advantages too
  # Extreme hand-picked rows: all +50, all -50, mixed.
  d = d.at[:6].set(jnp.array([[50.0] * N, [-50.0] * N, [50.0, -50.0, 0.0, 1.0]] * 2))
  adv = adv.at[:6].set(jnp.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]))
  lb = _bgpo_per_response(d, adv, clip_eps=clip_eps)
  r = _vrpo_per_response(d, adv, clip_eps=clip_eps)
  assert bool(jnp.all(jnp.isfinite(lb))) and bool(jnp.all(jnp.isfinite(r)))
  slack = 1e-5 * (1.0 + jnp.abs(r))  # float32 rounding only
  worst = float(jnp.max(lb - r - slack))
  assert worst <= 0.0, f"bound violated by {worst}"
  # Zero advantage gives exactly zero in both.
  zero = adv == 0.0
  assert bool(jnp.all(jnp.where(zero, lb == 0.0, True)))
  assert bool(jnp.all(jnp.where(zero, r == 0.0, True)))
  # The bound is not vacuous: strictly below somewhere off-policy.
  assert float(jnp.max(r - lb)) > 1.0


def test_lower_bound_with_lengths_batched():
  new = _elbos(3, scale=20.0)
  old = _elbos(4, scale=20.0)
  for a in (ADV, -ADV):
    for lengths in (None, LENGTHS):
      per_b = [
          (obj.bgpo_objective(new[:, b:b + 1], old[:, b:b + 1], a[b:b + 1],
                              lengths=None if lengths is None else lengths[b:b + 1]),
           obj.vrpo_objective(new[:, b:b + 1], old[:, b:b + 1], a[b:b + 1],
                              lengths=None if lengths is None else lengths[b:b + 1]))
          for b in range(B)
      ]
      for lb, r in per_b:
        assert float(lb) <= float(r) + 1e-5 * (1 + abs(float(r)))
      # The batched objective is the mean of the per-response values.
      chex.assert_trees_all_close(obj.bgpo_objective(new, old, a, lengths=lengths),
                                  jnp.mean(jnp.array([p[0] for p in per_b])), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Linearity: per-sample gradient accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(clip_eps=0.2, dual_clip=3.0)], ids=["plain", "clip"])
def test_per_sample_accumulation_equals_full_gradient(kw):
  # l_j = features_j . theta: one shared parameter vector, as with a real model.
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
  feats = jax.random.normal(k1, (N, B, 3))
  theta = jax.random.normal(k2, (3,))
  theta_old = theta + 0.3 * jax.random.normal(k3, (3,))  # off-policy
  old = feats @ theta_old

  def full(th):
    return obj.bgpo_objective(feats @ th, old, ADV, lengths=LENGTHS, **kw)

  def one(th, j):
    d = (feats[j] @ th - old[j]) / LENGTHS
    return jnp.mean(obj.bgpo_sample_terms(d, ADV, num_samples=N, **kw))

  v_full, g_full = jax.value_and_grad(full)(theta)
  v_acc, g_acc = 0.0, jnp.zeros_like(theta)
  for j in range(N):
    v, g = jax.value_and_grad(one)(theta, j)
    v_acc, g_acc = v_acc + v, g_acc + g
  chex.assert_trees_all_close(v_acc, v_full, rtol=1e-6)
  chex.assert_trees_all_close(g_acc, g_full, rtol=1e-5, atol=1e-7)
  assert float(jnp.linalg.norm(g_full)) > 1e-4  # not trivially zero


def test_sample_terms_sum_to_objective_and_accept_any_leading_shape():
  new, old = _elbos(6), _elbos(7)
  d = new - old
  g = obj.bgpo_sample_terms(d, ADV, num_samples=N)
  chex.assert_shape(g, (N, B))
  chex.assert_trees_all_close(jnp.mean(jnp.sum(g, 0)), obj.bgpo_objective(new, old, ADV), rtol=1e-6)
  g_rows = jnp.stack([obj.bgpo_sample_terms(d[j], ADV, num_samples=N) for j in range(N)])
  chex.assert_trees_all_close(g_rows, g, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


def test_clipping_inactive_on_policy():
  elbo = _elbos(8)
  for fn, extra in ((obj.bgpo_objective, dict(dual_clip=3.0)), (obj.vrpo_objective, {})):
    plain = jax.value_and_grad(lambda e: fn(e, e, ADV, lengths=LENGTHS))(elbo)
    clipped = jax.value_and_grad(lambda e: fn(e, e, ADV, lengths=LENGTHS, clip_eps=0.2, **extra))(elbo)
    chex.assert_trees_all_close(plain, clipped, rtol=1e-7, atol=1e-10)


def _bgpo_one(d: float, a: float, **kw):
  """Value and d-gradient of g for a single sample (n = 1, B = 1)."""
  f = lambda x: obj.bgpo_sample_terms(jnp.array([x]), jnp.array([a]), num_samples=1, **kw)[0]
  v, g = jax.value_and_grad(f)(jnp.float32(d))
  return float(v), float(g)


@pytest.mark.parametrize(
    "d, a, kw, value, grad",
    [
        # A > 0, ratio 1 + d.
        (0.5, 1.0, dict(clip_eps=0.2), 1.2, 0.0),  # rho 1.5 clipped to 1.2
        (-0.5, 1.0, dict(clip_eps=0.2), 0.5, 1.0),  # rho 0.5: min keeps the unclipped 0.5
        (0.1, 2.0, dict(clip_eps=0.2), 2.2, 2.0),  # inside the range
        (0.5, 1.0, dict(), 1.5, 1.0),  # no clip: tangent bound 1 + d
        # A < 0, ratio exp(d).
        (math.log(0.5), -1.0, dict(clip_eps=0.2), -0.8, 0.0),  # rho 0.5 -> clipped 0.8
        (math.log(2.0), -1.0, dict(clip_eps=0.2), -2.0, -2.0),  # rho 2: unclipped, grad A e^d
        (math.log(2.0), -1.0, dict(clip_eps=0.2, dual_clip=3.0), -2.0, -2.0),  # below c
        (math.log(4.0), -1.0, dict(clip_eps=0.2, dual_clip=3.0), -3.0, 0.0),  # dual clip c A
        (math.log(4.0), -1.0, dict(clip_eps=0.2), -4.0, -4.0),  # no dual clip
        (math.log(4.0), 1.0, dict(clip_eps=0.2, dual_clip=3.0), 1.2, 0.0),  # dual clip: A<0 only
        (0.7, 0.0, dict(clip_eps=0.2, dual_clip=3.0), 0.0, 0.0),  # zero advantage
    ],
)
def test_bgpo_clipping_hand_computed(d, a, kw, value, grad):
  v, g = _bgpo_one(d, a, **kw)
  assert v == pytest.approx(value, rel=1e-5, abs=1e-6)
  assert g == pytest.approx(grad, rel=1e-5, abs=1e-6)


def test_bgpo_clipping_hand_computed_two_samples():
  # n = 2, A = 2: g = (min(1.5, 1.2) * 2 + min(0.5, 0.8) * 2) / 2 = 1.7; only sample 2 has grad.
  d = jnp.array([[0.5], [-0.5]])
  v, g = jax.value_and_grad(lambda x: obj.bgpo_objective(x, jnp.zeros_like(x), jnp.array([2.0]),
                                                         clip_eps=0.2))(d)
  assert float(v) == pytest.approx(1.7, rel=1e-6)
  chex.assert_trees_all_close(g, jnp.array([[0.0], [1.0]]), atol=1e-7)


def test_vrpo_clipping_hand_computed():
  d = jnp.array([[0.3], [0.5]])  # mean 0.4, ratio e^0.4 = 1.4918
  zeros = jnp.zeros_like(d)
  f = lambda a: jax.value_and_grad(lambda x: obj.vrpo_objective(x, zeros, jnp.array([a]),
                                                                clip_eps=0.2))(d)
  v, g = f(1.0)  # clipped at 1.2, no gradient
  assert float(v) == pytest.approx(1.2, rel=1e-6)
  chex.assert_trees_all_close(g, jnp.zeros_like(d), atol=1e-8)
  v, g = f(-1.0)  # min(-1.49, -1.2) = -1.49, unclipped: dR/dd_j = -e^0.4 / 2
  r = math.exp(0.4)
  assert float(v) == pytest.approx(-r, rel=1e-6)
  chex.assert_trees_all_close(g, jnp.full_like(d, -r / 2), rtol=1e-6)
  # Lengths divide d: d / L = [0.15, 0.25] -> ratio e^0.2, unclipped for A > 0 (inside 1.2? no:
  # e^0.2 = 1.2214 > 1.2, clipped). Use L = 4: mean 0.1, e^0.1 = 1.105 inside the range.
  v = obj.vrpo_objective(d, zeros, jnp.array([1.0]), lengths=jnp.array([4.0]), clip_eps=0.2)
  assert float(v) == pytest.approx(math.exp(0.1), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Numerical safety
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(clip_eps=0.2, dual_clip=3.0)], ids=["plain", "clip"])
def test_no_nan_or_inf_for_extreme_log_ratios(kw):
  vkw = {k: v for k, v in kw.items() if k != "dual_clip"}
  mask = jnp.ones((B, N))

  @jax.jit
  def values_and_grads(d):
    zeros = jnp.zeros_like(d)
    fns = (lambda x: obj.bgpo_objective(x, zeros, ADV, **kw),
           lambda x: obj.vrpo_objective(x, zeros, ADV, **vkw),
           lambda x: jnp.sum(obj.bgpo_sample_terms(x, ADV, num_samples=N, **kw)),
           # diffu-GRPO with extreme token log-ratios (new - old = 2x, ref - new = x).
           lambda x: obj.diffu_grpo_objective(x.reshape(B, N), -x.reshape(B, N), 2 * x.reshape(B, N),
                                              ADV, mask, clip_eps=kw.get("clip_eps")))
    return [jax.value_and_grad(f)(d) for f in fns]

  signs = jnp.array([[1.0, -1.0, 1.0, -1.0, 0.5, -0.5]] * N) * jnp.array([[1.0], [-1.0], [1.0], [0.0]])
  for mag in (50.0, 1e3, 1e6):
    for v, g in values_and_grads(mag * signs):
      assert bool(jnp.isfinite(v)), (mag, v)
      assert bool(jnp.all(jnp.isfinite(g))), (mag, g)


def test_exact_exp_below_cap():
  # Up to the cap the ratio is the true exp (only far beyond it is the tangent used).
  d = jnp.array([[-30.0, -1.0, 0.0, 1.0, 10.0, obj.LOG_RATIO_CAP]])
  a = -jnp.ones((B,))
  g = obj.bgpo_sample_terms(d, a, num_samples=1)
  chex.assert_trees_all_close(g, -jnp.exp(d), rtol=1e-6)
  # Above the cap: continuous, convex continuation with slope exp(cap).
  cap = obj.LOG_RATIO_CAP
  v, grad = jax.value_and_grad(lambda x: obj._capped_exp(x))(jnp.float32(cap + 2.0))
  assert float(v) == pytest.approx(math.exp(cap) * 3.0, rel=1e-5)
  assert float(grad) == pytest.approx(math.exp(cap), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_zero_mean_unit_std():
  r = jax.random.uniform(jax.random.PRNGKey(9), (5, 8))
  for ddof in (0, 1):
    a = obj.group_advantages(r, ddof=ddof)
    chex.assert_shape(a, (5, 8))
    chex.assert_trees_all_close(jnp.mean(a, axis=1), jnp.zeros(5), atol=1e-6)
    # (std / (std + eps)) ~ 1 with the same ddof convention.
    chex.assert_trees_all_close(jnp.std(a, axis=1, ddof=ddof), jnp.ones(5), rtol=1e-4)
  # Default is the unbiased std (torch .std()): check against numpy ddof=1 by hand.
  rn = np.asarray(r, np.float64)
  expected = (rn - rn.mean(1, keepdims=True)) / (rn.std(1, ddof=1, keepdims=True) + 1e-6)
  chex.assert_trees_all_close(obj.group_advantages(r), expected.astype(np.float32), rtol=1e-5,
                              atol=1e-6)


def test_group_advantages_binary_rewards_hand_computed():
  r = jnp.array([[1.0, 0.0, 0.0, 0.0]])  # mean 0.25, unbiased std sqrt(0.25) = 0.5
  a = obj.group_advantages(r, eps=0.0)
  chex.assert_trees_all_close(a, jnp.array([[1.5, -0.5, -0.5, -0.5]]), rtol=1e-6)
  a0 = obj.group_advantages(r, eps=0.0, ddof=0)  # population std sqrt(3)/4
  chex.assert_trees_all_close(a0, jnp.array([[0.75, -0.25, -0.25, -0.25]]) / (math.sqrt(3) / 4),
                              rtol=1e-6)


def test_group_advantages_constant_group_gives_zeros():
  r = jnp.array([[0.1] * 8, [1.0] * 8, [0.3, 0.7, 0.3, 0.7, 0.3, 0.7, 0.3, 0.7]])
  for normalize in (True, False):
    a = obj.group_advantages(r, normalize_std=normalize)
    assert bool(jnp.all(jnp.isfinite(a)))
    assert bool(jnp.all(a[:2] == 0.0)), a[:2]  # exactly zero, no rounding residue
    assert float(jnp.abs(a[2]).min()) > 0.1


def test_group_advantages_no_std_option():
  r = jnp.array([[2.0, 0.0, 1.0, 1.0], [5.0, 3.0, 3.0, 5.0]])
  a = obj.group_advantages(r, normalize_std=False)
  chex.assert_trees_all_close(a, jnp.array([[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, -1.0, 1.0]]))


def test_group_advantages_errors_name_the_fix():
  with pytest.raises(ValueError, match="num_prompts, G"):
    obj.group_advantages(jnp.ones((8,)))
  with pytest.raises(ValueError, match="G=1"):
    obj.group_advantages(jnp.ones((3, 1)))


# ---------------------------------------------------------------------------------------------
# diffu-GRPO
# ---------------------------------------------------------------------------------------------


def test_diffu_grpo_on_policy_value_is_mean_advantage_and_kl_zero():
  k1, k2 = jax.random.split(jax.random.PRNGKey(10))
  logp = -jnp.abs(jax.random.normal(k1, (B, 7)))
  mask = (jax.random.uniform(k2, (B, 7)) < 0.7).at[:, 0].set(True)
  f = jax.jit(jax.value_and_grad(
      lambda x, beta: obj.diffu_grpo_objective(x, x, x, ADV, mask, clip_eps=0.2, beta=beta)))
  for beta in (0.0, 0.04, 1.0):  # traced beta: one compile
    v, g = f(logp, beta)
    chex.assert_trees_all_close(v, jnp.mean(ADV), rtol=1e-6)
    # Gradient: A_b / (B * tokens_b) on each counted token, zero elsewhere (KL has zero grad).
    count = jnp.sum(mask, axis=1, keepdims=True)
    chex.assert_trees_all_close(g, jnp.where(mask, ADV[:, None] / (B * count), 0.0), rtol=1e-6,
                                atol=1e-9)
  # No reference: same value.
  v = obj.diffu_grpo_objective(logp, logp, None, ADV, mask)
  chex.assert_trees_all_close(v, jnp.mean(ADV), rtol=1e-6)


def test_diffu_grpo_clipped_hand_computed():
  # One response, 3 tokens, the third masked out (and garbage: must not matter).
  new = jnp.array([[math.log(1.5), math.log(0.5), 1e6]])
  old = jnp.array([[0.0, 0.0, -1e6]])
  mask = jnp.array([[1, 1, 0]])
  a = jnp.array([1.0])
  # tokens: min(1.5, 1.2) = 1.2 ; min(0.5, 0.8) = 0.5 -> mean 0.85
  v = obj.diffu_grpo_objective(new, old, None, a, mask, clip_eps=0.2)
  assert float(v) == pytest.approx(0.85, rel=1e-6)
  # A < 0: min(-1.5, -1.2) = -1.5 ; min(-0.5, -0.8) = -0.8 -> mean -1.15
  v = obj.diffu_grpo_objective(new, old, None, -a, mask, clip_eps=0.2)
  assert float(v) == pytest.approx(-1.15, rel=1e-6)
  # With a reference at ref - new = log 2 on both tokens: k3 = 2 - log 2 - 1.
  ref = new + math.log(2.0)
  k3 = 2.0 - math.log(2.0) - 1.0
  v = obj.diffu_grpo_objective(new, old, ref, a, mask, clip_eps=0.2, beta=0.1)
  assert float(v) == pytest.approx(0.85 - 0.1 * k3, rel=1e-6)


def test_diffu_grpo_sequence_vs_batch_token_average():
  new = jnp.log(jnp.array([[1.1, 1.1, 1.1, 1.1], [0.9, 1.0, 1.0, 1.0]]))
  old = jnp.zeros_like(new)
  mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
  a = jnp.array([1.0, 1.0])
  seq = obj.diffu_grpo_objective(new, old, None, a, mask, clip_eps=0.2)
  bat = obj.diffu_grpo_objective(new, old, None, a, mask, clip_eps=0.2, token_average="batch")
  assert float(seq) == pytest.approx((1.1 + 0.9) / 2, rel=1e-6)
  assert float(bat) == pytest.approx((4 * 1.1 + 0.9) / 5, rel=1e-6)
  # A response with no counted tokens contributes 0 (no NaN).
  empty = obj.diffu_grpo_objective(new, old, None, a, jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]]))
  assert float(empty) == pytest.approx(1.1 / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------------------------


def test_jit_and_errors():
  new, old = _elbos(11), _elbos(12)
  f = jax.jit(lambda a, b, c: obj.bgpo_objective(a, b, c, lengths=LENGTHS, clip_eps=0.2, dual_clip=3.0))
  chex.assert_trees_all_close(f(new, old, ADV), obj.bgpo_objective(new, old, ADV, lengths=LENGTHS,
                                                                   clip_eps=0.2, dual_clip=3.0),
                              rtol=1e-6)
  with pytest.raises(ValueError, match="must both be"):
    obj.bgpo_objective(new, old[:2], ADV)
  with pytest.raises(ValueError, match="advantages"):
    obj.vrpo_objective(new, old, ADV[:3])
  with pytest.raises(ValueError, match="clip_eps"):
    obj.bgpo_objective(new, old, ADV, clip_eps=1.5)
  with pytest.raises(ValueError, match="dual_clip"):
    obj.bgpo_sample_terms(new, ADV, num_samples=N, dual_clip=0.5)
  with pytest.raises(ValueError, match="num_samples"):
    obj.bgpo_sample_terms(new, ADV, num_samples=0)
  with pytest.raises(ValueError, match="token_average"):
    obj.diffu_grpo_objective(new.T, old.T, None, jnp.ones(B), jnp.ones((B, N)), token_average="x")


# ---------------------------------------------------------------------------------------------
# Model level: gradients w.r.t. the parameters of a tiny LLaDA, ELBO terms with shared masks
# ---------------------------------------------------------------------------------------------

MB, MP, ML, MN = 4, 8, 16, 4  # batch, prompt length, response length, MC samples
M_ADV = jnp.array([1.2, -0.8, 0.0, -1.5], jnp.float32)
M_CLIP = dict(clip_eps=0.2, dual_clip=3.0)


@pytest.fixture(scope="module")
def tiny():
  """Tiny LLaDA, a batch with shared masks, and jitted value-and-grad functions of the params.

  The old terms and the lengths are arguments, so one compiled function serves on-policy
  (old = values from the same params) and off-policy (old from perturbed params), with and
  without length normalization (lengths = 1 is no normalization).
  """
  from bgpo_jax.diffusion import elbo, masking
  from bgpo_jax.models import llada

  config = llada.LLaDAConfig.preset("tiny")
  k_params, k_old, k_tok, k_mask = jax.random.split(jax.random.PRNGKey(0), 4)
  params = llada.init_params(config, k_params)
  # Old policy for off-policy checks: the same weights plus a small perturbation.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  noise = jax.random.split(k_old, len(leaves))
  params_old = jax.tree_util.tree_unflatten(
      treedef, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, noise)])
  tokens = jax.random.randint(k_tok, (MB, MP + ML), 3, config.vocab_size, jnp.int32)
  attn = jnp.ones((MB, MP + ML), jnp.int32).at[1, :3].set(0)  # one left-padded prompt
  masks, weights = masking.sample_masks(k_mask, MB, ML, MN)

  def elbo_one(p, j):
    """[B]: MC sample j's ELBO term; the mask is shared by every policy evaluated."""
    return elbo.elbo_term(config, p, tokens, attn, masks[j], weights[j])

  def elbo_terms(p):
    """[n, B]: all samples stacked (vmapped over j: one forward in the compiled graph)."""
    return jax.vmap(lambda j: elbo_one(p, j))(jnp.arange(MN))

  def both(p, old, lengths):
    """(value, grad) of BGPO and of VRPO-OL w.r.t. the params, from one compiled function."""
    bgpo = lambda q: obj.bgpo_objective(elbo_terms(q), old, M_ADV, lengths=lengths, **M_CLIP)
    vrpo = lambda q: obj.vrpo_objective(elbo_terms(q), old, M_ADV, lengths=lengths, clip_eps=0.2)
    return jax.value_and_grad(bgpo)(p), jax.value_and_grad(vrpo)(p)

  def one(p, j, old, lengths):
    d = (elbo_one(p, j) - old[j]) / lengths
    return jnp.mean(obj.bgpo_sample_terms(d, M_ADV, num_samples=MN, **M_CLIP))

  terms = jax.jit(elbo_terms)
  return dict(
      params=params, old_on=terms(params), old_off=terms(params_old), both=jax.jit(both),
      one=jax.jit(jax.value_and_grad(one)))  # j traced: compiled once for all samples


def _tree_tols(tree, rel=1e-5):
  """atol relative to the largest gradient entry (float32 sums in a different order)."""
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(tree))
  assert scale > 0.0, "all-zero gradient: the check would be vacuous"
  return dict(rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("length", [1.0, float(ML)], ids=["raw", "length_norm"])
def test_model_on_policy_bgpo_grad_equals_vrpo_grad(tiny, length):
  params, old, lengths = tiny["params"], tiny["old_on"], jnp.full((MB,), length)
  (v_b, g_b), (v_v, g_v) = tiny["both"](params, old, lengths)
  chex.assert_trees_all_close(v_b, v_v, rtol=1e-5)
  chex.assert_trees_all_close(v_b, jnp.mean(M_ADV), rtol=1e-5)
  chex.assert_trees_all_close(g_b, g_v, **_tree_tols(g_v))


@pytest.mark.parametrize("old_key", ["old_on", "old_off"], ids=["on_policy", "off_policy"])
def test_model_per_sample_accumulation_equals_full_gradient(tiny, old_key):
  params, old, lengths = tiny["params"], tiny[old_key], jnp.full((MB,), float(ML))
  if old_key == "old_off":  # the perturbation really moves the terms off-policy
    assert float(jnp.max(jnp.abs(old - tiny["old_on"]))) > 1e-3
  (v_full, g_full), _ = tiny["both"](params, old, lengths)
  v_acc, g_acc = 0.0, jax.tree_util.tree_map(jnp.zeros_like, params)
  for j in range(MN):  # one sample's graph at a time, as the memory-efficient trainer does
    v, g = tiny["one"](params, jnp.int32(j), old, lengths)
    v_acc = v_acc + v
    g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
  chex.assert_trees_all_close(v_acc, v_full, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(g_acc, g_full, **_tree_tols(g_full))


# ----------------------------------------------------------------------------- KL and dual clip


def test_k3_is_nonnegative_exact_near_zero_and_finite_far_away():
  x = jnp.array([-50.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 50.0])
  k = obj.k3(x)
  assert bool(jnp.all(k >= 0)) and float(k[3]) == 0.0
  np.testing.assert_allclose(float(k[4]), 0.5e-8, rtol=1e-2)  # x^2/2: exp(x) - 1 - x would give 0 or noise
  np.testing.assert_allclose(float(k[5]), math.e - 2.0, rtol=1e-6)
  assert bool(jnp.all(jnp.isfinite(jax.grad(lambda v: jnp.sum(obj.k3(v)))(x))))
  assert float(jax.grad(lambda v: obj.k3(v))(0.0)) == 0.0


def test_bgpo_kl_is_per_sample_and_keeps_the_bound_below_vrpo_with_kl():
  new, ref = _elbos(0), _elbos(1)
  old = new - 0.3 * _elbos(2, scale=1.0)
  beta = 0.3
  plain = obj.bgpo_objective(new, old, ADV, lengths=LENGTHS)
  with_kl = obj.bgpo_objective(new, old, ADV, lengths=LENGTHS, elbo_ref=ref, kl_beta=beta)
  per_sample = obj.k3((ref - new) / LENGTHS)  # [n, B]
  np.testing.assert_allclose(float(plain - with_kl), beta * float(jnp.mean(jnp.mean(per_sample, 0))), rtol=1e-5)
  terms = obj.elbo_kl_sample_terms(new, ref, num_samples=N, lengths=LENGTHS)
  chex.assert_trees_all_close(jnp.sum(terms, 0), jnp.mean(per_sample, 0), rtol=1e-6)
  # Jensen: mean_j k3(x_j) >= k3(mean_j x_j), so BGPO + KL <= VRPO-OL + KL response by response.
  for b in range(B):
    sl = slice(b, b + 1)
    lb = obj.bgpo_objective(new[:, sl], old[:, sl], ADV[sl], lengths=LENGTHS[sl], elbo_ref=ref[:, sl], kl_beta=beta)
    ub = obj.vrpo_objective(new[:, sl], old[:, sl], ADV[sl], lengths=LENGTHS[sl], elbo_ref=ref[:, sl], kl_beta=beta)
    assert float(lb) <= float(ub) + 1e-6, b
  # The KL's gradient pulls l_theta toward l_ref: zero where they agree.
  g = jax.grad(lambda l: obj.bgpo_objective(l, l, ADV, elbo_ref=l, kl_beta=beta))(new)
  g0 = jax.grad(lambda l: obj.bgpo_objective(l, l, ADV))(new)
  chex.assert_trees_all_close(g, g0)


def test_dual_clip_for_vrpo_and_diffu_grpo():
  adv = jnp.array([-1.0, 1.0])
  new = jnp.zeros((N, 2))
  old = new - 3.0  # exp(mean d) = e^3 >> c = 2
  free = obj.vrpo_objective(new, old, adv)
  dual = obj.vrpo_objective(new, old, adv, dual_clip=2.0)
  np.testing.assert_allclose(float(dual), (-2.0 + math.exp(3.0)) / 2, rtol=1e-6)  # A > 0 untouched
  assert float(free) < float(dual)
  logp = jnp.zeros((2, 5))
  mask = jnp.ones((2, 5))
  d = obj.diffu_grpo_objective(logp, logp - 3.0, None, adv, mask, clip_eps=None, beta=0.0, dual_clip=2.0)
  np.testing.assert_allclose(float(d), (-2.0 + math.exp(3.0)) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="dual_clip 0.5 must be > 1"):
    obj.vrpo_objective(new, old, adv, dual_clip=0.5)
