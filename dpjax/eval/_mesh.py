"""Batch splitting over a device mesh, shared by the evaluation loops."""

from __future__ import annotations

import contextlib
import math

import jax

from dpjax.ops import sharded


def batch_sharding(
    mesh: jax.sharding.Mesh | None, batch_size: int, num_rows: int
) -> tuple[int, jax.sharding.NamedSharding | None]:
    """``(batch_size, sharding)``: with a mesh of several devices, the batch is split over all
    of them (``batch_size`` rounded up to a multiple of the device count); else no sharding and
    ``batch_size`` at most ``num_rows``."""
    if mesh is None or mesh.size == 1:
        return min(batch_size, num_rows), None
    batch_size = math.ceil(batch_size / mesh.size) * mesh.size
    return batch_size, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))


def op_sharding(mesh: jax.sharding.Mesh | None):
    """Pallas kernels run per device over the batch-split mesh (``dpjax.ops.sharded``)."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return sharded.batch_parallel(mesh, mesh.axis_names)
