"""Effective rank of the recurrent state over positions (SPEC §6.2, Roy & Vetterli).

``erank(S) = exp(-sum_i p_i log p_i)`` with ``p = sigma / sum(sigma)`` over the singular values of
the ``K x V`` state that exceed machine epsilon (relative to the largest). The recurrence is
replayed in fp32 from the layer's own (q, k, v, beta, g), exactly as the op computes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpjax.ops.l2norm import l2norm
from dpjax.ops.reference import token_step


def effective_rank(state: jax.Array) -> jax.Array:
    """``[..., K, V]`` -> ``[...]`` fp32 effective rank (0 for an all-zero state)."""
    s = jnp.linalg.svd(state.astype(jnp.float32), compute_uv=False)
    s = jnp.where(s > jnp.finfo(jnp.float32).eps * jnp.max(s, axis=-1, keepdims=True), s, 0.0)
    p = s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(jnp.sum(s, axis=-1) > 0, jnp.exp(entropy), 0.0)


def state_rank_trace(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    num_householder: int,
    every: int = 1,
    normalize_keys: bool = True,
) -> jax.Array:
    """Effective rank of the state after every ``every``-th token.

    Args:
      k: ``[B, T*n_h, H, K]``; v: ``[B, T*n_h, H, V]``; beta: ``[B, T*n_h, H]``;
        g: ``[B, T, H]`` log-space gate or None.
      num_householder: ``n_h``.
      every: record every ``every``-th token (SVDs are the cost).
      normalize_keys: L2-normalise k first, as the layer does.

    Returns:
      ``[B, ceil(T / every), H]`` fp32 effective ranks (positions ``every-1, 2*every-1, ...``).
    """
    B, L, H, K = k.shape
    n = num_householder
    T = L // n
    V = v.shape[-1]
    f32 = jnp.float32
    if normalize_keys:
        k = l2norm(k)
    tm = lambda x: jnp.moveaxis(x, 1, 0)
    xs = {
        "k": tm(k.astype(f32).reshape(B, T, n, H, K)),
        "v": tm(v.astype(f32).reshape(B, T, n, H, V)),
        "beta": tm(beta.astype(f32).reshape(B, T, n, H)),
    }
    if g is not None:
        xs["g"] = tm(g.astype(f32))
    zeros_q = jnp.zeros((B, H, K), f32)

    def step(carry, x):
        state, t = carry
        state, _ = token_step(state, zeros_q, x["k"], x["v"], x["beta"], x.get("g"), 1.0)
        rank = jax.lax.cond(
            (t + 1) % every == 0,
            lambda s: effective_rank(s),
            lambda s: jnp.zeros((B, H), f32),
            state,
        )
        return (state, t + 1), rank

    _, ranks = jax.lax.scan(step, (jnp.zeros((B, H, K, V), f32), 0), xs)
    ranks = jnp.moveaxis(ranks, 0, 1)  # [B, T, H]
    return ranks[:, every - 1 :: every]
