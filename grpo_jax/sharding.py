"""Meshes, logical-axis rules and multi-host start-up.

A mesh has the axes ("data", "fsdp", "tensor"). The batch is split over ("data", "fsdp"); parameters are
split over "fsdp" (ZeRO-3 style: each device holds a slice, gathered for use) and "tensor" (Megatron-style:
heads and MLP columns split, partial sums reduced) through the logical axis names every parameter carries:

  vocab -> tensor, embed -> fsdp, q_heads / kv_heads / mlp -> tensor, head_dim / norm -> replicated.

Names that do not divide their dimension fall back to replication for that dimension, so one rule set serves
every model size and mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: Mapping[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
}


def make_mesh(shape: Sequence[int] | str = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; `shape` like (-1, 1, 1) or "2,2,2" (one -1 takes the rest)."""
    if isinstance(shape, str):
        shape = tuple(int(x) for x in shape.split(","))
    shape = list(shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape} must be 3 positive sizes for {MESH_AXES}; one may be -1.")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}.")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, there are "
                         f"{len(devices)}; use -1 for one axis to take the rest.")
    device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> PartitionSpec:
    """Map one parameter's logical axis names to a PartitionSpec on `mesh` (replicating what won't divide)."""
    spec, used = [], set()
    for name, size in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """`state` with each Variable's value replaced by its NamedSharding (from its `out_sharding` logical
    names): a tree of the same structure, usable with device_put, jit shardings and optax.tree_map_params."""

    def sharding(variable):
        shape = np.shape(variable.get_value())
        names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def rows_sharding(mesh: Mesh, prompts: int) -> NamedSharding:
    """A batch of `prompts` groups: rows (the leading axis of every field) over ("data", "fsdp"), or
    replicated when the prompts do not split evenly over them (e.g. a small minibatch)."""
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES) if prompts % shards == 0 else PartitionSpec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array, identical on every process, as a global array with `sharding` (each process
    copies only the shards its own devices hold)."""
    array = np.asarray(array)
    # A deliberate placement: allowed under jax.transfer_guard("disallow"), which would count the copies
    # make_array_from_callback makes as implicit.
    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place(tree, shardings):
    """`tree` (arrays of the same value on every process) laid out by `shardings`: one device-to-device
    copy in a single process; in several, each process copies the shards its devices hold (`put_global`)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: put_global(np.asarray(x), s), tree, shardings)


def to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array, as numpy, on every process."""
    if jax.process_count() == 1 or array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start JAX's multi-controller runtime, one process per host, before any other JAX call.

    TPU pods and SLURM/GPU clusters find their peers without arguments; elsewhere pass the coordinator's
    "host:port", the number of processes and this one's id. CPU collectives go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
