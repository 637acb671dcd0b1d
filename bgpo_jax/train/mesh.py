"""Device mesh (data, fsdp, tensor), multi-host start-up, and placing host batches on the mesh."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Calls `jax.distributed.initialize()` when started as one of several processes.

  mode: "auto" (initialize when a multi-host environment is detected: TPU pod slice, SLURM with
  several tasks, or JAX_COORDINATOR_ADDRESS set), "on" (always) or "off".
  """
  if mode == "off":
    return
  if mode not in ("auto", "on"):
    raise ValueError(f"config.distributed {mode!r} is unknown; use auto, on or off")
  multi = (
      mode == "on"
      or "JAX_COORDINATOR_ADDRESS" in os.environ
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1
      or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
  )
  if not multi:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry with the devices left; checks the product.

  >>> resolve_mesh_shape((-1, 2, 1), 8)
  (4, 2, 1)
  """
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape {tuple(shape)} needs {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {tuple(shape)} has more than one -1; at most one axis can take 'the rest'")
  known = int(np.prod([s for s in shape if s != -1]))
  if known <= 0 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape {tuple(shape)} must hold positive sizes or -1")
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape {tuple(shape)}: {num_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"config.mesh.shape {tuple(shape)} uses {int(np.prod(shape))} devices but {num_devices} are present; "
        "use -1 for one axis to take the rest")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  resolved = resolve_mesh_shape(shape, len(devices))
  # Auto axes: shardings come from jit's in/out shardings and the propagation of XLA's partitioner.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(resolved, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Splits `batch_axis` over (data, fsdp); other axes replicated."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict, mesh: Mesh, batch_axes: dict | None = None) -> dict:
  """Builds global arrays from this process's share of the batch.

  Every process passes its own rows (the global batch is their concatenation in process order);
  on one process this is a plain device_put with the batch sharding. `batch_axes` maps a key to
  the position of its batch axis (default 0), e.g. MC masks [n, B, L] use 1.
  """
  batch_axes = batch_axes or {}
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    axis = batch_axes.get(k, 0)
    sharding = batch_sharding(mesh, v.ndim, axis)
    global_shape = list(v.shape)
    global_shape[axis] *= jax.process_count()
    out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(global_shape))
  return out
