"""Forward stages of the chunk-parallel DeltaProduct (SPEC §2.2–2.4, §2.7), one function each.

All arrays are in the chunk layout ``[B, H, N, C, ...]`` (``N`` chunks of ``C = 64`` rows) and in
the compute dtype (fp32, or fp64 for float64 inputs). Two chunkings of the same padded sequence
are used: *interleaved* chunks of 64 sub-steps (``NI = NT * n_h`` of them: k, v, beta, W, U,
v_new) and *token* chunks of 64 tokens (``NT``: q, o, chunk-start states ``h``). Token chunk
``J`` is exactly interleaved chunks ``J*n_h .. J*n_h + n_h - 1``.

Stages (they map one-to-one onto the Pallas kernels):

1. ``gate_cumsums`` / ``segments`` / ``chunk_decay``: local gate cumsums and document masks.
2. ``kkt`` → ``unit_lower_inverse`` → ``wy_apply``: ``M``, ``A = (I + M)^-1``, ``W``, ``U``.
3. ``state_pass``: the sequential scan, ``v_new = U - W S``, states kept at token-chunk starts.
4. ``output``: ``o`` per token chunk from ``h`` and the ``n_h`` strided key/v_new slices.

Documents (resets) are exact: inside a chunk every row carries a *segment* index (how many
document starts are at or before it in the chunk); factors that connect two rows, or a row to the
chunk start/end, are multiplied by the indicator that no document start lies between them. No
``-inf`` gates are ever formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

CHUNK = 64
_HI = jax.lax.Precision.HIGHEST


def einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum`` at full precision (no TF32 on GPU)."""
    return jnp.einsum(spec, *operands, precision=_HI)


class Decay(NamedTuple):
    """Gate and document factors of one chunk layout. ``G`` is the inclusive local gate cumsum,
    ``seg`` the local segment index, ``last`` the chunk's last row. Shapes ``[B, H, N, C(, C)]``.

    pair:       ``[r >= s, seg_r == seg_s] exp(G_r - G_s)`` (includes the diagonal, = 1).
    from_start: ``[seg_r == 0] exp(G_r)``: how the chunk-start state reaches row ``r``.
    to_end:     ``[seg_r == seg_last] exp(G_last - G_r)``: how row ``r``'s write reaches the end.
    carry:      ``[seg_last == 0] exp(G_last)``, ``[B, H, N]``: chunk-start state to chunk end.
    """

    pair: jax.Array
    from_start: jax.Array
    to_end: jax.Array
    carry: jax.Array


def interleave_first(x: jax.Array, n: int) -> jax.Array:
    """Token-level ``[..., T]`` -> interleaved ``[..., T*n]``: ``x_t`` at sub-step 0, zeros else."""
    out = jnp.zeros((*x.shape, n), x.dtype).at[..., 0].set(x)
    return out.reshape(*x.shape[:-1], x.shape[-1] * n)


