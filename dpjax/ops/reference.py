"""Token-by-token reference of (gated) DeltaProduct: a ``lax.scan`` with an fp32 state.

This is the exact recurrence of SPEC §1.4 and the oracle every faster implementation is tested
against. Per token ``t`` (and per batch row / head)::

    if resets[t]: S <- 0                      # a document starts at t
    if gated:     S <- exp(g_t) * S           # once per token, before the first sub-step
    for j in range(n_h):                      # n_h generalised Householder steps
        S <- S + beta_{t,j} k_{t,j} (v_{t,j} - S^T k_{t,j})^T
    o_t = S^T (scale * q_t)

Memory: reverse-mode autodiff through the scan keeps one ``K x V`` state per token; use the
chunked implementation for long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def token_step(
    state: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """One token of the recurrence on fp32 values.

    Args:
      state: ``[N, H, K, V]`` fp32.
      q: ``[N, H, K]``; k: ``[N, n_h, H, K]``; v: ``[N, n_h, H, V]``; beta: ``[N, n_h, H]``;
        g: ``[N, H]`` log-space gate or None. All fp32.
      scale: query scale.

    Returns:
      ``(new_state [N, H, K, V], o [N, H, V])``, both fp32.
    """
    if g is not None:
        state = state * jnp.exp(g)[:, :, None, None]
    for j in range(k.shape[1]):
        kj = k[:, j]
        pred = jnp.einsum("nhk,nhkv->nhv", kj, state, precision=_HI)
        delta = beta[:, j, :, None] * (v[:, j] - pred)
        state = state + kj[..., :, None] * delta[..., None, :]
    o = jnp.einsum("nhk,nhkv->nhv", q * scale, state, precision=_HI)
    return state, o


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    h0: jax.Array | None,
    resets: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Reference forward on validated inputs (see ``dpjax.ops`` for the public API).

    Args:
      q: ``[B, T, H, K]``; k: ``[B, T*n_h, H, K]``; v: ``[B, T*n_h, H, V]``;
        beta: ``[B, T*n_h, H]``; g: ``[B, T, H]`` or None; h0: ``[B, H, K, V]`` fp32 or None;
        resets: ``[B, T]`` bool or None (True where a new document starts).

    Returns:
      ``o [B, T, H, V]`` in ``q.dtype`` and the final state ``[B, H, K, V]`` fp32.
    """
    B, T, H, K = q.shape
    n = num_householder
    V = v.shape[-1]
    f32 = jnp.promote_types(q.dtype, jnp.float32)  # fp32, or fp64 for float64 checks
    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = {
        "q": time_major(q.astype(f32)),
        "k": time_major(k.astype(f32).reshape(B, T, n, H, K)),
        "v": time_major(v.astype(f32).reshape(B, T, n, H, V)),
        "beta": time_major(beta.astype(f32).reshape(B, T, n, H)),
    }
    if g is not None:
        xs["g"] = time_major(g.astype(f32))
    if resets is not None:
        xs["reset"] = time_major(resets)
    state0 = jnp.zeros((B, H, K, V), f32) if h0 is None else h0.astype(f32)

    def step(state, x):
        if "reset" in x:
            state = jnp.where(x["reset"][:, None, None, None], 0.0, state)
        return token_step(state, x["q"], x["k"], x["v"], x["beta"], x.get("g"), scale)

    final, o = jax.lax.scan(step, state0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final


def supports(**_: object) -> str | None:
    """The reference accepts every validated call."""
    return None
