"""Run an implementation of the op under ``jax.shard_map`` over the batch axes of a mesh.

A ``pallas_call`` is not partitioned by XLA (JAX_NOTES §0.8): under an Auto mesh with a sharded
batch it silently all-gathers its inputs and runs replicated on every device. The recurrence is
independent per row, so the fix is to run the kernels per device on that device's rows:
``jax.shard_map`` with every input and output split along its leading (batch) dimension over the
mesh's batch axes (``check_vma=False``, needed by the interpret-mode kernels; §0.8).

Usage (training code)::

    from dpjax.ops import sharded
    with sharded.batch_parallel(mesh, ("data", "fsdp")):     # trace the train step in here
        step = jax.jit(train_step)
        step(state, batch)

Inside the context, ``wrap_forward(name, forward)`` returns ``forward`` wrapped in a
``shard_map`` when ``name`` is one of the context's implementations (default: ``"pallas"``) and
``forward`` unchanged otherwise (the pure-JAX ``chunked``/``reference`` paths are partitioned by
XLA already). The dispatcher hooks it with one line in ``dpjax.ops.delta_product`` (see
``hook_installed``)::

    forward = sharded.wrap_forward(name, _load(name).forward)

Implementation ``forward`` functions share the signature
``forward(q, k, v, beta, g, h0, resets, *, num_householder, scale) -> (o, final_state)`` with
every array argument batch-leading (``q [N, T, H, K]``, ``k``/``v``/``beta [N, T*n_h, ...]``,
``g [N, T, H]``, ``h0 [N, H, K, V]``, ``resets [N, T]``; ``None`` allowed for g, h0, resets),
and outputs ``o [N, T, H, V]``, ``final_state [N, H, K, V]``. ``N`` (batch rows, or documents
of a ``cu_seqlens`` call with initial/final states) must divide by the product of the batch
axis sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

__all__ = [
    "BatchParallel",
    "active",
    "batch_parallel",
    "check_rows",
    "hook_installed",
    "row_spec",
    "shard_forward",
    "wrap_forward",
]

Forward = Callable[..., tuple[jax.Array, jax.Array]]


@dataclass(frozen=True)
class BatchParallel:
    """The active setting: run ``impls`` per device over ``mesh``'s ``axes``."""

    mesh: Mesh
    axes: tuple[str, ...]
    impls: frozenset[str]

    @property
    def size(self) -> int:
        """Number of batch shards (product of the batch axis sizes)."""
        return int(np.prod([self.mesh.shape[a] for a in self.axes]))


_ACTIVE: contextvars.ContextVar[BatchParallel | None] = contextvars.ContextVar(
    "dpjax_batch_parallel", default=None
)


def active() -> BatchParallel | None:
    """The innermost ``batch_parallel`` setting, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def batch_parallel(
    mesh: Mesh,
    axes: str | Sequence[str] = ("data", "fsdp"),
    impls: Sequence[str] = ("pallas",),
) -> Iterator[BatchParallel]:
    """Within the block, ``impls`` of the op run under ``shard_map`` over ``mesh``'s ``axes``.

    The setting is read when a function is traced: enter the block around the first call of a
    jitted step (or around ``jax.jit(...).lower``), not only around its definition.

    Args:
      mesh: the device mesh (Auto or Explicit axes).
      axes: mesh axes the batch dimension is split over (training: ``("data", "fsdp")``).
      impls: implementation names to wrap (``"pallas"``; ``"chunked"``/``"reference"`` for tests).

    Raises:
      ValueError: an axis is not in the mesh.
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing or not axes:
        raise ValueError(
            f"batch_parallel: axes {axes} must be non-empty mesh axes; the mesh has "
            f"{mesh.axis_names}"
        )
    token = _ACTIVE.set(BatchParallel(mesh, axes, frozenset(impls)))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def row_spec(axes: Sequence[str]) -> P:
    """The ``PartitionSpec`` splitting a leading (batch) dimension over mesh ``axes``."""
    axes = tuple(axes)
    return P(axes[0] if len(axes) == 1 else axes)


def check_rows(n: int, n_shards: int, axes: Sequence[str], what: str) -> None:
    """``ValueError`` unless ``what`` (a leading dimension of size ``n``) splits evenly into the
    ``n_shards`` shards of mesh ``axes``."""
    if n % n_shards:
        raise ValueError(
            f"batch_parallel: {what} is {n}, which does not divide by the {n_shards} shards of "
            f"mesh axes {tuple(axes)}; use a batch that is a multiple of {n_shards}, or leave "
            "the batch_parallel context"
        )


