"""Backward stages 1 + 3 merged: the output's and the state update's adjoints per token chunk.

``backward_output`` and ``backward_state_adjoint`` side by side read the same token chunk twice
(its start state ``h[J]``, ``K``, ``V_new``) and pass the output's ``dk`` between them through
HBM (``[L, Kp]`` written and read back). One program per token chunk ``J`` (64 tokens ``s``, its
``n`` interleaved chunks ``c = J*n + i`` of 64 rows ``r`` each) does both, so each is read once
and ``dk`` stays in registers::

    dq     = gam * (dO h[J]^T)                                   [64, Kp] fp32
    p_tok  = gam * rowsum((dO h[J]^T) * Q)                       (the token gate terms)
    for i in 0..n-1 (contiguous interleaved chunk c; row r is token t(r) = (64 i + r) / n):
        Ds     = (dO V_new_c^T) * Gam[s, t(r)]                   [64 s, 64 r]
        dq    += Ds K_c
        dk_c   = scale Ds^T Q + fdec * (V_new_c dE_c^T)          output + state update (dkp)
        dW_c   = -dV_new_c S_c^T                                 (S_c: start state of c)
        P      = (Q K_c^T) * Ds   -> p_tok += rowsum(P); colsum(P) summed onto tokens t(r)
        dG_st_c = -p_end ; dG_st_c[63] += sum(p_end) + gam_end <S_c, dE_c>
    dq *= scale ;  dG_tok = scale (p_tok - colsum_tok)

with ``p_end = rowsum(fdec (V_new_c dE_c^T) * K_c)``. The outputs are those of the two kernels
(``dq``; ``dkp``, ``dW``, ``dG_st`` as ``state_adjoint``; ``dG_tok`` as ``output_backward``);
``dk_out`` is never formed on its own. The start states ``S_c`` of the sub-chunks ``i > 0``
are either read (``h_mid``, stored by the forward) or, with ``h_mid=None``, never formed: their
``dW_c`` and ``<S_c, dE_c>`` come from ``h[J]`` and the token chunk's earlier sub-chunks
(``_earlier_chunk_terms``: ``[64, 64]`` products with the ``K``, ``V_new`` the program reads
anyway), so the forward need not store ``h_mid`` (``(n - 1)/n`` of its states) and this kernel
need not read it back. The rows of chunk ``c`` are taken in the contiguous order of the
interleaved sequence (not the output adjoint's strided sub-step slices), with each column's
token decay picked by ``token_decay(col_token=...)``, as the reverse pass's fused ``dv_out``
does.

Grid ``(NT, H, B)``; whole head dims per program: padded ``K, V <= 128`` only (``MAX_DIM``;
wider heads run the two kernels, ``BackwardConfig.merged_adjoint``). Reads ``q [B, T, H, Kp]``,
``do [B, T, H, Vp]``, ``h [B, H, NT, Kp, Vp]``, ``h_mid [B, H, NT*(n-1), Kp, Vp]`` (if given),
``dh_il [B, H, NI, Kp, Vp]``, ``k [B, L, H, Kp]``, ``v_new, dv_new [B, H, L, Vp]`` and, with
decay, the token log-gate ``[B, H, T]`` and ``gam, fdec [B, H, L]`` fp32. Products as in the two
kernels: 16-bit operands where both are stored 16-bit, the fp32 ``Ds`` split into two 16-bit
halves; IEEE fp32 for fp32 inputs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backward_recompute import onto_tokens, row_tokens, token_decay
from pallas_kernels.common import (
    CHUNK,
    element_select,
    mm,
    pallas_call,
    score_modes,
    state_gate_terms,
    state_inner,
)

MAX_DIM = 128  # padded K and V one program holds whole


def _earlier_chunk_terms(i, dvnew, d_state, h, k_ref, vnew_ref, gam_ref, fdec_ref, mode, dots):
    """``(dW_i, <S_i, dE_i>)`` of sub-chunk ``i > 0`` from the token chunk's start state ``h``
    and its earlier sub-chunks ``j < i`` (``<S_i, dE_i>`` is None without decay), without
    ``S_i`` itself: with ``S_i = Gam_i h + sum_j g_ji K_j^T diag(fdec_j) V_new_j``,

        dW_i       = -Gam_i dV_new_i h^T - sum_j ((dV_new_i V_new_j^T) * g_ji fdec_j) K_j
        <S_i, dE_i> = Gam_i <h, dE_i> + sum_j g_ji sum(fdec_j * rowsum((V_new_j dE_i^T) * K_j))

    (``Gam_i``, ``g_ji``: products of the chunk-end decays ``gam_end_l`` for ``l < i`` and for
    ``j < l < i``; 1 without decay). ``[64, 64]`` intermediates only: no ``[Kp, Vp]`` value."""
    decay = gam_ref is not None
    ends = [element_select(gam_ref[j], CHUNK - 1) for j in range(i)] if decay else None
    dw = mm(dvnew, h, mode["in"], trans_b=True, **dots)
    s_ds = None
    if decay:
        gam_start = math.prod(ends)  # Gam_i
        dw = dw * gam_start
        s_ds = gam_start * state_inner(h, d_state)
    for j in range(i):
        k, vnew = k_ref[j], vnew_ref[j]
        pair = mm(dvnew, vnew, mode["in"], trans_b=True, **dots)  # [r_i, r_j]
        if decay:
            weight = fdec_ref[j] * math.prod(ends[j + 1 :])
            pair = pair * weight[None, :]
            reads = mm(vnew, d_state, mode["in"], trans_b=True, **dots)  # [r_j, Kp]
            s_ds = s_ds + jnp.sum(weight * jnp.sum(reads * k.astype(jnp.float32), axis=1))
        dw = dw + mm(pair, k, mode["split_a"], **dots)
    return -dw, s_ds


def _kernel(
    *refs, n: int, scale: float, decay: bool, mode: dict, dots: dict, stored_mid: bool, loop: bool
):
    rest = list(refs)
    q_ref, do_ref, h_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    hmid_ref = rest.pop(0) if n > 1 and stored_mid else None
    dh_ref, k_ref, vnew_ref, dvnew_ref = (rest.pop(0) for _ in range(4))
    gate_ref, gam_ref, fdec_ref = (rest.pop(0) for _ in range(3)) if decay else (None,) * 3
    dq_ref, dkp_ref, dw_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    dgtok_ref, dgst_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)

    gate = gate_ref[...] if decay else None
    _, gam_tok = token_decay(gate)
    q, do = q_ref[...], do_ref[...]
    h = h_ref[...]
    dq = mm(do, h, mode["in"], trans_b=True, **dots)  # [64, Kp]
    if decay:
        dq = dq * gam_tok[:, None]
        p_tok = jnp.sum(dq * q.astype(jnp.float32), axis=1)
        col_tok = jnp.zeros((CHUNK,), jnp.float32)

    def sub_chunk(i, carry, state=None):
        """Sub-chunk ``i`` (static, or traced in the loop over stored states): its outputs, and
        the token sums ``carry = (dq,)`` (``+ (p_tok, col_tok)`` with decay) updated, in an
        order that keeps at most two ``[64, Kp]`` fp32 values live at once."""
        dq = carry[0]
        t_row = row_tokens(i, n)  # [., r]: the token of row r
        k, vnew, dvnew = k_ref[i], vnew_ref[i], dvnew_ref[i]
        d_state = dh_ref[i]
        if state is None and not stored_mid:
            dw, s_ds = _earlier_chunk_terms(
                i, dvnew, d_state, h, k_ref, vnew_ref, gam_ref, fdec_ref, mode, dots
            )
        else:
            state = hmid_ref[i - 1] if state is None else state
            dw = -mm(dvnew, state, mode["in"], trans_b=True, **dots)
            if decay:
                s_ds = state_inner(state, d_state)
        dw_ref[i] = dw.astype(dw_ref.dtype)
        dk = mm(vnew, d_state, mode["in"], trans_b=True, **dots)  # the state update's dk
        if decay:
            dk = dk * fdec_ref[i][:, None]
            p_end = jnp.sum(dk * k.astype(jnp.float32), axis=1)
            dgst_ref[i] = state_gate_terms(p_end, s_ds, gam_ref[i])
        weight, _ = token_decay(gate, col_token=t_row)  # Gam[s, t(r)]
        d_scores = mm(do, vnew, mode["in"], trans_b=True, **dots) * weight  # [s, r]
        dk = dk + scale * mm(d_scores, q, mode["split_a"], trans_a=True, **dots)  # [r, Kp]
        dkp_ref[i] = dk.astype(dkp_ref.dtype)
        dq = dq + mm(d_scores, k, mode["split_a"], **dots)
        if not decay:
            return (dq,)
        _, p_tok, col_tok = carry
        pair = mm(q, k, mode["in"], trans_b=True, **dots) * d_scores  # [s, r]
        return dq, p_tok + jnp.sum(pair, axis=1), col_tok + onto_tokens(jnp.sum(pair, 0), t_row)

    carry = sub_chunk(0, (dq, p_tok, col_tok) if decay else (dq,), state=h)
    if loop and stored_mid and n > 2:
        carry = lax.fori_loop(1, n, sub_chunk, carry)
    else:
        for i in range(1, n):
            carry = sub_chunk(i, carry)
    dq, *token_sums = carry
    dq_ref[...] = (scale * dq).astype(dq_ref.dtype)
    if decay:
        p_tok, col_tok = token_sums
        dgtok_ref[...] = scale * (p_tok - col_tok)


class TokenChunkBlocks:
    """Block specs of a grid ``(NT, H, B)`` over token chunks, each with its ``n`` interleaved
    chunks of 64 rows (shared by this kernel and ``backward_chunk_grads``)."""

    def __init__(self, n: int):
        self.n = n
        self.token_vec = pl.BlockSpec((None, None, CHUNK), lambda t, hh, b: (b, hh, t))
        self.chunk_vec = pl.BlockSpec((None, None, n, CHUNK), lambda t, hh, b: (b, hh, t, 0))
        self.seq_vec = pl.BlockSpec((None, n, CHUNK, None), lambda t, hh, b: (b, t, 0, hh))

    def token_rows(self, d: int) -> pl.BlockSpec:
        """The token chunk's rows of a ``[B, T, H, d]`` array."""
        return pl.BlockSpec((None, CHUNK, None, d), lambda t, hh, b: (b, t, hh, 0))

    def head_chunks(self, d: int) -> pl.BlockSpec:
        """Its ``n`` chunks ``[n, 64, d]`` of a ``[B, H, NI, 64, d]`` array."""
        return pl.BlockSpec((None, None, self.n, CHUNK, d), lambda t, hh, b: (b, hh, t, 0, 0))

    def seq_chunks(self, d: int) -> pl.BlockSpec:
        """Its ``n`` chunks ``[n, 64, d]`` of a ``[B, NI, 64, H, d]`` array."""
        return pl.BlockSpec((None, self.n, CHUNK, None, d), lambda t, hh, b: (b, t, 0, hh, 0))

    def states(self, count: int | None, Kp: int, Vp: int) -> pl.BlockSpec:
        """``count`` consecutive states ``[count, Kp, Vp]`` of a ``[B, H, NT*count, Kp, Vp]``
        array (None: one state ``[Kp, Vp]``, the token chunk's start state of ``h``)."""
        return pl.BlockSpec((None, None, count, Kp, Vp), lambda t, hh, b: (b, hh, t, 0, 0))

    def state_operands(self, q, do, h, h_mid, dh_il, k, vnew, dvnew) -> tuple[list, list]:
        """The inputs and their specs that both token-chunk kernels read first: ``q, do``
        (token rows), ``h`` (start state), ``h_mid`` (unless None), ``dh_il``, ``k``, ``vnew``,
        ``dvnew`` (the chunks), in that order."""
        B, L, H, Kp = k.shape
        Vp = do.shape[-1]
        NI = L // CHUNK
        inputs = [q, do, h] + ([h_mid] if h_mid is not None else [])
        inputs += [
            dh_il,
            k.reshape(B, NI, CHUNK, H, Kp),
            vnew.reshape(B, H, NI, CHUNK, Vp),
            dvnew.reshape(B, H, NI, CHUNK, Vp),
        ]
        specs = [self.token_rows(Kp), self.token_rows(Vp), self.states(None, Kp, Vp)]
        specs += [self.states(self.n - 1, Kp, Vp)] if h_mid is not None else []
        specs += [self.states(self.n, Kp, Vp), self.seq_chunks(Kp)]
        specs += [self.head_chunks(Vp), self.head_chunks(Vp)]
        return inputs, specs


