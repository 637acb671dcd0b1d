"""From scored rollouts to the batch an RL step trains on (host side, NumPy).

rewards [P * G] -> group advantages -> metrics over the global batch -> responses cut after their
first stop token -> (optionally) only the groups with a non-zero advantage. `make_rl_batch` is a
function of its inputs; the collectives it needs with several processes come in as arguments
(`gather`, `host_slice`), which are identities-in-effect on one process.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from bgpo_jax import distributed as dist
from bgpo_jax import objectives


def fill_after_stop(tokens: np.ndarray, prompt_len: int, response_lengths: np.ndarray,
                    eos_id: int) -> np.ndarray:
  """A copy of tokens [N, P+L] with every response position after the first stop token set to EOS.

  response_lengths [N]: the tokens up to and including the first stop token (L when there is
  none), as `rollout.response_lengths` counts them; the stop token itself (EOS or EOT) is kept.
  """
  tokens = np.array(tokens, copy=True)
  L = tokens.shape[1] - prompt_len
  after = np.arange(L)[None, :] >= np.asarray(response_lengths)[:, None]
  tokens[:, prompt_len:][after] = eos_id
  return tokens


def live_group_rows(advantages: np.ndarray, group_size: int, unit: int = 1) -> tuple[np.ndarray, float]:
  """The rows worth training on, and the advantage scale that keeps the update exact.

  A prompt group whose G rewards are all equal has A = 0: its rows add exactly zero to the
  gradient of an objective that is linear in A without a KL term, yet cost n forward+backward
  passes each. Returns the rows of the groups with some non-zero advantage, padded with
  zero-advantage groups to `unit` x a power of two groups (so a run compiles a handful of
  shapes), and the scale kept_rows / all_rows to multiply the kept advantages by: the step divides
  by the rows it sees, and these objectives are linear in a positive scaling of A.

  advantages: [P * G] in group order (rows i*G .. i*G+G-1 belong to prompt i).
  """
  a = np.asarray(advantages).reshape(-1, group_size)
  prompts = a.shape[0]
  live = np.flatnonzero(np.any(np.abs(a) > 0, axis=1))
  groups = max(1, int(unit))
  while groups < len(live):
    groups *= 2
  if groups >= prompts:
    return np.arange(prompts * group_size), 1.0
  dead = np.setdiff1d(np.arange(prompts), live)[: groups - len(live)]
  chosen = np.sort(np.concatenate([live, dead]))
  rows = (chosen[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
  return rows, len(rows) / (prompts * group_size)


def live_group_unit(group_size: int, data_parallel: int, processes: int, micro_rows: int) -> int:
  """Kept groups come in multiples of this many, so the kept rows split over the devices, the
  processes (each host trains an equal share) and into micro-batches of `micro_rows` (0 = one)."""
  split = int(np.lcm(data_parallel, processes))
  unit = max(1, split // int(np.gcd(split, group_size)))
  if micro_rows:
    unit = max(unit, micro_rows // int(np.gcd(micro_rows, group_size)))
  return unit


def make_rl_batch(tokens: np.ndarray, attention_mask: np.ndarray, prompt_len: int, lengths: np.ndarray,
                  rewards: np.ndarray, correct: np.ndarray, *, group_size: int, eos_id: int,
                  advantage_std: bool, leave_one_out: bool = False, live_unit: int | None = None,
                  gather: Callable = dist.allgather_rows,
                  host_slice: Callable[[int], slice] = dist.host_slice) -> tuple[dict, np.ndarray, dict]:
  """The RL batch of this host's rollouts.

  Args:
    tokens: [N, P+L] prompts and sampled responses (N = this host's P_h * G rows, group order).
    attention_mask: [N, P+L]; lengths: [N] response lengths up to the first stop token.
    rewards, correct: [N] each row's reward and whether its answer is fully correct.
    advantage_std / leave_one_out: `objectives.group_advantages`'s std division and baseline.
    live_unit: train only the groups with a non-zero advantage, in multiples of this many groups
      (`live_group_unit`); None trains every row.
    gather / host_slice: every process's rows concatenated / this process's share of global rows.

  Returns:
    (batch {"tokens", "attention_mask", "advantages"}, the kept rows' lengths [N'], metrics over
    the global batch: the same on every host).
  """
  r = np.asarray(rewards, np.float32).reshape(-1, group_size)
  adv = np.asarray(objectives.group_advantages(jnp.asarray(r), normalize_std=advantage_std,
                                               leave_one_out=leave_one_out)).reshape(-1)
  r_all, adv_all, len_all, ok_all = gather((r, adv, np.asarray(lengths), np.asarray(correct, np.float32)))
  # accuracy = fully correct answers (never a reward >= 1: a format bonus or partial credit is not one).
  m = {"train/reward_mean": float(r_all.mean()), "train/reward_std": float(r_all.std()),
       "train/accuracy": float(ok_all.mean()), "train/response_len": float(np.mean(len_all)),
       "train/zero_adv_groups": float(np.mean(np.all(np.abs(adv_all.reshape(r_all.shape)) < 1e-8, axis=1)))}
  # After its first stop token (EOS / EOT) a response becomes EOS, as LLaDA's SFT data is: decoding
  # and the reward ignore those tokens, so they must not be trained on as sampled.
  lengths = np.asarray(lengths)
  tokens = fill_after_stop(np.asarray(tokens, np.int32), prompt_len, lengths, eos_id)
  attn = np.asarray(attention_mask, np.int32)
  if live_unit is not None:
    # The kept groups are chosen on the global advantages (the same on every host), and each host
    # trains an equal contiguous share of the kept rows (rows move between hosts when the live
    # groups are uneven): the batch equals the one-process batch.
    rows_idx, scale = live_group_rows(adv_all, group_size, live_unit)
    if len(rows_idx) < len(adv_all):
      tokens, attn, lengths = gather((tokens, attn, lengths))
      mine = rows_idx[host_slice(len(rows_idx))]
      tokens, attn, lengths = tokens[mine], attn[mine], lengths[mine]
      adv = adv_all[mine] * scale
    m["train/rows_trained"] = float(len(rows_idx))
  batch = {"tokens": tokens, "attention_mask": attn, "advantages": adv.astype(np.float32)}
  return batch, lengths, m
