"""Backward stage 1: recompute ``v_new`` and the interleaved chunk-start states; ``dv_out``.

Chunk-parallel over token chunks (mirror: ``chunked_backward.recompute`` and the ``dv_new`` part
of ``chunked_backward.output_backward``). For token chunk ``J`` (interleaved sub-chunks
``c = J*n + i``, ``i < n``) of one (batch, head, value tile), starting from the saved state
``h[J]`` (input dtype, written by the forward)::

    S = h[J]                                                     [Kp, BV] fp32
    for i in 0..n-1:
        h_mid[J, i-1] = S                                        (only when i > 0)
        v_new_c = A_c diag(beta_c) (V_c - diag(gam_c) K_c S)     [64, BV]  (forward's formula)
        S      <- gam_end_c S + K_c^T (fdec_c * v_new_c)
    for j in 0..n-1:                                             (output's adjoint, V part)
        dv_out_j = scale ((Q K_j^T) * Gam)^T dO                  [64, BV]

``K_j`` / ``dv_out_j`` are the strided slices (rows ``t*n + j``) of the token chunk, ``Gam`` the
token-level causal decay matrix (as in ``output.py``). Nothing here is sequential beyond the
``n`` sub-chunks of one token chunk. This stage runs only when the forward did not keep ``v_new``
and ``h_mid`` (``Residuals`` without ``save_states``); otherwise ``dv_out`` alone comes from
``dv_out`` here (same grid, no state) or from the output adjoint.

Grid ``(Vp / BV, NT, H, B)``. Reads ``A [B, H, L, 64]`` fp32, ``k [B, L, H, Kp]`` (contiguous and
strided views), ``v [B, L, H, Vp]``, ``beta [B, L, H]``, ``h [B, H, NT, Kp, Vp]``,
``q [B, T, H, Kp]``, ``do [B, T, H, Vp]`` and, with decay, ``gam, fdec [B, H, L]`` fp32 and the
token log-gate ``[B, H, T]`` fp32. Writes ``v_new [B, H, L, Vp]``,
``h_mid [B, H, NT*(n-1), Kp, Vp]`` (``n > 1``; the start states of the interleaved chunks that do
not start a token chunk, as ``state_pass`` with ``mid_states``) and ``dv_out [B, H, L, Vp]``, all
in the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    CHUNK,
    DotMode,
    element_select,
    mm,
    pallas_call,
    score_modes,
    segment_cumsum,
)


def row_tokens(sub_chunk, n: int) -> jax.Array:
    """``[64, 64]`` int32: in every row, the token (within its 64-token chunk) of each column
    ``r``, a row of interleaved sub-chunk ``sub_chunk`` (0..n-1, static or traced) of that token
    chunk, ``(64 sub_chunk + r) / n``: the ``col_token`` of ``token_decay``."""
    rows_of_chunk = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1)
    return lax.div(sub_chunk * CHUNK + rows_of_chunk, n)


def onto_tokens(values: jax.Array, col_token: jax.Array) -> jax.Array:
    """``[64]`` per-token sums of per-row ``values`` ``[64]`` (rows ``r`` of an interleaved
    sub-chunk, each summed onto its token ``col_token[., r]``, as ``row_tokens`` gives)."""
    token_of = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0)  # [t, r]: token t
    return jnp.sum(jnp.where(token_of == col_token, values[None, :], 0.0), axis=1)


def token_decay(
    gate: jax.Array | None, col_token: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """``(Gam [64, 64], gam [64])`` of a token chunk from its log-gate (``None``: no decay, then
    ``Gam`` is the causal mask as fp32 and ``gam`` is None). ``Gam[s, t]`` is the decay from
    token ``t`` to token ``s`` (0 for ``t > s`` or across a reset); with ``col_token`` (``[64,
    64]`` int32, the token each column stands for, e.g. the rows of an interleaved chunk)
    column ``r`` is that of token ``col_token[:, r]`` instead of token ``r``."""
    c = CHUNK
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1) if col_token is None else col_token
    causal = rows >= cols
    if gate is None:
        return jnp.where(causal, 1.0, 0.0), None
    g_cum, seg, _, _ = segment_cumsum(gate)
    if col_token is None:
        g_col, seg_col = g_cum, seg
    else:  # one-hot column sums pick each column's token
        at_col = rows == col_token
        g_col = jnp.sum(jnp.where(at_col, g_cum[:, None], 0.0), axis=0)
        seg_col = jnp.sum(jnp.where(at_col, seg[:, None], 0.0), axis=0)
    visible = causal & (seg[:, None] == seg_col[None, :])
    diff = jnp.where(visible, g_cum[:, None] - g_col[None, :], 0.0)
    return jnp.where(visible, jnp.exp(diff), 0.0), jnp.where(seg == 0.0, jnp.exp(g_cum), 0.0)


def _kernel(*refs, n: int, scale: float, decay: bool, store_states: bool, mode: dict, dots: dict):
    a_ref, k_ref, ks_ref, v_ref, beta_ref, h_ref, q_ref, do_ref = refs[:8]
    rest = list(refs[8:])
    gam_ref, fdec_ref, gate_ref = (rest.pop(0), rest.pop(0), rest.pop(0)) if decay else (None,) * 3
    vnew_ref = rest.pop(0)
    hmid_ref = rest.pop(0) if store_states else None
    dvout_ref = rest.pop(0)

    state = h_ref[...].astype(jnp.float32)
    for i in range(n):
        rows = pl.ds(i * CHUNK, CHUNK)
        if store_states and i > 0:
            hmid_ref[i - 1] = state.astype(hmid_ref.dtype)
        k = k_ref[rows, :]
        ks = mm(k, state, mode["ks"], **dots)
        if decay:
            gam = gam_ref[rows]
            ks = ks * gam[:, None]
        x = beta_ref[rows].astype(jnp.float32)[:, None] * (v_ref[rows, :].astype(jnp.float32) - ks)
        vnew = mm(a_ref[rows, :], x, mode["ax"], **dots)
        vnew_ref[rows, :] = vnew.astype(vnew_ref.dtype)
        if i + 1 < n:
            if decay:
                vnew = vnew * fdec_ref[rows][:, None]
                state = state * element_select(gam, CHUNK - 1)
            state = state + mm(k, vnew, mode["kv"], trans_a=True, **dots)

    gam_mat, _ = token_decay(gate_ref[...] if decay else None)
    q = q_ref[...]
    do = do_ref[...]
    for j in range(n):
        scores = mm(q, ks_ref[:, j, :], mode["in"], trans_b=True, **dots) * (gam_mat * scale)
        dvout_ref[:, j, :] = mm(scores, do, mode["split_a"], trans_a=True, **dots).astype(
            dvout_ref.dtype
        )


def _dv_out_kernel(*refs, n: int, scale: float, decay: bool, mode: dict, dots: dict):
    ks_ref, q_ref, do_ref = refs[:3]
    gate_ref = refs[3] if decay else None
    dvout_ref = refs[-1]
    gam_mat, _ = token_decay(gate_ref[...] if decay else None)
    q = q_ref[...]
    do = do_ref[...]
    for j in range(n):
        scores = mm(q, ks_ref[:, j, :], mode["in"], trans_b=True, **dots) * (gam_mat * scale)
        dvout_ref[:, j, :] = mm(scores, do, mode["split_a"], trans_a=True, **dots).astype(
            dvout_ref.dtype
        )


def dv_out(
    k: jax.Array,
    q: jax.Array,
    do: jax.Array,
    gate_tok: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    block_v: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Only the ``dv_out`` part of this stage (when the forward saved ``v_new`` and the states,
    and the output adjoint does not compute ``dv_out`` itself).

    Args:
      k: ``[B, L, H, Kp]``; q: ``[B, T, H, Kp]``; do: ``[B, T, H, Vp]``; gate_tok: ``[B, H, T]``
        fp32 or None.

    Returns:
      ``dv_out [B, H, L, Vp]`` in k.dtype.
    """
    B, L, H, Kp = k.shape
    Vp = do.shape[-1]
    n = num_householder
    T = L // n
    NT = T // CHUNK
    bv = min(block_v, Vp)
    dtype = k.dtype
    decay = gate_tok is not None
    inputs = [k.reshape(B, T, n, H, Kp), q, do]
    in_specs = [
        pl.BlockSpec((None, CHUNK, n, None, Kp), lambda i, t, hh, b: (b, t, 0, hh, 0)),
        pl.BlockSpec((None, CHUNK, None, Kp), lambda i, t, hh, b: (b, t, hh, 0)),
        pl.BlockSpec((None, CHUNK, None, bv), lambda i, t, hh, b: (b, t, hh, i)),
    ]
    if decay:
        inputs.append(gate_tok)
        in_specs.append(pl.BlockSpec((None, None, CHUNK), lambda i, t, hh, b: (b, hh, t)))
    modes = score_modes(dtype)
    kernel = functools.partial(
        _dv_out_kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        mode=modes,
        dots=dict(dtype=dtype, interpret=interpret),
    )
    (out,) = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=[jax.ShapeDtypeStruct((B, H, T, n, Vp), dtype)],
        out_specs=[pl.BlockSpec((None, None, CHUNK, n, bv), lambda i, t, hh, b: (b, hh, t, 0, i))],
        grid=(Vp // bv, NT, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_dv_out",
        poison=poison,
    )
    return out.reshape(B, H, L, Vp)


