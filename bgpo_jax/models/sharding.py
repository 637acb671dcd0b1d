"""Logical-axis sharding: map the model's logical axis names onto a ("data", "fsdp", "tensor") mesh.

Parameters carry logical names (llada.param_logical_axes); a rule table maps each name to a mesh
axis (or a tuple of mesh axes, or None = replicated). Mesh axes absent from the mesh (or of size
1) are dropped, so the same rules work on 1 device, pure FSDP, or FSDP x tensor parallel.

Activations: `constrain(x, logical_axes)` pins an intermediate's layout inside the model (the
batch over ("data", "fsdp"), heads / MLP over "tensor", the vocab head's logits over both model
axes); `gather_weight` casts a parameter and gathers its FSDP axis for a matmul. Both read the
mesh of the current context (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`; the train step
and the rollout sampler set one) and are no-ops without one, on one device, and for Explicit
mesh axes (whose shardings live in the array types). Without them XLA's propagation is free to
keep the embed-split weights in place and move the activations instead (all-gathering every
device's micro-batch and all-reducing partial sums), which is not FSDP and costs ~8x the
activation memory on an 8-way mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
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
  # activations (`constrain` inside the model, with_sharding_constraint in train steps)
  ("batch", ("data", "fsdp")),
  ("seq", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  # where "fsdp" splits a model dimension (the embedding lookup's output, the vocab head's
  # logits) the batch is split over "data" only
  ("batch_dp", "data"),
  ("head_vocab", ("tensor", "fsdp")),
)


def _is_axes_leaf(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 (takes the remaining devices).

  Keyword form of `bgpo_jax.train.mesh.make_mesh`, which builds every mesh of the project.
  """
  from bgpo_jax.train.mesh import make_mesh as make_shaped_mesh  # train imports models, not back
  return make_shaped_mesh((data, fsdp, tensor), devices)


def _spec(axes: Sequence[str | None], sizes: Mapping[str, int], rules: Sequence[tuple[str, Any]],
          shape: Sequence[int] | None) -> PartitionSpec:
  """logical_to_spec over the usable mesh axes `sizes` (name -> size)."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(a for a in targets if sizes.get(a, 1) > 1 and a not in used)
    if targets and shape is not None:
      size = int(np.prod([sizes[a] for a in targets]))
      if shape[i] % size:
        targets = ()
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names of one array -> PartitionSpec on `mesh`.

  Mesh axes not in the mesh or of size 1 are dropped; a mesh axis already used by an earlier
  dimension is not reused; with `shape`, a dimension not divisible by its mesh axes' total size
  stays replicated (e.g. 8 kv heads on a 16-way tensor axis).
  """
  return _spec(axes, dict(mesh.shape), rules, shape)


def context_mesh_axes() -> dict[str, int]:
  """Auto-typed axes of size > 1 of the current context mesh (name -> size); {} without a mesh.

  Inside jit this is the mesh entered by `jax.set_mesh` (outside the jit) or
  `jax.sharding.use_abstract_mesh` (inside it). Explicit and Manual axes are left out: explicit
  shardings are part of the array types, manual axes belong to a shard_map body.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size <= 1:
    return {}
  auto = jax.sharding.AxisType.Auto
  return {name: size for (name, size), t in zip(mesh.shape.items(), mesh.axis_types)
          if t == auto and size > 1}


def context_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                 rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> PartitionSpec:
  """The PartitionSpec `constrain` would give an array of `shape` on the context mesh (for a
  shard_map's specs); PartitionSpec() without a context mesh."""
  return _spec(logical_axes, context_mesh_axes(), rules, shape)


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> jax.Array:
  """with_sharding_constraint of `x` to its logical axes on the context mesh; a no-op (returns
  `x` itself) without a context mesh of more than one device.

  A dimension not divisible by its mesh axes stays replicated (e.g. a 4-row micro-batch on 8
  devices), so a constraint never pads.
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match the shape {x.shape}")
  sizes = context_mesh_axes()
  if not sizes:
    return x
  return jax.lax.with_sharding_constraint(x, _spec(logical_axes, sizes, rules, x.shape))


def gather_weight(w: jax.Array, logical_axes: Sequence[str | None], compute_axes: Sequence[str | None],
                  dtype: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_RULES) -> jax.Array:
  """A parameter cast to `dtype` and laid out by `compute_axes` for its matmul (FSDP: the "embed"
  axis gathered, tensor-parallel axes kept), on the context mesh; `w.astype(dtype)` without one.

  The backward constrains the gradient straight to the parameter's own sharding (`logical_axes`),
  so XLA reduce-scatters the per-device partial sums instead of all-reducing a full copy on every
  device (XLA:CPU has no reduce-scatter: it all-reduces and slices). The reduction runs in the
  compute dtype, as the unconstrained program's would; the shard is then cast to the parameter
  dtype for the float32 accumulation.
  """
  if len(logical_axes) != w.ndim or len(compute_axes) != w.ndim:
    raise ValueError(f"logical axes {tuple(logical_axes)} / {tuple(compute_axes)} do not match "
                     f"the shape {w.shape}")
  sizes = context_mesh_axes()
  if not sizes:
    return w.astype(dtype)
  return _gather(w, _spec(compute_axes, sizes, rules, w.shape), _spec(logical_axes, sizes, rules, w.shape),
                 jnp.dtype(dtype), w.dtype)


# dtypes ride as static arguments: a custom_vjp residual must be an array.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gather(w: jax.Array, compute_spec: PartitionSpec, param_spec: PartitionSpec, dtype,
            param_dtype) -> jax.Array:
  return jax.lax.with_sharding_constraint(w.astype(dtype), compute_spec)


def _gather_fwd(w, compute_spec, param_spec, dtype, param_dtype):
  return _gather(w, compute_spec, param_spec, dtype, param_dtype), None


def _dims(spec: PartitionSpec, ndim: int) -> list[set]:
  out = []
  for d in tuple(spec) + (None,) * (ndim - len(spec)):
    out.append(set() if d is None else {d} if isinstance(d, str) else set(d))
  return out


def _gather_bwd(compute_spec, param_spec, dtype, param_dtype, _, ct):
  # The transposed matmul yields the gradient in the compute layout (as partial sums when the
  # batch was split). If that layout only drops mesh axes of the parameter's, constraining to the
  # parameter's layout is one reduce-scatter. If it splits a dimension the parameter does not
  # (the vocab-parallel head), pin the compute layout first: else XLA may gather the other
  # operand (the full [B,S,V] logits gradient) to produce the parameter layout directly.
  if any(c - p for c, p in zip(_dims(compute_spec, ct.ndim), _dims(param_spec, ct.ndim))):
    ct = jax.lax.with_sharding_constraint(ct, compute_spec)
  return (jax.lax.with_sharding_constraint(ct, param_spec).astype(param_dtype),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` with `mesh` as the context mesh while it is traced, for `jax.jit(under_mesh(fn, mesh))`.

  The abstract mesh is entered inside the traced function (jax.set_mesh is not allowed under
  jit), so a direct call and `.lower(...).compile()` both see it, and `constrain` inside `fn`
  takes effect. A mesh of one device returns `fn` unchanged.
  """
  if mesh.size <= 1:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


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
