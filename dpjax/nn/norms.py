"""RMSNorm and gated RMSNorm (``RMSNorm(x) * w * SiLU(gate)``), computed in fp32.

``impl`` picks who computes them: ``"xla"`` (default: XLA fuses them with their neighbours),
``"pallas"`` (one Pallas kernel each for the forward and the backward,
``pallas_kernels.rms_norm``: the backward reads ``x``, the cotangent and the saved ``1/rms``
once and writes ``dx`` and partial weight gradients once; interpret mode off the GPU) or
``"auto"`` (the kernels on a GPU, XLA elsewhere). Under ``dpjax.ops.sharded.batch_parallel``
the kernels run per device on its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import ones
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import VECTOR
from dpjax.ops import sharded
from pallas_kernels.common import default_interpret
from pallas_kernels.rms_norm import rms_norm_backward, rms_norm_forward

NORM_IMPLS = ("auto", "xla", "pallas")


def check_norm_impl(impl: str, name: str = "impl") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``impl`` is one of ``NORM_IMPLS``."""
    if impl not in NORM_IMPLS:
        raise ValueError(f"{name}: expected one of {NORM_IMPLS}, got {impl!r}")


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps)`` in fp32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    gate: jax.Array | None = None,
    *,
    eps: float,
    out_dtype: jnp.dtype,
    impl: str = "xla",
) -> jax.Array:
    """``RMSNorm(x) * weight (* SiLU(gate))`` over the last axis, fp32 math, in ``out_dtype``.

    Args:
      x: ``[B, ..., D]`` (batch first: the kernels split it over devices); weight: ``[D]``;
      gate: ``[B, ..., D]`` like ``x`` or None.
      eps: added to the mean square; out_dtype: output dtype.
      impl: ``"xla"``, ``"pallas"`` or ``"auto"`` (module docstring).
    """
    check_norm_impl(impl)
    if impl == "pallas" or (impl == "auto" and jax.default_backend() == "gpu"):
        return rms_norm_kernels(x, weight, gate, eps, jnp.dtype(out_dtype), default_interpret())
    y = rms_normalize(x, eps) * weight.astype(jnp.float32)
    if gate is not None:
        y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def rms_norm_kernels(
    x: jax.Array,
    weight: jax.Array,
    gate: jax.Array | None,
    eps: float,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
    """``rms_norm`` by the Pallas kernels, forward and backward (per device under
    ``batch_parallel``)."""
    return _kernels_fwd(x, weight, gate, eps, out_dtype, interpret)[0]


def _kernels_fwd(x, weight, gate, eps, out_dtype, interpret):
    def run(x, gate, weight):
        return rms_norm_forward(x, weight, gate, eps=eps, out_dtype=out_dtype, interpret=interpret)

    y, r = sharded.per_device_rows(run, (x, gate), (weight,), 2, 0, "the RMSNorm's batch")
    return y, (x, weight, gate, r)


def _kernels_bwd(eps, out_dtype, interpret, residuals, dy):
    x, weight, gate, r = residuals

    def run(x, gate, r, dy, weight):
        return rms_norm_backward(x, weight, gate, r, dy, interpret=interpret)

    dx, dgate, dweight = sharded.per_device_rows(
        run, (x, gate, r, dy), (weight,), 2, 1, "the RMSNorm's batch"
    )
    return dx, dweight.astype(weight.dtype), dgate


rms_norm_kernels.defvjp(_kernels_fwd, _kernels_bwd)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis (``w`` init 1, no bias).

    Args:
      dim: size of the normalised (last) axis.
      eps: added inside the square root.
      dtype: output dtype; the computation is fp32.
      impl: ``"xla"``, ``"pallas"`` or ``"auto"`` (module docstring).
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        check_norm_impl(impl)
        self.eps = eps
        self.dtype = dtype
        self.impl = impl
        self.weight = make_param(rngs, ones, (dim,), VECTOR, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, ..., dim] -> [B, ..., dim]`` in ``dtype``."""
        return rms_norm(x, self.weight[...], eps=self.eps, out_dtype=self.dtype, impl=self.impl)


class GatedRMSNorm(RMSNorm):
    """``y = RMSNorm(x) * w * SiLU(gate)`` (FLA's FusedRMSNormGated with swish), fp32 math."""

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:  # type: ignore[override]
        """``x, gate [B, ..., dim] -> [B, ..., dim]`` in ``dtype``."""
        return rms_norm(
            x, self.weight[...], gate, eps=self.eps, out_dtype=self.dtype, impl=self.impl
        )
