"""Meshes and logical-axis sharding, MaxText style.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, ...) in its NNX `out_sharding` metadata; activations are annotated with `activation_*`
names. `logical_axis_rules` map those names onto the physical mesh axes `(data, fsdp, tensor)`.
A dimension whose size does not divide by its mesh axes is replicated instead (e.g. 2 KV heads on
tensor=4), so one rule set serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_LOGICAL_AXIS_RULES: LogicalAxisRules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("labels", None),
    # The stacked layer axis of scanned parameters: every device holds its share of every layer.
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    # The residual stream between blocks (transformer.residual_constraint): sequence parallelism.
    ("activation_norm_length", "tensor"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_log = logging.getLogger(__name__)
_current_rules: contextvars.ContextVar[LogicalAxisRules] = contextvars.ContextVar(
    "prm_jax_logical_axis_rules", default=DEFAULT_LOGICAL_AXIS_RULES
)


@contextlib.contextmanager
def logical_axis_rules(rules: Sequence[Sequence[Any]]) -> Iterator[None]:
    """Temporarily replaces the rules used by `logical_constraint` and `state_shardings`."""
    token = _current_rules.set(tuple((name, _as_axes(axes)) for name, axes in rules))
    try:
        yield
    finally:
        _current_rules.reset(token)


def current_logical_axis_rules() -> LogicalAxisRules:
    return _current_rules.get()


def _as_axes(axes: Any) -> str | tuple[str, ...] | None:
    if axes is None or isinstance(axes, str):
        return axes
    return tuple(axes)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one axis may be -1 to take the remaining devices.

    Defaults to all devices on `fsdp`, the usual choice for training one model on one slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {axis: 1 for axis in MESH_AXES}
    sizes.update(shape or {"fsdp": -1})
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {sizes}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, {len(devices)} available")
    axis_shapes = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_partition_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules | None = None,
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec.

    A mesh axis is used at most once per array; with `shape` and `mesh`, a dimension that does
    not divide by its mesh axes' size is left replicated.
    """
    rules = current_logical_axis_rules() if rules is None else rules
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        if axes and shape is not None and mesh is not None:
            # Keep the longest prefix of the mesh axes that divides the dimension.
            kept: tuple[str, ...] = ()
            for axis in axes:
                if shape[dim] % (math.prod(mesh.shape[a] for a in kept + (axis,))):
                    break
                kept += (axis,)
            if kept != axes:
                _log.info(
                    "dim %d (%s, size %d) does not divide over mesh axes %s: sharded over %s only",
                    dim,
                    name,
                    shape[dim],
                    axes,
                    kept or "none",
                )
            axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was declared with (None when it has none)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalAxisRules | None = None) -> Any:
    """NamedShardings for every Variable of an (abstract or concrete) NNX state."""

    def one(variable: nnx.Variable) -> NamedSharding:
        axes = logical_axes_of(variable)
        shape = variable.get_value().shape
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match shape {shape}")
        return NamedSharding(mesh, logical_to_partition_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_partition_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
