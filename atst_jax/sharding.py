"""Device mesh and logical-axis sharding.

Every parameter carries logical axis names in its ``axes`` metadata (e.g. ``("embed", "mlp")``); a rules
table from the config maps logical names to mesh axes. Models never name mesh axes themselves, so the same
model shards differently by config alone (data parallel, FSDP, tensor parallel).

We keep the names under our own ``axes`` key rather than Flax's ``out_sharding``: Flax shards variables
eagerly when that key is present, which would tie model construction to a mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# The error root lives in atst_jax.errors; ConfigError is re-exported here, where most modules import it.
from atst_jax.errors import ConfigError  # noqa: F401

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the ``-1`` entry of a ``{data, fsdp, tensor}`` mapping and checks the product."""
    sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(
            f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    if unknown:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(
                f"mesh: {num_devices} devices cannot be split into "
                f"{dict(zip(MESH_AXES, sizes, strict=True))} (the fixed axes' product {known} does not divide it)"
            )
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh: product of {dict(zip(MESH_AXES, sizes, strict=True))} = {math.prod(sizes)} "
            f"does not equal the device count {num_devices}"
        )
    return tuple(sizes)


def make_mesh(
    mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds the ``('data', 'fsdp', 'tensor')`` mesh with explicit (Auto) axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules: Sequence[tuple[str, object]]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; each mesh axis is used at most once."""
    table = dict((name, target) for name, target in rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis can shard only one dimension of an array; later dims fall back to replication.
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide the dimension they would shard (tiny models, odd sizes)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = []
        size = 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a variable; scanned (stacked) layers get a leading ``layers`` axis."""
    axes = tuple(var.get_metadata().get("axes", ()) or ())
    ndim = np.ndim(var.get_value()) if hasattr(var, "get_value") else np.ndim(var.value)
    if len(axes) == ndim - 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        axes = (None,) * ndim
    return axes


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for an ``nnx.State``, same tree structure (each Variable holds its sharding), so the
    result can be passed directly as ``in_shardings``/``out_shardings``."""

    def one(v):
        if isinstance(v, nnx.Variable):
            value = v.get_value() if hasattr(v, "get_value") else v.value
            spec = logical_to_spec(variable_axes(v), rules)
            return v.replace(NamedSharding(mesh, _fit_spec(spec, np.shape(value), mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading dimension is the global batch."""
    spec = logical_to_spec(("batch",), rules)
    return NamedSharding(mesh, PartitionSpec(*tuple(spec), *([None] * (ndim - 1))))


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the global batch is split over (from the ``batch`` rule)."""
    entry = logical_to_spec(("batch",), rules)[0]
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def data_parallel_size(axis_sizes: Mapping[str, int], rules) -> int:
    """How many ways the batch is split, given mesh axis sizes (``mesh.shape`` or a plain mapping)."""
    return math.prod(axis_sizes[n] for n in batch_axes(rules))


# The (mesh, rules) that ``constrain`` applies while a train step is traced; None outside (plain calls,
# export, tests of the model alone), where ``constrain`` is the identity.
_ACTIVATION_CONTEXT: tuple[jax.sharding.Mesh, tuple] | None = None


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules):
    """Makes ``constrain`` pin activations to ``rules`` on ``mesh`` while a function is traced under it."""
    global _ACTIVATION_CONTEXT
    previous, _ACTIVATION_CONTEXT = _ACTIVATION_CONTEXT, (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT = previous


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical activation names (``act_batch``, ``act_mlp``, ...).

    Left to sharding propagation, XLA under FSDP can keep the whole global batch's activations on every
    device (seen with one replicated MLP bias: 7.6 GiB of temporaries per device for ``base`` at fsdp=256,
    one clip per device, vs 0.6 GiB). Pinning the batch dimension of the residual stream and of the MLP and
    attention activations keeps each device on its own examples and makes XLA gather the weights.
    """
    if _ACTIVATION_CONTEXT is None:
        return x
    mesh, rules = _ACTIVATION_CONTEXT
    spec = _fit_spec(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def rules_from_config(rules_config) -> tuple[tuple[str, object], ...]:
    """Converts the config's rules (a list of [name, target] pairs) to a tuple of pairs."""
    out = []
    for name, target in rules_config:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)
