"""Input order as a pure function of (seed, step): resumable and identical across hosts.

The global stream of example positions is step * batch_size + i. Position g falls in epoch
g // N at offset g % N, and reads example permutation(seed, epoch)[g % N]; every epoch is a
fresh permutation, so each example is seen once per epoch and a batch may straddle two
epochs. Nothing depends on history, so a run resumed at step s sees exactly the batches it
would have seen, and every host computes the same global batch.

Multi-host: batch_size is the GLOBAL batch (all hosts); host p of P reads the CONTIGUOUS
slice [p * B/P, (p+1) * B/P) of it, matching a batch axis sharded over processes in order
(jax.make_array_from_process_local_data with a process-contiguous data mesh).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=8)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """Read-only permutation of range(num_examples) for (seed, epoch), int64 [num_examples]."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]))
  perm = rng.permutation(num_examples).astype(np.int64)
  perm.setflags(write=False)
  return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int, *,
                  process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True) -> np.ndarray:
  """Example indices this host reads at `step`, int64 [batch_size // process_count].

  batch_size is the global batch; it must be divisible by process_count. shuffle=False
  walks the examples in order (epoch after epoch), e.g. for evaluation.
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples {num_examples} must be positive (empty dataset?)")
  if batch_size <= 0 or step < 0:
    raise ValueError(f"batch_size {batch_size} must be > 0 and step {step} >= 0")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                     f"{process_count}; use a multiple of {process_count}")
  per_host = batch_size // process_count
  start = int(step) * batch_size + process_index * per_host
  pos = np.arange(start, start + per_host, dtype=np.int64)
  if not shuffle:
    return pos % num_examples
  epochs, offsets = np.divmod(pos, num_examples)
  out = np.empty(per_host, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(num_examples, seed, int(e))[offsets[sel]]
  return out


def eval_batches(num_rows: int, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
  """The evaluation's row plan for any split size: every batch has the same global size.

  Global batch k covers rows [k * batch_size, (k + 1) * batch_size); the last one is padded
  past num_rows by repeating the split's last row. Host p of P takes the contiguous slice
  [p * b, (p + 1) * b) of each batch, b = batch_size // P (as batch_indices does), so splitting
  the rows across processes needs no other change.

  Returns [(rows int64 [b], valid bool [b])] per batch: `rows` index the split (post-drop
  positions), `valid` is False on padding rows, whose scores must be dropped. Same-size batches
  mean one compiled program and a batch that always divides the mesh's batch shards.
  """
  if num_rows <= 0:
    raise ValueError(f"num_rows {num_rows} must be positive (empty eval split?)")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"eval batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  per_host = batch_size // process_count
  out = []
  for start in range(0, num_rows, batch_size):
    pos = np.arange(start + process_index * per_host, start + (process_index + 1) * per_host,
                    dtype=np.int64)
    out.append((np.minimum(pos, num_rows - 1), pos < num_rows))
  return out
