"""Logical-axis sharding: map the model's logical axis names onto a ("data", "fsdp", "tensor") mesh.

Parameters carry logical names (llada.param_logical_axes); a rule table maps each name to a mesh
axis (or a tuple of mesh axes, or None = replicated). Mesh axes absent from the mesh (or of size
1) are dropped, so the same rules work on 1 device, pure FSDP, or FSDP x tensor parallel.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (str), several mesh axes (tuple) or None (replicated).
DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  # parameters
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("norm", None),
  # activations (for with_sharding_constraint in train steps)
  ("batch", ("data", "fsdp")),
  ("seq", None),
  ("act_embed", None),
)


def _is_axes_leaf(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 (takes the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by data*fsdp*tensor={known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                     f"{int(np.prod(sizes))} devices, have {len(devices)}")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names of one array -> PartitionSpec on `mesh`.

  Mesh axes not in the mesh or of size 1 are dropped; a mesh axis already used by an earlier
  dimension is not reused; with `shape`, a dimension not divisible by its mesh axes' total size
  stays replicated (e.g. 8 kv heads on a 16-way tensor axis).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(a for a in targets
                    if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    if targets and shape is not None:
      size = int(np.prod([mesh.shape[a] for a in targets]))
      if shape[i] % size:
        targets = ()
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def logical_to_sharding(logical_axes_tree: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES,
                        shapes: Any = None) -> Any:
  """Tree of logical axis tuples -> tree of NamedSharding (same structure).

  `shapes` (optional): a matching tree of arrays / ShapeDtypeStructs / shape tuples, used to keep
  non-divisible dimensions replicated.
  """
  if shapes is None:
    return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, mesh, rules)),
                        logical_axes_tree, is_leaf=_is_axes_leaf)

  def one(axes, s):
    shape = s if isinstance(s, tuple) else tuple(s.shape)
    if len(shape) != len(axes):
      raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))

  return jax.tree.map(one, logical_axes_tree, shapes, is_leaf=_is_axes_leaf)
