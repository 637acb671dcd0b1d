"""Forward (noising) process: which response tokens each Monte Carlo sample masks (SPEC section 2).

Masks are a pure function of the PRNG key, so the same (t_j, mask_j) can be drawn once per
rollout and reused for the current, old and reference policies; that sharing is what cancels
most of the Monte Carlo noise in the ELBO difference d_j.

Two estimators of log p(y|x) from below, each returning per-sample masks and weights:

- "continuous" (LLaDA): t ~ U(t_eps, 1], every response token masked independently with
  probability t, weight 1/t.
- "stratified" (BGPO reference code, LLaDA likelihood code): one random offset k in 1..L per
  sequence, counts l_j = ((k + round(j*L/n) - 1) mod L) + 1 for j = 0..n-1, exactly l_j
  uniformly chosen positions masked, weight L/l_j.

Rounding: round(j*L/n) is round-half-to-even (NumPy / Python / torch.round semantics), computed
on the host from the static ints j, L, n. It only matters when 2*j*L is a multiple of n but
j*L is not (e.g. L=3, n=2); for the usual L (256, 512) and n (2..32) j*L/n is an integer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ("stratified", "continuous")


def stratified_offsets(gen_length: int, num_samples: int) -> np.ndarray:
  """round(j * L / n) for j = 0..n-1, half to even. Returns int32 [n]."""
  j = np.arange(num_samples, dtype=np.float64)
  # j*L/n is a correctly rounded float64; exact halves (small ints + 0.5) are representable,
  # so np.round (half to even) sees them exactly.
  return np.round(j * gen_length / num_samples).astype(np.int32)


def stratified_counts(offset_k: jax.Array, gen_length: int, num_samples: int) -> jax.Array:
  """Mask counts l_j = ((k + round(j*L/n) - 1) mod L) + 1.

  Args:
    offset_k: int32 [batch], values in 1..L.
  Returns:
    int32 [num_samples, batch], values in 1..L.
  """
  offs = jnp.asarray(stratified_offsets(gen_length, num_samples))
  return (offset_k[None, :] + offs[:, None] - 1) % gen_length + 1


def _check(batch: int, gen_length: int, num_samples: int, estimator: str, t_eps: float) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
  for name, v in (("batch", batch), ("gen_length", gen_length), ("num_samples", num_samples)):
    if int(v) != v or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if not 0.0 <= t_eps < 1.0:
    raise ValueError(f"t_eps {t_eps} must lie in [0, 1)")


def sample_masks(rng: jax.Array, batch: int, gen_length: int, num_samples: int, *,
                 estimator: str = "stratified",
                 t_eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """Draws the masks of n Monte Carlo ELBO samples for every sequence of a batch.

  Args:
    rng: PRNG key; the result is a deterministic function of it.
    batch, gen_length, num_samples: static ints B, L, n.
    estimator: "stratified" or "continuous" (see module docstring).
    t_eps: lower end of t for the continuous estimator (keeps the weight 1/t bounded).
  Returns:
    masks: bool [n, B, L], True = response token replaced by the mask token.
    weights: float32 [n, B], 1/t (continuous) or L/l_j (stratified).
  """
  _check(batch, gen_length, num_samples, estimator, t_eps)
  return _sample_masks(rng, int(batch), int(gen_length), int(num_samples), estimator,
                       float(t_eps))


# Jitted as one program: eagerly, each threefry op is its own (slow on CPU) compile.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _sample_masks(rng: jax.Array, b: int, L: int, n: int, estimator: str,
                  t_eps: float) -> tuple[jax.Array, jax.Array]:
  # One threefry draw for everything (each random op adds seconds of XLA CPU compile time):
  # columns 0..L-1 are the per-position keys, column L gives t (or the offset k).
  u = jax.random.uniform(rng, (n, b, L + 1), jnp.float32)
  keys, extra = u[..., :L], u[..., L]
  if estimator == "continuous":
    t = 1.0 - (1.0 - t_eps) * extra  # [0, 1) -> (t_eps, 1]
    masks = keys < t[..., None]
    return masks, (1.0 / t).astype(jnp.float32)
  k = jnp.minimum(jnp.floor(extra[0] * L).astype(jnp.int32), L - 1) + 1  # uniform on 1..L
  counts = stratified_counts(k, L, n)  # [n, B]
  # Exactly l_j positions: the ranks of iid keys are a uniform random permutation; a plain
  # "keys < threshold" would miscount on float ties.
  ranks = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)
  masks = ranks < counts[..., None]
  return masks, (L / counts).astype(jnp.float32)
