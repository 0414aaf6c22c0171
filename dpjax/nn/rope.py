"""Rotary position embedding, non-interleaved ("rotate half", GPT-NeoX / FLA default)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotate ``x [..., T, H, d]`` by its integer ``positions [..., T]``.

    Pairs are ``(x[i], x[i + d/2])`` with frequency ``theta^(-2i/d)``; math in fp32, result in
    ``x.dtype``. ``d`` must be even.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"apply_rope: head dim must be even, got {d}")
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, d/2]
    cos = jnp.cos(angles)[..., None, :]  # broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
