"""Chunk-parallel (WY/UT) DeltaProduct in plain JAX, with a hand-written backward.

The dedicated DeltaProduct form of SPEC §2.7: chunks of 64 on the interleaved sub-step axis
(``L = T * n_h``) for the WY transform and the state scan, chunks of 64 on the token axis for the
output; states are kept only at token-chunk starts. Any backend, any float dtype (computed in fp32,
or fp64 for float64 inputs). Stages live in ``chunked_forward`` and ``chunked_backward``.

Memory per head: ``O(T*n_h*(K+V+64) + (T/64)*K*V)`` in forward and backward (never a state per
token); the backward (``jax.custom_vjp``) saves the inputs, ``A = (I+M)^-1`` and the gate cumsums,
and recomputes the rest.

Padding: ``T`` is padded to a multiple of 64 tokens with zero q/k/v/beta, gate 0 and no document
start, which leaves the state unchanged; outputs are sliced back. Document starts are masks, never
``-inf`` gates; conversely a gate with ``exp(g) == 0`` is handled as a document start.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dpjax.ops.chunked_backward import Residuals, backward
from dpjax.ops.chunked_forward import (
    CHUNK,
    chunk_decay,
    gate_cumsums,
    output,
    prepare,
    segments,
    state_pass,
)


def supports(*, shape: object = None, dtype: object = None) -> str | None:
    """The chunked implementation accepts every validated call."""
    del shape, dtype
    return None


def _primal(q, k, v, beta, g, h0, resets, n: int, scale: float, *, remat: bool = False):
    """Forward stages on chunk-layout inputs (see ``Residuals`` for shapes).

    Returns ``(o [B, H, NT, C, V], final [B, H, K, V], Residuals)``.
    """
    G_il, G_tok = gate_cumsums(g, n)
    seg_il, seg_tok = segments(resets, n)
    decay_il = chunk_decay(G_il, seg_il)
    a, w, u = prepare(k, v, beta, decay_il)
    h, v_new, final = state_pass(k, w, u, decay_il, h0, n, remat=remat)
    o = output(q, k, v_new, h, chunk_decay(G_tok, seg_tok), scale, n)
    return o, final, Residuals(q, k, v, beta, G_il, G_tok, resets, a, h0)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked(q, k, v, beta, g, h0, resets, n: int, scale: float):
    o, final, _ = _primal(q, k, v, beta, g, h0, resets, n, scale)
    return o, final


def _chunked_fwd(q, k, v, beta, g, h0, resets, n: int, scale: float):
    o, final, res = _primal(q, k, v, beta, g, h0, resets, n, scale)
    return (o, final), res


def _chunked_bwd(n: int, scale: float, res: Residuals, cotangents):
    do, dht = cotangents
    grads = backward(res, do, dht, n=n, scale=scale)
    return (*grads, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _autodiff(q, k, v, beta, g, h0, resets, n: int, scale: float):
    """The same forward differentiated by JAX (scan body checkpointed): a test oracle for the
    hand-written backward, with the same memory order."""
    o, final, _ = _primal(q, k, v, beta, g, h0, resets, n, scale, remat=True)
    return o, final


def compute_dtype(*xs: jax.Array | None) -> jnp.dtype:
    """fp32, or fp64 when an input is fp64 (and x64 is enabled)."""
    dtype = jnp.dtype(jnp.float32)
    for x in xs:
        if x is not None:
            dtype = jnp.promote_types(dtype, x.dtype)
    return dtype


def to_chunks(x: jax.Array, pad: int, n_chunks: int, dtype) -> jax.Array:
    """``[B, L, H, *D]`` -> zero-pad ``pad`` rows -> ``[B, H, n_chunks, C, *D]`` in ``dtype``."""
    x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[0], x.shape[1], n_chunks, -1, *x.shape[3:])


def from_chunks(x: jax.Array, length: int) -> jax.Array:
    """``[B, H, N, C, D]`` -> ``[B, length, H, D]`` (drops padding)."""
    B, H, N, C, D = x.shape
    return jnp.moveaxis(x.reshape(B, H, N * C, D), 1, 2)[:, :length]


def dead_gates_as_resets(
    g: jax.Array | None, resets: jax.Array | None, shape: tuple[int, int, int], dtype
) -> tuple[jax.Array, jax.Array]:
    """Gate ``[B, T, H]`` and per-head resets ``[B, T, H]`` bool for the chunked stages.

    A gate with ``exp(g) == 0`` (e.g. ``-inf`` or ``-1e4``) zeroes the state exactly like a
    document start, so it becomes one (with gate 0). This keeps huge gates out of the local
    cumsums, where they would cancel catastrophically in ``G_r - G_s``; the gradient of such a
    gate is 0, as in the recurrence (``d exp(g) / dg = 0``).
    """
    resets = jnp.zeros(shape[:2], bool) if resets is None else jnp.asarray(resets, bool)
    resets = jnp.broadcast_to(resets[:, :, None], shape)
    if g is None:
        return jnp.zeros(shape, dtype), resets
    g = g.astype(dtype)
    dead = jax.lax.stop_gradient(jnp.exp(g)) == 0
    return jnp.where(dead, jnp.zeros((), dtype), g), resets | dead


def _run(core, q, k, v, beta, g, h0, resets, n: int, scale: float):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q, k, v, beta, g, h0)
    NT = -(-T // CHUNK)
    pad = NT * CHUNK - T
    g, resets = dead_gates_as_resets(g, resets, (B, T, H), dtype)
    h0 = jnp.zeros((B, H, K, V), dtype) if h0 is None else h0.astype(dtype)
    o, final = core(
        to_chunks(q, pad, NT, dtype),
        to_chunks(k, pad * n, NT * n, dtype),
        to_chunks(v, pad * n, NT * n, dtype),
        to_chunks(beta, pad * n, NT * n, dtype),
        to_chunks(g, pad, NT, dtype),
        h0,
        to_chunks(resets, pad, NT, bool),
        n,
        scale,
    )
    return from_chunks(o, T).astype(q.dtype), final


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
    """Chunked forward on validated inputs (see ``dpjax.ops`` for the public API).

    Args:
      q: ``[B, T, H, K]``; k: ``[B, T*n_h, H, K]``; v: ``[B, T*n_h, H, V]``;
        beta: ``[B, T*n_h, H]``; g: ``[B, T, H]`` log gate or None; h0: ``[B, H, K, V]`` or None;
        resets: ``[B, T]`` bool or None (True where a document starts: state zeroed before the
        token's gate).

    Returns:
      ``o [B, T, H, V]`` in ``q.dtype`` and the final state ``[B, H, K, V]`` (fp32; fp64 for
      float64 inputs). Differentiable w.r.t. q, k, v, beta, g, h0 (hand-written backward).
    """
    return _run(_chunked, q, k, v, beta, g, h0, resets, num_householder, float(scale))


def forward_autodiff(
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
    """``forward`` differentiated by JAX autodiff instead of the hand-written backward (testing)."""
    return _run(_autodiff, q, k, v, beta, g, h0, resets, num_householder, float(scale))
