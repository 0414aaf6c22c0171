"""Device mesh and logical-to-mesh sharding rules.

The mesh has two axes, ``("data", "fsdp")``, over all devices (all processes): the batch is split
over both; parameters are replicated by default (pure data parallelism, ``fsdp=1``) and, with
``fsdp > 1``, their ``embed`` dimension is split over the ``fsdp`` axis: stored, updated and
checkpointed sharded, gathered whole for each step's compute (``dpjax.train.step.gather_parameters``
says why). Both axes are ``AxisType.Auto`` (GSPMD propagation; JAX_NOTES §0.9).

Parameters carry logical names in their ``out_sharding`` metadata (``dpjax.nn.sharding_names``:
``vocab``, ``embed``, ``heads``, ``mlp`` or ``None``); ``rules`` map them to mesh axes. A
dimension whose size does not divide by its mesh axes is replicated instead.

A Pallas kernel is not partitioned by XLA (JAX_NOTES §0.8): under this Auto mesh it would run
replicated on all-gathered inputs. The ``pallas`` op path therefore needs a ``jax.shard_map``
wrapper over the batch axes ``("data", "fsdp")`` inside the model; the ``chunked``/``reference``
paths are plain JAX and partition automatically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXES",
    "BATCH_AXES",
    "Rules",
    "batch_sharding",
    "default_rules",
    "make_mesh",
    "replicated",
    "shard_batch",
    "spec_for",
    "state_shardings",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, str | tuple[str, ...] | None]


def default_rules(fsdp: bool = False) -> dict[str, str | tuple[str, ...] | None]:
    """Logical-name -> mesh-axis rules: replicated params, or ``embed`` over ``fsdp``."""
    return {"vocab": None, "embed": "fsdp" if fsdp else None, "heads": None, "mlp": None}


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` Auto mesh of shape ``(n // fsdp, fsdp)`` over ``devices``.

    Args:
      fsdp: size of the parameter-sharding axis (1 = pure data parallelism).
      devices: defaults to ``jax.devices()`` (every device of every process).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the device count {n}")
    return jax.make_mesh((n // fsdp, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """PartitionSpec for one array from its logical names (``None`` names -> replicated).

    Raises:
      ValueError: if a logical name has no rule, or names and shape disagree in length.
    """
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"sharding names {tuple(names)} do not match shape {tuple(shape)}")
    spec = []
    used: set[str] = set()
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}"
            )
        axes = rules[name]
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if not flat or size % _axis_size(mesh, flat) or used & set(flat):
            spec.append(None)  # not divisible / already used: replicate this dimension
            continue
        used |= set(flat)
        spec.append(flat[0] if len(flat) == 1 else flat)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """Same tree as ``state`` with a ``NamedSharding`` per leaf, from ``out_sharding`` metadata.

    ``state`` may hold concrete arrays or ``jax.ShapeDtypeStruct`` (from ``nnx.eval_shape``).
    Variables without names (RNG counters, ...) are replicated.
    """

    def one(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        if isinstance(names, P):
            names = tuple(names)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        return var.replace(NamedSharding(mesh, spec_for(names, value.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays split over the batch axes."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x)
        for name, x in batch.items()
    }
