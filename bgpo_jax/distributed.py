"""Rows across processes: which global rows a host holds, and gathering host data to every host.

The global batch of a step is the concatenation of the processes' rows in process order
(`train/mesh.py:host_batch_to_global`, `jax.make_array_from_process_local_data` on a
process-contiguous mesh): process p of P holds global rows [p*b, (p+1)*b) where b = B / P.
Everything random in a run is drawn for the GLOBAL rows and sliced here, so one config gives the
same numbers on one host with 8 devices and on two hosts with 4 devices each.

All functions are host-side NumPy. With one process they do no communication and return their
input (or the whole range), so single-process runs pay nothing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np


def _topology(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pc = jax.process_count() if process_count is None else int(process_count)
  pi = jax.process_index() if process_index is None else int(process_index)
  return pi, pc


def host_slice(global_rows: int, *, process_index: int | None = None, process_count: int | None = None) -> slice:
  """This process's contiguous share of `global_rows` rows (it must divide by the process count).
  process_index / process_count default to this process's (given: another host's share).

  >>> host_slice(16, process_index=1, process_count=2)
  slice(8, 16, None)
  """
  pi, pc = _topology(process_index, process_count)
  if global_rows % pc:
    raise ValueError(f"{global_rows} global rows do not split over {pc} processes; use a multiple of {pc}")
  per = global_rows // pc
  return slice(pi * per, (pi + 1) * per)


def global_row_ids(local_rows: int) -> np.ndarray:
  """int64 [local_rows]: the global row index of each of this process's rows (use these, never
  the process index, to derive per-row seeds: the result is then the same on any topology)."""
  start = jax.process_index() * int(local_rows)
  return np.arange(start, start + int(local_rows), dtype=np.int64)


def split_rows(n: int, multiple: int = 1, *, process_index: int | None = None,
               process_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's share of n rows (e.g. one evaluation batch), padded so that every process
  holds the same count and the padded global count divides by `multiple` (the mesh's batch
  shards).

  The padded global layout is rows 0..n-1 then copies of row n-1, split contiguously over the
  processes. Returns (indices int64 [per] into 0..n-1, valid bool [per]: False on padding).
  `gather_valid` undoes it.
  """
  if n <= 0:
    raise ValueError(f"split_rows needs n > 0 rows, got {n}")
  pi, pc = _topology(process_index, process_count)
  unit = math.lcm(pc, max(1, int(multiple)))
  padded = -(-n // unit) * unit
  pos = np.arange(padded, dtype=np.int64)[host_slice(padded, process_index=pi, process_count=pc)]
  return np.minimum(pos, n - 1), pos < n


def allgather_rows(tree: Any) -> Any:
  """Every process's arrays concatenated along axis 0 in process order, on every process.

  `tree`: a NumPy array or a pytree of them; each leaf must have the same shape on every
  process (pad first where it does not). One process: returned as NumPy, nothing sent.
  """
  tree = jax.tree.map(np.asarray, tree)
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_valid(local: Any, valid: np.ndarray) -> Any:
  """`allgather_rows` of rows laid out by `split_rows`, the padding dropped: global rows 0..n-1."""
  keep = allgather_rows(np.asarray(valid, bool))
  return jax.tree.map(lambda x: x[keep], allgather_rows(local))


def allgather_strings(strings: Sequence[str]) -> list[str]:
  """Every process's list of strings, concatenated in process order (equal lengths per process).
  Sent as UTF-8 bytes padded to the longest; for per-example records such as completions."""
  if jax.process_count() == 1:
    return list(strings)
  data = [s.encode("utf-8") for s in strings]
  lengths = np.asarray([len(d) for d in data], np.int32)
  width = int(np.max(allgather_rows(np.asarray([lengths.max(initial=0)], np.int32))))
  buf = np.zeros((len(data), max(width, 1)), np.uint8)
  for i, d in enumerate(data):
    buf[i, :len(d)] = np.frombuffer(d, np.uint8)
  all_buf, all_len = allgather_rows((buf, lengths))
  return [bytes(row[:k]).decode("utf-8") for row, k in zip(all_buf, all_len)]