def recompute(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    h: jax.Array,
    q: jax.Array,
    do: jax.Array,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    gate_tok: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    block_v: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    mid_states: bool = True,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Run backward stage 1 on padded inputs.

    Args:
      a: ``[B, H, L, 64]`` fp32; k: ``[B, L, H, Kp]``; v: ``[B, L, H, Vp]``; beta: ``[B, L, H]``;
        h: ``[B, H, NT, Kp, Vp]`` token-chunk start states; q: ``[B, T, H, Kp]``;
        do: ``[B, T, H, Vp]``; gam, fdec: ``[B, H, L]`` fp32 or None; gate_tok: ``[B, H, T]``
        fp32 (``-inf`` = reset) or None. ``L = n*T``, ``T % 64 == 0``.

      mid_states: whether to write ``h_mid`` (n > 1; for the backward kernels that read it,
        ``BackwardConfig.reads_mid_states``).

    Returns:
      ``(v_new [B, H, L, Vp], h_mid [B, H, NT*(n-1), Kp, Vp] or None when n == 1 or without
      mid_states, dv_out [B, H, L, Vp])`` in k.dtype.
    """
    B, L, H, Kp = k.shape
    Vp = v.shape[-1]
    n = num_householder
    T = L // n
    NT = T // CHUNK
    bv = min(block_v, Vp)
    dtype = k.dtype
    decay = gam is not None
    store_states = n > 1 and mid_states
    rows_il = n * CHUNK

    inputs = [a, k, k.reshape(B, T, n, H, Kp), v, beta, h, q, do]
    in_specs = [
        pl.BlockSpec((None, None, rows_il, CHUNK), lambda i, t, hh, b: (b, hh, t, 0)),
        pl.BlockSpec((None, rows_il, None, Kp), lambda i, t, hh, b: (b, t, hh, 0)),
        pl.BlockSpec((None, CHUNK, n, None, Kp), lambda i, t, hh, b: (b, t, 0, hh, 0)),
        pl.BlockSpec((None, rows_il, None, bv), lambda i, t, hh, b: (b, t, hh, i)),
        pl.BlockSpec((None, rows_il, None), lambda i, t, hh, b: (b, t, hh)),
        pl.BlockSpec((None, None, None, Kp, bv), lambda i, t, hh, b: (b, hh, t, 0, i)),
        pl.BlockSpec((None, CHUNK, None, Kp), lambda i, t, hh, b: (b, t, hh, 0)),
        pl.BlockSpec((None, CHUNK, None, bv), lambda i, t, hh, b: (b, t, hh, i)),
    ]
    if decay:
        vec = pl.BlockSpec((None, None, rows_il), lambda i, t, hh, b: (b, hh, t))
        inputs += [gam, fdec, gate_tok]
        in_specs += [vec, vec, pl.BlockSpec((None, None, CHUNK), lambda i, t, hh, b: (b, hh, t))]
    out_shapes = [jax.ShapeDtypeStruct((B, H, L, Vp), dtype)]
    out_specs = [pl.BlockSpec((None, None, rows_il, bv), lambda i, t, hh, b: (b, hh, t, i))]
    if store_states:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, NT * (n - 1), Kp, Vp), dtype))
        out_specs.append(
            pl.BlockSpec((None, None, n - 1, Kp, bv), lambda i, t, hh, b: (b, hh, t, 0, i))
        )
    out_shapes.append(jax.ShapeDtypeStruct((B, H, T, n, Vp), dtype))
    out_specs.append(pl.BlockSpec((None, None, CHUNK, n, bv), lambda i, t, hh, b: (b, hh, t, 0, i)))
    if dtype == jnp.float32:
        modes = dict.fromkeys(("ks", "ax", "kv", "in", "split_a"), DotMode.IEEE)
    else:
        modes = dict(
            ks=DotMode.INPUT,
            ax=DotMode.TF32,
            kv=DotMode.SPLIT_B,
            **{"in": DotMode.INPUT},
            split_a=DotMode.SPLIT_A,
        )
    kernel = functools.partial(
        _kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        store_states=store_states,
        mode=modes,
        dots=dict(dtype=dtype, interpret=interpret),
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(Vp // bv, NT, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_recompute",
        poison=poison,
    )
    vnew = outs[0]
    h_mid = outs[1] if store_states else None
    dv_out = outs[-1].reshape(B, H, L, Vp)
    return vnew, h_mid, dv_out