def chunk_adjoint(
    q: jax.Array,
    do: jax.Array,
    h: jax.Array,
    h_mid: jax.Array | None,
    dh_il: jax.Array,
    k: jax.Array,
    vnew: jax.Array,
    dvnew: jax.Array,
    gate_tok: jax.Array | None,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    num_warps: int = 4,
    num_stages: int = 1,
    loop: bool = False,
    out_dtype=jnp.float32,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Run backward stages 1 + 3 (without ``dv_out``) in one kernel.

    Args:
      q: ``[B, T, H, Kp]``; do: ``[B, T, H, Vp]``; h: ``[B, H, NT, Kp, Vp]`` token-chunk start
        states; h_mid: ``[B, H, NT*(n-1), Kp, Vp]`` the other interleaved chunk-start states,
        or None (n == 1, or their terms formed from ``h``, ``k``, ``vnew`` instead);
        dh_il: ``[B, H, NI, Kp, Vp]`` chunk-end state gradients;
        k: ``[B, L, H, Kp]``; vnew, dvnew: ``[B, H, L, Vp]``; gate_tok: ``[B, H, T]`` fp32 token
        log-gate, gam, fdec: ``[B, H, L]`` fp32 interleaved decay vectors (all three None: no
        decay). Padded ``Kp, Vp <= 128``.
      loop: with ``h_mid`` and n > 2, walk the sub-chunks ``i >= 1`` in a loop
        (``lax.fori_loop``) instead of unrolled (``BackwardConfig.merged_loop``).
      out_dtype: dtype of ``dkp`` and ``dW`` (``BackwardConfig.grad_dtype``).

    Returns:
      ``dq [B, T, H, Kp]`` (q.dtype), ``dkp [B, L, H, Kp]`` and ``dW [B, H, L, Kp]``
      (``out_dtype``), ``dG_tok [B, H, T]`` and ``dG_st [B, H, L]`` fp32 (None without decay).
    """
    B, T, H, Kp = q.shape
    Vp = do.shape[-1]
    n = num_householder
    L = T * n
    NT, NI = T // CHUNK, L // CHUNK
    if max(Kp, Vp) > MAX_DIM:
        raise ValueError(
            f"chunk_adjoint holds whole heads: padded K, V <= {MAX_DIM}, got Kp={Kp}, Vp={Vp}"
        )
    decay = gate_tok is not None
    dtype = q.dtype
    blocks = TokenChunkBlocks(n)
    inputs, in_specs = blocks.state_operands(q, do, h, h_mid, dh_il, k, vnew, dvnew)
    if decay:
        inputs += [gate_tok, gam.reshape(B, H, NI, CHUNK), fdec.reshape(B, H, NI, CHUNK)]
        in_specs += [blocks.token_vec, blocks.chunk_vec, blocks.chunk_vec]
    out_shapes = [
        jax.ShapeDtypeStruct((B, T, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, NI, CHUNK, H, Kp), out_dtype),
        jax.ShapeDtypeStruct((B, H, NI, CHUNK, Kp), out_dtype),
    ]
    out_specs = [blocks.token_rows(Kp), blocks.seq_chunks(Kp), blocks.head_chunks(Kp)]
    if decay:
        out_shapes += [
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
            jax.ShapeDtypeStruct((B, H, NI, CHUNK), jnp.float32),
        ]
        out_specs += [blocks.token_vec, blocks.chunk_vec]
    modes = score_modes(dtype)
    kernel = functools.partial(
        _kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        mode=modes,
        dots=dict(dtype=dtype, interpret=interpret),
        stored_mid=h_mid is not None,
        loop=loop,
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NT, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_chunk_adjoint",
        poison=poison,
    )
    dq, dkp, dw = outs[0], outs[1].reshape(B, L, H, Kp), outs[2].reshape(B, H, L, Kp)
    if not decay:
        return dq, dkp, dw, None, None
    return dq, dkp, dw, outs[3], outs[4].reshape(B, H, L)
