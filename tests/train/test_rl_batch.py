"""The RL batch from scored rollouts (train/rl_batch.py), a host function tested directly, and
the run's named random streams (train/rng.py)."""

import threading

import jax
import numpy as np
import pytest

from bgpo_jax.train import rl_batch
from bgpo_jax.train import rng as rng_lib

EOS, EOT, P, L, G = 0, 1, 3, 6, 4


def _rollouts(prompts: int, seed: int = 0):
  """tokens [prompts*G, P+L] of non-stop ids with some rows stopped early, their lengths, rewards."""
  r = np.random.default_rng(seed)
  n = prompts * G
  tokens = r.integers(5, 50, size=(n, P + L)).astype(np.int32)
  lengths = np.full(n, L)
  for i in range(0, n, 3):  # every third row stops (EOT) at response position i % L
    tokens[i, P + i % L] = EOT
    lengths[i] = i % L + 1
  attn = np.ones_like(tokens)
  return tokens, attn, lengths


def test_advantages_fill_and_metrics():
  tokens, attn, lengths = _rollouts(2)
  rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)
  correct = rewards > 0
  batch, kept_lengths, m = rl_batch.make_rl_batch(tokens, attn, P, lengths, rewards, correct, group_size=G,
                                                  eos_id=EOS, advantage_std=False)
  np.testing.assert_allclose(batch["advantages"], [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
  assert batch["tokens"].dtype == np.int32 and (kept_lengths == lengths).all()
  resp = batch["tokens"][:, P:]
  for row, n in zip(resp, lengths):  # after the first stop token: EOS; up to it: as sampled
    assert (row[n:] == EOS).all()
  np.testing.assert_array_equal(resp[~(np.arange(L)[None] >= lengths[:, None])],
                                tokens[:, P:][~(np.arange(L)[None] >= lengths[:, None])])
  assert m["train/reward_mean"] == pytest.approx(3 / 8) and m["train/accuracy"] == pytest.approx(3 / 8)
  assert m["train/zero_adv_groups"] == 0.0 and "train/rows_trained" not in m
  assert m["train/response_len"] == pytest.approx(lengths.mean())


def test_leave_one_out_baseline_is_the_mean_of_the_others():
  tokens, attn, lengths = _rollouts(2)
  rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)
  batch, _, _ = rl_batch.make_rl_batch(tokens, attn, P, lengths, rewards, rewards > 0, group_size=G, eos_id=EOS,
                                       advantage_std=False, leave_one_out=True)
  others = (rewards.reshape(-1, G).sum(1, keepdims=True) - rewards.reshape(-1, G)) / (G - 1)
  np.testing.assert_allclose(batch["advantages"], (rewards.reshape(-1, G) - others).reshape(-1), rtol=1e-6)


def test_live_groups_only_and_the_scale_that_keeps_the_update():
  tokens, attn, lengths = _rollouts(4)
  rewards = np.zeros(16, np.float32)
  rewards[5] = 1.0  # only the second group has a non-zero advantage
  batch, kept, m = rl_batch.make_rl_batch(tokens, attn, P, lengths, rewards, rewards > 0, group_size=G,
                                          eos_id=EOS, advantage_std=False, live_unit=1)
  full, _, _ = rl_batch.make_rl_batch(tokens, attn, P, lengths, rewards, rewards > 0, group_size=G,
                                      eos_id=EOS, advantage_std=False)
  assert m["train/rows_trained"] == 4 and m["train/zero_adv_groups"] == 0.75
  np.testing.assert_array_equal(batch["tokens"], full["tokens"][4:8])
  np.testing.assert_array_equal(kept, lengths[4:8])
  # The step divides by the rows it sees: 4 of 16, so the kept advantages are scaled by 4/16.
  np.testing.assert_allclose(batch["advantages"], full["advantages"][4:8] * 0.25)


class _Hosts:
  """Two "hosts" as threads: `gather` is an all-gather of each host's rows in host order."""

  def __init__(self, count: int):
    self.count, self.barrier, self.slots = count, threading.Barrier(count), [None] * count

  def gather(self, host: int, tree):
    self.slots[host] = [np.asarray(x) for x in tree]
    self.barrier.wait()
    out = tuple(np.concatenate([s[i] for s in self.slots]) for i in range(len(tree)))
    self.barrier.wait()  # every host has read the slots before they are reused
    return out


def test_two_hosts_train_the_one_host_batch():
  """Each host passes its own rows; gathered and sliced, the hosts' batches together are the
  batch one process makes from all rows (the live groups are chosen on the global advantages)."""
  tokens, attn, lengths = _rollouts(4, seed=1)
  rewards = np.zeros(16, np.float32)
  rewards[[1, 9, 10]] = 1.0  # groups 0 and 2 are live: host 0 has one, host 1 the other
  kw = dict(group_size=G, eos_id=EOS, advantage_std=True, live_unit=1)
  one = rl_batch.make_rl_batch(tokens, attn, P, lengths, rewards, rewards > 0, **kw)
  hosts, out = _Hosts(2), [None, None]

  def host(h):
    rows = slice(8 * h, 8 * h + 8)
    out[h] = rl_batch.make_rl_batch(tokens[rows], attn[rows], P, lengths[rows], rewards[rows], rewards[rows] > 0,
                                    gather=lambda tree: hosts.gather(h, tree),
                                    host_slice=lambda total: slice(h * total // 2, (h + 1) * total // 2), **kw)

  threads = [threading.Thread(target=host, args=(h,)) for h in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert out[0][2] == out[1][2] == one[2]  # metrics over the global batch
  for k in one[0]:
    np.testing.assert_array_equal(np.concatenate([o[0][k] for o in out]), one[0][k])
  np.testing.assert_array_equal(np.concatenate([o[1] for o in out]), one[1])


def test_live_group_unit_splits_over_devices_hosts_and_micro_batches():
  assert rl_batch.live_group_unit(group_size=4, data_parallel=8, processes=1, micro_rows=0) == 2
  assert rl_batch.live_group_unit(group_size=4, data_parallel=1, processes=1, micro_rows=16) == 4
  assert rl_batch.live_group_unit(group_size=8, data_parallel=2, processes=2, micro_rows=0) == 1


def test_random_streams_are_named_and_fixed():
  s = rng_lib.RngStreams(7)
  root = jax.random.key(7)
  # The numbers are part of every run's results: they never change.
  assert rng_lib.STREAMS == {"init": 0, "rollout": 1, "mc_masks": 2, "eval": 3, "prompt_mask_seeds": 4,
                             "lora": 5, "lora_dropout": 6}
  want = jax.random.fold_in(jax.random.fold_in(root, 1), 5)
  np.testing.assert_array_equal(jax.random.key_data(s.key("rollout", 5)), jax.random.key_data(want))
  keys = {name: jax.random.key_data(s.key(name, 3)).tobytes() for name in rng_lib.STREAMS}
  assert len(set(keys.values())) == len(keys)
  with pytest.raises(KeyError, match="unknown random stream 'dropout'"):
    s.key("dropout")
  m1, w1 = rng_lib.mc_masks(s, 3, rows=4, n=2, estimator="stratified", gen_length=L)
  m2, _ = rng_lib.mc_masks(s, 3, rows=4, n=2, estimator="stratified", gen_length=L)
  assert m1.shape == (2, 4, L) and w1.shape == (2, 4)
  np.testing.assert_array_equal(m1, m2)
  seeds = [rng_lib.prompt_mask_seeds(s, 3, u, rows=4) for u in (0, 1)]
  assert seeds[0].dtype == np.uint32 and (seeds[0] != seeds[1]).any()
