"""Dream's confidence rules (entropy / maskgit_plus / topk_margin) against NumPy, and in the block
sampler: the positions committed first are the most confident under the chosen rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax.diffusion import confidence, sampler


def np_confidence(logits, cand, rule, temperature):
  logits = np.asarray(logits, np.float64)
  if rule != "low_confidence" and temperature > 0:
    logits = logits / temperature
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(-1, keepdims=True)
  if rule in ("low_confidence", "maskgit_plus"):
    return np.take_along_axis(p, cand[..., None], -1)[..., 0]
  if rule == "topk_margin":
    s = np.sort(p, -1)
    return s[..., -1] - s[..., -2]
  return (p * np.log(p + 1e-10)).sum(-1)


@pytest.mark.parametrize("rule", ["low_confidence", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rules_match_numpy(rule, temperature):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
  logits[..., 3] = -np.inf  # the sampler's masked-out token
  cand = rng.integers(0, 11, (2, 5))
  cand[cand == 3] = 4
  got = confidence.confidence(jnp.asarray(logits), jnp.asarray(cand), rule, temperature=temperature)
  np.testing.assert_allclose(got, np_confidence(logits, cand, rule, temperature), rtol=1e-5, atol=1e-6)


def test_random_rule_and_errors():
  c = confidence.confidence(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), "random", rng=jax.random.key(0))
  assert c.shape == (2, 3) and 0 <= float(c.min()) and float(c.max()) < 1
  with pytest.raises(ValueError, match="unknown remasking"):
    confidence.confidence(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32), "origin")
  # entropy lives in [-log V, 0]: the EOS offset must exceed that range.
  assert confidence.rank_last_offset("entropy", 152064) > np.log(152064)
  assert confidence.rank_last_offset("maskgit_plus", 152064) == 2.0


def _committed_first(rule, base_logits, delta, temperature=0.0):
  """Runs generate on a fake model; returns the positions committed at the first step.

  The candidate (argmax) of every position is 5 while no response token is committed and 6 after,
  so the tokens reveal the step that committed them; the rest of each row's logits is fixed."""
  L, V, mask_id = base_logits.shape[0], base_logits.shape[1], 1

  def logits_fn(tokens, attn):
    started = jnp.any(tokens[:, -L:] != mask_id, axis=1)  # [B]
    lg = jnp.broadcast_to(jnp.asarray(base_logits), (tokens.shape[0], L, V))
    top = jnp.max(lg, axis=-1)
    lg = lg.at[..., 5].set(jnp.where(started[:, None], top, top + delta))
    lg = lg.at[..., 6].set(jnp.where(started[:, None], top + delta, top))
    return lg

  prompt = jnp.full((1, 2), 7, jnp.int32)
  settings = sampler.SamplerSettings(gen_length=L, steps=2, block_length=L, temperature=temperature,
                                     remasking=rule)
  out = sampler.generate(logits_fn, None, prompt, jnp.ones_like(prompt), settings, jax.random.key(0),
                         ids=sampler.TokenIds(mask_id))
  resp = np.asarray(out[0, 2:])
  assert set(resp.tolist()) <= {5, 6}, resp
  return set(np.flatnonzero(resp == 5).tolist())


def test_sampler_commits_the_most_confident_positions_first_under_each_rule():
  # 4 positions, V = 12; entries 5 and 6 are set by the fake model, the rest shape the distribution.
  rng = np.random.default_rng(3)
  found = None
  for _ in range(200):  # a deterministic search for logits on which the rules disagree
    base = (rng.normal(0, 1, (4, 12)) * rng.uniform(0.5, 4, (4, 1))).astype(np.float32)
    delta = rng.uniform(0.05, 3.0, 4).astype(np.float32)  # the candidate's lead over the runner-up
    firsts = {}
    for rule in ("low_confidence", "maskgit_plus", "topk_margin", "entropy"):
      lg = base.copy()
      top = lg.max(-1)
      lg[:, 5], lg[:, 6] = top + delta, top
      lg[:, 1] = -np.inf  # the mask token
      conf = np_confidence(lg, np.full(4, 5), rule, 0.0)
      firsts[rule] = set(np.argsort(-conf, kind="stable")[:2].tolist())
    # entropy and top-k margin each disagree with the probability rules (so the rule is not ignored)
    if firsts["entropy"] != firsts["low_confidence"] and firsts["topk_margin"] != firsts["low_confidence"]:
      found = base, delta, firsts
      break
  assert found is not None
  base, delta, firsts = found
  for rule, want in firsts.items():
    assert _committed_first(rule, base, delta) == want, rule