def gate_cumsums(g: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Local inclusive gate cumsums on both chunkings.

    Args:
      g: ``[B, H, NT, C]`` token-level log gates (zeros when ungated), compute dtype.
      n: ``n_h``.

    Returns:
      ``(G_il [B, H, NT*n, C], G_tok [B, H, NT, C])``; the gate sits at sub-step 0 of its token.
    """
    B, H, NT, C = g.shape
    g_il = interleave_first(g.reshape(B, H, NT * C), n).reshape(B, H, NT * n, C)
    return jnp.cumsum(g_il, axis=-1), jnp.cumsum(g, axis=-1)


def segments(resets: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Local segment indices (inclusive cumsum of document starts inside each chunk).

    Args:
      resets: ``[B, H, NT, C]`` bool, True where the state is zeroed before that token (document
        starts, and gates whose ``exp`` is exactly 0).
      n: ``n_h``.

    Returns:
      ``(seg_il [B, H, NT*n, C], seg_tok [B, H, NT, C])`` int32; a token's reset is placed on
      its sub-step 0.
    """
    B, H, NT, C = resets.shape
    r = resets.astype(jnp.int32)
    r_il = interleave_first(r.reshape(B, H, NT * C), n).reshape(B, H, NT * n, C)
    return jnp.cumsum(r_il, axis=-1), jnp.cumsum(r, axis=-1)


def chunk_decay(G: jax.Array, seg: jax.Array) -> Decay:
    """Decay factors of every chunk from the gate cumsum ``G [B, H, N, C]`` and the segment index
    ``seg [B, H, N, C]`` (see ``Decay``). Exponents are masked before ``exp`` so that no ``inf``
    is formed (and gradients through this function stay finite)."""
    C = G.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), bool))
    same = seg[..., :, None] == seg[..., None, :]
    pair_mask = causal & same
    diff = jnp.where(pair_mask, G[..., :, None] - G[..., None, :], 0.0)
    pair = jnp.where(pair_mask, jnp.exp(diff), 0.0)
    zero = jnp.zeros((), G.dtype)
    from_start = jnp.where(seg == 0, jnp.exp(G), zero)
    in_tail = seg == seg[..., -1:]
    to_end = jnp.where(in_tail, jnp.exp(jnp.where(in_tail, G[..., -1:] - G, 0.0)), zero)
    carry = jnp.where(seg[..., -1] == 0, jnp.exp(G[..., -1]), zero)
    return Decay(pair, from_start, to_end, carry)


def strictly_lower(x: jax.Array) -> jax.Array:
    """Zero the diagonal and above of ``[..., C, C]``."""
    C = x.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), x, jnp.zeros((), x.dtype))


def kkt(k: jax.Array, beta: jax.Array, decay: Decay) -> jax.Array:
    """``M = StrictLower(diag(beta) K K^T ⊙ pair)``: ``[B, H, NI, C, C]`` from
    ``k [B, H, NI, C, K]`` and ``beta [B, H, NI, C]``."""
    kk = einsum("...ik,...jk->...ij", k, k)
    return strictly_lower(beta[..., :, None] * kk * decay.pair)


def unit_lower_inverse(m: jax.Array) -> jax.Array:
    """``A = (I + M)^-1`` for strictly lower ``M [..., C, C]`` (unit lower triangular result)."""
    C = m.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(C, dtype=m.dtype), m.shape)
    return jax.scipy.linalg.solve_triangular(eye + m, eye, lower=True, unit_diagonal=True)


def wy_inputs(
    k: jax.Array, v: jax.Array, beta: jax.Array, decay: Decay
) -> tuple[jax.Array, jax.Array]:
    """``X_w = diag(beta ⊙ from_start) K`` ``[.., C, K]``, ``X_u = diag(beta) V`` ``[.., C, V]``."""
    return (beta * decay.from_start)[..., None] * k, beta[..., None] * v


def wy_apply(
    a: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, decay: Decay
) -> tuple[jax.Array, jax.Array]:
    """``W = A X_w`` ``[B, H, NI, C, K]`` and ``U = A X_u`` ``[B, H, NI, C, V]``, so that a chunk
    starting from state ``S`` writes ``v_new = U - W S`` (the deltas actually written)."""
    x_w, x_u = wy_inputs(k, v, beta, decay)
    return einsum("...ij,...jk->...ik", a, x_w), einsum("...ij,...jv->...iv", a, x_u)


