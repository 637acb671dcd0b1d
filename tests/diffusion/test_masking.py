"""Mask sampling of the two ELBO estimators (SPEC section 2)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.diffusion import masking


def test_stratified_offsets_round_half_even():
  np.testing.assert_array_equal(masking.stratified_offsets(256, 16), np.arange(16) * 16)
  # j*L/n = 0, 1.5, 3, 4.5 -> 0, 2, 3, 4 (half to even)
  np.testing.assert_array_equal(masking.stratified_offsets(3, 2), [0, 2])
  np.testing.assert_array_equal(masking.stratified_offsets(6, 4), [0, 2, 3, 4])
  np.testing.assert_array_equal(masking.stratified_offsets(10, 3), [0, 3, 7])


@pytest.mark.parametrize("L,n", [(6, 4), (5, 8)])
def test_stratified_counts_and_weights(L, n):
  B = 6
  masks, weights = masking.sample_masks(jax.random.key(0), B, L, n)
  chex.assert_shape(masks, (n, B, L))
  chex.assert_shape(weights, (n, B))
  assert masks.dtype == jnp.bool_ and weights.dtype == jnp.float32
  counts = np.asarray(masks.sum(-1))
  # Recover each row's offset k from l_0 = k and check every l_j against the SPEC formula.
  k = counts[0]
  offs = np.round(np.arange(n) * L / n)
  want = ((k[None, :] + offs[:, None] - 1) % L) + 1
  np.testing.assert_array_equal(counts, want)
  assert counts.min() >= 1 and counts.max() <= L
  chex.assert_trees_all_close(np.asarray(weights), L / counts, rtol=1e-6)


def test_stratified_offset_and_positions_are_uniform():
  L, n, B = 8, 2, 4000
  masks, _ = masking.sample_masks(jax.random.key(1), B, L, n)
  counts = np.asarray(masks.sum(-1))
  freq = np.bincount(counts[0], minlength=L + 1)[1:] / B  # k uniform on 1..L
  assert np.all(np.abs(freq - 1 / L) < 5 * np.sqrt(1 / L * (1 - 1 / L) / B))
  # Given the count, each position is masked with probability l/L.
  rows = np.asarray(masks[0])[counts[0] == 4]
  p = rows.mean(0)
  assert np.all(np.abs(p - 0.5) < 5 * np.sqrt(0.25 / len(rows)))


def test_continuous_rate_and_weights():
  L, n, B, t_eps = 64, 8, 256, 0.05
  masks, weights = masking.sample_masks(jax.random.key(2), B, L, n, estimator="continuous",
                                        t_eps=t_eps)
  t = 1.0 / np.asarray(weights)
  assert t.min() > t_eps and t.max() <= 1.0
  frac = np.asarray(masks.mean(-1))
  # Per-sample masking fraction tracks t (binomial(L, t) / L).
  assert np.all(np.abs(frac - t) < 5 * np.sqrt(t * (1 - t) / L) + 1e-6)
  # Marginal rate E[t] = (1 + t_eps) / 2 over all tokens.
  assert abs(frac.mean() - (1 + t_eps) / 2) < 0.02
  # t is uniform: its mean and variance.
  assert abs(t.mean() - (1 + t_eps) / 2) < 5 * (1 - t_eps) / np.sqrt(12 * t.size)


@pytest.mark.parametrize("estimator,t_eps", [("stratified", 1e-3), ("continuous", 0.05)])
def test_deterministic_in_key(estimator, t_eps):
  # Same shapes as the tests above: reuses their compiled program.
  shape = (6, 6, 4) if estimator == "stratified" else (256, 64, 8)
  a = masking.sample_masks(jax.random.key(3), *shape, estimator=estimator, t_eps=t_eps)
  b = masking.sample_masks(jax.random.key(3), *shape, estimator=estimator, t_eps=t_eps)
  c = masking.sample_masks(jax.random.key(4), *shape, estimator=estimator, t_eps=t_eps)
  chex.assert_trees_all_equal(a, b)
  assert (np.asarray(a[0]) != np.asarray(c[0])).any()


def test_argument_errors():
  with pytest.raises(ValueError, match="unknown estimator"):
    masking.sample_masks(jax.random.key(0), 1, 4, 2, estimator="linear")
  with pytest.raises(ValueError, match="num_samples"):
    masking.sample_masks(jax.random.key(0), 1, 4, 0)
  with pytest.raises(ValueError, match="t_eps"):
    masking.sample_masks(jax.random.key(0), 1, 4, 2, estimator="continuous", t_eps=1.0)
