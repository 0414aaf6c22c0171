"""Row-wise L2 normalisation used by the op (FLA convention: eps inside the square root)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """Return ``x / sqrt(sum(x**2, -1) + eps)`` computed in fp32, cast back to ``x.dtype``.

    Args:
      x: ``[..., D]`` float array. An all-zero row maps to zero.
    """
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def l2norm_groups(x: jax.Array, group: int, eps: float = L2NORM_EPS) -> jax.Array:
    """``l2norm`` of each run of ``group`` channels of ``x [..., C]`` (``C % group == 0``; the
    heads of a ``[..., H * d]`` projection) -> ``[..., C]`` in ``x.dtype``."""
    return l2norm(x.reshape(*x.shape[:-1], -1, group), eps).reshape(x.shape)