def per_device_rows(
    run: Callable, row_args: tuple, shared_args: tuple, row_outs: int, summed_outs: int, what: str
) -> tuple:
    """``run(*row_args, *shared_args)``, per device on its rows (a ``shard_map``) when a
    ``batch_parallel`` block covering ``"pallas"`` is active, else as it is (the Pallas kernels
    of the short convolutions and norms, ``dpjax.nn``).

    ``row_args`` are ``[B, ...]`` (or None; the first is not None, and ``what`` names its batch in
    the error when ``B`` does not divide over the devices); ``shared_args`` (or None) are whole on
    every device. The outputs are ``row_outs`` ``[B, ...]`` arrays then ``summed_outs`` per-device
    sums (or None), added over the devices.
    """
    setting = active()
    if setting is None or "pallas" not in setting.impls:
        return run(*row_args, *shared_args)
    check_rows(row_args[0].shape[0], setting.size, setting.axes, what)
    rows = row_spec(setting.axes)

    def local(*args):
        outs = run(*args)
        return (*outs[:row_outs], *(None if o is None else o[None] for o in outs[row_outs:]))

    outs = jax.shard_map(
        local,
        mesh=setting.mesh,
        in_specs=(
            *(None if a is None else rows for a in row_args),
            *(None if a is None else P() for a in shared_args),
        ),
        out_specs=(rows,) * (row_outs + summed_outs),
        check_vma=False,
    )(*row_args, *shared_args)
    return (*outs[:row_outs], *(None if o is None else jnp.sum(o, 0) for o in outs[row_outs:]))


def shard_forward(forward: Forward, mesh: Mesh, axes: Sequence[str]) -> Forward:
    """``forward`` run per device on its rows: ``shard_map`` over ``axes``, batch-leading specs.

    Args:
      forward: an implementation's ``forward`` (signature in the module docstring).
      mesh: device mesh; axes: mesh axes the leading dimension is split over.

    Returns:
      A function with ``forward``'s signature. It raises ``ValueError`` when the leading
      dimension ``N`` does not divide by the number of shards.
    """
    axes = tuple(axes)
    n_shards = int(np.prod([mesh.shape[a] for a in axes]))
    rows = row_spec(axes)

    def wrapped(q, k, v, beta, g, h0, resets, *, num_householder: int, scale: float):
        check_rows(
            q.shape[0],
            n_shards,
            axes,
            "the op's leading dimension (batch rows, or documents with cu_seqlens)",
        )
        arrays = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "h0": h0, "resets": resets}
        present = {name: x for name, x in arrays.items() if x is not None}

        def local(present_local):
            a = dict.fromkeys(arrays) | present_local
            return forward(
                a["q"], a["k"], a["v"], a["beta"], a["g"], a["h0"], a["resets"],
                num_householder=num_householder, scale=scale,
            )  # fmt: skip

        specs = {name: rows for name in present}
        run = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs,),
            out_specs=(rows, rows),
            check_vma=False,
        )
        return run(present)

    return wrapped


def wrap_forward(name: str, forward: Forward) -> Forward:
    """``forward`` under ``shard_map`` when a ``batch_parallel`` block covering implementation
    ``name`` is active; ``forward`` itself otherwise."""
    setting = active()
    if setting is None or name not in setting.impls:
        return forward
    return shard_forward(forward, setting.mesh, setting.axes)


def hook_installed(impl: str = "chunked") -> bool:
    """Whether ``dpjax.delta_product`` calls ``wrap_forward`` (the dispatcher hook).

    Traces (does not run) a tiny call of implementation ``impl`` inside a one-device
    ``batch_parallel`` block and looks for a ``shard_map`` in the jaxpr.
    """
    from dpjax.ops import delta_product

    mesh = jax.make_mesh(
        (1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
    )
    q = jnp.zeros((1, 2, 1, 4), jnp.float32)
    beta = jnp.zeros((1, 2, 1), jnp.float32)
    with batch_parallel(mesh, ("batch",), impls=(impl,)):
        jaxpr = jax.make_jaxpr(lambda q, b: delta_product(q, q, q, b, impl=impl)[0])(q, beta)
    return "shard_map" in str(jaxpr)
