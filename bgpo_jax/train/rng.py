"""The run's random streams, by name, and the host-side draws made from them.

Every random number of a run comes from `config.seed` through one named stream, folded with the
step (and the inner update where there is one). A stream's number is part of every result the
run produces: renumbering one changes every run's masks, rollouts or evaluations, so new streams
take new numbers and old ones never change.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax import distributed as dist
from bgpo_jax.diffusion import masking

STREAMS = {
    "init": 0,  # the model's initial weights (when no checkpoint is loaded)
    "rollout": 1,  # the reverse process's draws for each RL step's rollouts
    "mc_masks": 2,  # the MC masks (and their weights) of each SFT / RL step
    "eval": 3,  # the evaluation sampler at each evaluated step
    "prompt_mask_seeds": 4,  # diffu-GRPO's per-row prompt-mask seeds, per step and inner update
    "lora": 5,  # fresh LoRA adapters' A (config.lora.rank > 0, no init.adapter)
    "lora_dropout": 6,  # per-row seeds of the adapters' dropout masks, per step and inner update
}


@dataclasses.dataclass(frozen=True)
class RngStreams:
  """Keys of the named streams of one seed: `key("rollout", step)`."""

  seed: int

  def key(self, stream: str, *path: int) -> jax.Array:
    if stream not in STREAMS:
      raise KeyError(f"unknown random stream {stream!r}; the run's streams are {sorted(STREAMS)}")
    key = jax.random.fold_in(jax.random.key(self.seed), STREAMS[stream])
    for p in path:
      key = jax.random.fold_in(key, p)
    return key


def mc_masks(streams: RngStreams, step: int, rows: int, n: int, estimator: str,
             gen_length: int) -> tuple[np.ndarray, np.ndarray]:
  """This host's MC masks [n, rows, gen_length] and weights [n, rows] for `step`.

  Drawn for the GLOBAL rows (`rows` is this host's share) and sliced, so every topology trains
  on the same masks; one draw per step, shared by every policy evaluated on the batch (current,
  old and reference terms see the same masks).
  """
  key = streams.key("mc_masks", step, 0)  # the trailing 0 keeps the keys of one-process runs
  total = rows * jax.process_count()
  m, w = masking.sample_masks(key, total, gen_length, n, estimator=estimator)
  mine = dist.host_slice(total)
  return np.asarray(m)[:, mine], np.asarray(w)[:, mine]


def prompt_mask_seeds(streams: RngStreams, step: int, update: int, rows: int) -> np.ndarray:
  """[rows] uint32 prompt-mask seeds (diffu-GRPO): distinct per row, inner update and step; drawn
  for the global rows (every host trains the same count) and sliced like `mc_masks`."""
  key = streams.key("prompt_mask_seeds", step, update)
  seeds = np.asarray(jax.random.bits(key, (rows * jax.process_count(),), jnp.uint32))
  return seeds[dist.host_slice(len(seeds))]


def lora_dropout_seeds(streams: RngStreams, step: int, update: int, rows: int) -> np.ndarray:
  """[rows] uint32 seeds of the LoRA dropout masks (config.lora.dropout > 0): distinct per row,
  inner update and step; drawn for the global rows and sliced like `mc_masks`, so a row's masks
  are the same on any topology or micro-batching."""
  key = streams.key("lora_dropout", step, update)
  seeds = np.asarray(jax.random.bits(key, (rows * jax.process_count(),), jnp.uint32))
  return seeds[dist.host_slice(len(seeds))]
