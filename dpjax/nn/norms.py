"""RMSNorm and gated RMSNorm (``RMSNorm(x) * w * SiLU(gate)``), computed in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import ones
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import VECTOR


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps)`` in fp32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis (``w`` init 1, no bias).

    Args:
      dim: size of the normalised (last) axis.
      eps: added inside the square root.
      dtype: output dtype; the computation is fp32.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        self.weight = make_param(rngs, ones, (dim,), VECTOR, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., dim] -> [..., dim]`` in ``dtype``."""
        y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GatedRMSNorm(RMSNorm):
    """``y = RMSNorm(x) * w * SiLU(gate)`` (FLA's FusedRMSNormGated with swish), fp32 math."""

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:  # type: ignore[override]
        """``x, gate [..., dim] -> [..., dim]`` in ``dtype``."""
        y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return (y * jax.nn.silu(gate.astype(jnp.float32))).astype(self.dtype)
