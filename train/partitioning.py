"""Mesh construction and logical-axis -> mesh-axis sharding (MaxText style)."""

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The global batch is split over both.


def mesh_shape(mesh_cfg, num_devices):
    """Sizes for (data, fsdp, tensor); one may be -1 to absorb the remaining devices."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} "
            f"devices: the product of data*fsdp*tensor must equal the device count "
            f"(use -1 on one axis to absorb the rest)")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 or make the product match")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:  # Topology-aware device order on TPU/GPU; falls back to plain order on CPU.
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - any failure means no topology information.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def check_batch_divides(batch_size, mesh, key="config.data.batch_size"):
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % shards:
        raise ValueError(
            f"{key}={batch_size} is not divisible by the data*fsdp mesh size {shards} "
            f"(mesh {dict(mesh.shape)})")


def batch_sharding(mesh):
    """Arrays whose leading axis is the global batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree, mesh, rules):
    """Shardings for a tree of (abstract) values carrying logical axis names."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