def prepare(
    k: jax.Array, v: jax.Array, beta: jax.Array, decay: Decay
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 1 (chunk-parallel over interleaved chunks): ``(A, W, U)``."""
    a = unit_lower_inverse(kkt(k, beta, decay))
    w, u = wy_apply(a, k, v, beta, decay)
    return a, w, u


def group_by_token_chunk(x: jax.Array, n: int) -> jax.Array:
    """``[B, H, NT*n, ...]`` interleaved chunks -> ``[NT, B, H, n, ...]`` (scan axis first)."""
    B, H, NI = x.shape[:3]
    return jnp.moveaxis(x.reshape(B, H, NI // n, n, *x.shape[3:]), 2, 0)


def ungroup(x: jax.Array) -> jax.Array:
    """Inverse of ``group_by_token_chunk``: ``[NT, B, H, n, ...]`` -> ``[B, H, NT*n, ...]``."""
    x = jnp.moveaxis(x, 0, 2)
    B, H, NT, n = x.shape[:4]
    return x.reshape(B, H, NT * n, *x.shape[4:])


def chunk_state_step(
    s: jax.Array, k: jax.Array, w: jax.Array, u: jax.Array, to_end: jax.Array, carry: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One interleaved chunk of the state recurrence.

    Args:
      s: ``[B, H, K, V]`` state at the chunk start; k, w: ``[B, H, C, K]``; u: ``[B, H, C, V]``;
        to_end: ``[B, H, C]``; carry: ``[B, H]``.

    Returns:
      ``(state at the chunk end [B, H, K, V], v_new [B, H, C, V])``.
    """
    v_new = u - einsum("bhck,bhkv->bhcv", w, s)
    s_end = carry[..., None, None] * s + einsum("bhck,bhcv->bhkv", k, to_end[..., None] * v_new)
    return s_end, v_new


def state_pass(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    decay: Decay,
    h0: jax.Array,
    n: int,
    *,
    remat: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 2 (sequential): scan over token chunks, ``n`` interleaved chunks per step.

    Args:
      k, w: ``[B, H, NI, C, K]``; u: ``[B, H, NI, C, V]``; decay: interleaved ``Decay``;
        h0: ``[B, H, K, V]``; n: ``n_h``; remat: checkpoint the scan body (for autodiff, so
        that only the per-token-chunk states are stored).

    Returns:
      ``h [B, H, NT, K, V]`` (state at the start of every token chunk), ``v_new [B, H, NI, C, V]``
      and the final state ``[B, H, K, V]``.
    """

    def body(s, x):
        h = s
        v_news = []
        for i in range(n):
            s, v_new = chunk_state_step(
                s,
                x["k"][:, :, i],
                x["w"][:, :, i],
                x["u"][:, :, i],
                x["te"][:, :, i],
                x["cy"][:, :, i],
            )
            v_news.append(v_new)
        return s, (h, jnp.stack(v_news, axis=2))

    xs = {"k": k, "w": w, "u": u, "te": decay.to_end, "cy": decay.carry}
    xs = {name: group_by_token_chunk(x, n) for name, x in xs.items()}
    final, (h, v_new) = jax.lax.scan(jax.checkpoint(body) if remat else body, h0, xs)
    return jnp.moveaxis(h, 0, 2), ungroup(v_new), final


def token_slices(x: jax.Array, n: int) -> jax.Array:
    """Interleaved ``[B, H, NT*n, C, D]`` -> ``[B, H, NT, C, n, D]``: ``[..., u, j, :]`` is sub-step
    ``j`` of token ``u`` of the token chunk (the strided slices of the output stage)."""
    B, H, NI, C, D = x.shape
    return x.reshape(B, H, NI // n, C, n, D)


def output(
    q: jax.Array,
    k: jax.Array,
    v_new: jax.Array,
    h: jax.Array,
    decay: Decay,
    scale: float,
    n: int,
) -> jax.Array:
    """Stage 3 (chunk-parallel over token chunks):
    ``O = s [diag(from_start) Q h + Σ_j ((Q K_j^T) ⊙ Γ) Vnew_j]``.

    Args:
      q: ``[B, H, NT, C, K]``; k: ``[B, H, NI, C, K]``; v_new: ``[B, H, NI, C, V]``;
        h: ``[B, H, NT, K, V]``; decay: token-level ``Decay`` (``pair`` is Γ, causal incl. the
        diagonal: a token sees all its own sub-steps).

    Returns:
      ``o [B, H, NT, C, V]`` in the compute dtype.
    """
    qs = q * scale
    k_j, v_j = token_slices(k, n), token_slices(v_new, n)
    o = einsum("bhnrk,bhnkv->bhnrv", decay.from_start[..., None] * qs, h)
    for j in range(n):
        scores = einsum("bhnrk,bhnuk->bhnru", qs, k_j[..., j, :]) * decay.pair
        o = o + einsum("bhnru,bhnuv->bhnrv", scores, v_j[..., j, :])
    return o
