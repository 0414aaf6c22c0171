"""Backward stage 4: per interleaved chunk, the WY transform's adjoint (dk, dv, dbeta complete).

Chunk-parallel over interleaved chunks (mirror: ``chunked_backward.wy_backward`` and
``gate_grad``). For chunk ``c`` (64 sub-step rows) of one (batch, head), with ``dW`` and
``dkp = dk_out + dk_st`` from the state adjoint (stage 3), ``G, seg`` the within-chunk gate cumsum
and segment index, ``gam, E = pair decay`` as in ``prepare.py``::

    X_w     = diag(beta gam) K ;  X_u = diag(beta) V
    dA      = dW X_w^T + dV_new X_u^T ; dX_w = A^T dW ; dX_u = A^T dV_new
    dM      = StrictLower(-A^T dA A^T) ;  D = dM * E ;  M = StrictLower(diag(beta) K K^T * E)
    dk      = dkp + beta gam dX_w + beta (D K) + (diag(beta) D)^T K
    dv      = beta dX_u
    dbeta   = gam rowsum(dX_w * K) + rowsum(dX_u * V) + rowsum(D * K K^T)
    dG      = rowsum(dM * M) - colsum(dM * M) + rowsum(dX_w * X_w) + dG_st

computed as: ``P = dW K^T``, ``Q = dV_new V^T`` (64 x 64), ``dA = P diag(beta gam) + Q diag(beta)``,
``rowsum(dX_w * K) = colsum(A * P)``, ``rowsum(dX_u * V) = colsum(A * Q)``; ``dX_w`` is never
formed: ``dk = dkp + (A diag(beta gam))^T dW + (diag(beta) D)^T K + diag(beta) D K`` is one
accumulation at the end. No ``[64, Kp|Vp]`` fp32 value lives across the kernel.

``dk`` and ``dv`` are complete here (written in the input dtype); ``dG`` is the gradient w.r.t.
the interleaved local gate cumsum (the reverse cumsum to ``dg`` happens outside, in JAX).

Grid ``(NI / chunks, H, B)`` (``chunks`` consecutive chunks per program, walked in a loop;
1 by default: ``BackwardConfig.wy_chunks``); no ``[Kp, Vp]`` state tile (those products are in
stage 3), and the ``[64, Kp|Vp]`` operands are read in column tiles of ``block``
(``BackwardConfig.wy_block``: 128,
whole tiles up to K, V = 128, the fastest at 4 warps on an H100 since the WY products and ``dW``,
``dkp`` are 16-bit; 64 keeps every live value at most ``[64, 64]`` fp32; wide heads use 32).
Reads ``A [B, H, L, 64]`` fp32, ``k [B, L, H, Kp]``, ``v [B, L, H, Vp]``,
``beta [B, L, H]``, ``dW [B, H, L, Kp]`` fp32, ``dv_new [B, H, L, Vp]``, ``dkp [B, L, H, Kp]``
fp32 and, with decay, the interleaved log-gate and ``dG_st`` (``[B, H, L]`` fp32).
Writes ``dk [B, L, H, Kp]``, ``dv [B, L, H, Vp]`` (input dtype), ``dbeta [B, L, H]`` fp32 and,
with decay, ``dG [B, H, L]`` fp32. Products with 16-bit inputs: ``K K^T`` with 16-bit operands,
every product with an fp32 operand (``dW``, ``A``, ``dA``, ``D``) in TF32, one product each
(``dV_new V^T`` too, exact in TF32, so that it shares ``dW K^T``'s MMA layout); ``dots="split"``
multiplies the fp32 operand as two 16-bit halves instead (no more accurate end to end in the
bf16 interpret-mode checks, where the other roundings dominate, and slower on the H100: Triton
gives each product its own accumulator); ``dots="input"`` rounds ``A``, ``dA`` and ``D`` to the
input dtype and makes every product a 16-bit one (as FLA's backward does). IEEE fp32 for fp32
inputs.

``wy_backward_fused`` is the previous single kernel that also did stage 3's products per
interleaved chunk (``BackwardConfig(wy_fused=True)``; it needs every chunk-start state in one
array ``h_il [B, H, NI, Kp, Vp]``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    CHUNK,
    DotMode,
    mm,
    pallas_call,
    segment_cumsum,
    state_gate_terms,
    state_inner,
)


class ChunkDecay(NamedTuple):
    """The decays of one interleaved chunk (``[64]`` fp32 vectors, ``pair`` ``[64, 64]``)."""

    pair: jax.Array  # E_ij = exp(G_i - G_j) within a segment, masked strictly lower
    gam: jax.Array | None  # decay from the chunk start (None without a gate)
    fdec: jax.Array | None  # decay to the chunk end (None without a gate)
    coef: jax.Array  # beta gam


def chunk_decay(gate: jax.Array | None, beta: jax.Array, lower: jax.Array) -> ChunkDecay:
    """The decays of one interleaved chunk from its log-gate ``[64]`` fp32 (``-inf`` = reset;
    None: no decay) and ``beta`` ``[64]`` fp32; ``lower`` is the strictly lower mask."""
    if gate is None:
        return ChunkDecay(jnp.where(lower, 1.0, 0.0), None, None, beta)
    g_cum, seg, g_end, seg_end = segment_cumsum(gate)
    visible = lower & (seg[:, None] == seg[None, :])
    diff = jnp.where(visible, g_cum[:, None] - g_cum[None, :], 0.0)
    pair = jnp.where(visible, jnp.exp(diff), 0.0)
    gam = jnp.where(seg == 0.0, jnp.exp(g_cum), 0.0)
    fdec = jnp.where(seg == seg_end, jnp.exp(g_end - g_cum), 0.0)
    return ChunkDecay(pair, gam, fdec, beta * gam)


def inverse_adjoint(
    a: jax.Array,
    r: jax.Array,
    p: jax.Array | None,
    kk: jax.Array,
    beta: jax.Array,
    gam: jax.Array | None,
    pair: jax.Array,
    lower: jax.Array,
    *,
    mode: dict,
    dots: dict,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The WY adjoint's ``[64, 64]`` part for one interleaved chunk: through ``A = (I + M)^-1``
    and ``M = StrictLower(diag(beta) K K^T * E)``.

    Args:
      a: ``A`` ``[64, 64]`` (fp32, or the 16-bit input dtype with ``dots="input"``);
      r: ``Q = dV_new V^T`` plus, without a gate, ``P = dW K^T`` ``[64, 64]`` fp32;
      p: ``P`` with a gate (its columns scaled by ``gam`` here), None without;
      kk: ``K K^T`` ``[64, 64]`` fp32; beta, gam: ``[64]`` fp32 (gam None without a gate);
      pair: ``E`` masked strictly lower; lower: the strictly lower mask.

    Returns:
      ``bd = diag(beta) D`` ``[64, 64]`` fp32 (``dk += bd K + bd^T K``), ``dbeta`` ``[64]`` and
      the gate terms ``rowsum(dM * M) - colsum(dM * M) + rowsum(dX_w * X_w)`` ``[64]`` (None
      without a gate).
    """
    af = a.astype(jnp.float32)
    if p is not None:
        r = r + p * gam[None, :]
    dbeta = jnp.sum(af * r, axis=0)  # rowsum(dX_w * K) gam + rowsum(dX_u * V)
    at_da = mm(a, r * beta[None, :], mode["tf"], trans_a=True, **dots)
    d_m = jnp.where(lower, -mm(at_da, a, mode["tf"], trans_b=True, **dots), 0.0)
    d_kk = d_m * pair
    dbeta = dbeta + jnp.sum(d_kk * kk, axis=1)
    d_g = None
    if p is not None:
        p_pair = d_m * (beta[:, None] * kk * pair)
        wk = jnp.sum(af * p, axis=0)
        d_g = jnp.sum(p_pair, axis=1) - jnp.sum(p_pair, axis=0) + wk * beta * gam
    return beta[:, None] * d_kk, dbeta, d_g


def _kernel(*refs, decay: bool, block: int, chunks: int, mode: dict, dots: dict):
    """The WY adjoint of ``chunks`` consecutive interleaved chunks (the blocks hold
    ``chunks * 64`` rows): one chunk as is, several in a ``lax.fori_loop`` (Triton then copies
    the next chunk's tiles ahead, as in the state passes)."""
    if chunks == 1:
        _chunk(refs, pl.ds(0, CHUNK), decay=decay, block=block, mode=mode, dots=dots)
        return

    def step(i, carry):
        rows = pl.ds(pl.multiple_of(i * CHUNK, CHUNK), CHUNK)
        _chunk(refs, rows, decay=decay, block=block, mode=mode, dots=dots)
        return carry

    lax.fori_loop(0, chunks, step, 0)


def _chunk(refs, r: pl.Slice, *, decay: bool, block: int, mode: dict, dots: dict):
    """One interleaved chunk: the rows ``r`` of every block."""
    a_ref, k_ref, v_ref, beta_ref, dw_ref, dvnew_ref, dkp_ref = refs[:7]
    rest = list(refs[7:])
    gate_ref, dgst_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)
    dk_ref, dv_ref, dbeta_ref = rest[:3]
    dg_ref = rest[3] if decay else None

    rows = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0)
    cols = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1)
    lower = rows > cols
    a = a_ref[r, :]
    if mode["tf"] is DotMode.INPUT:  # dots="input": A held in 16 bits
        a = a.astype(dots["dtype"])
    beta = beta_ref[r].astype(jnp.float32)
    pair, gam, _, coef = chunk_decay(gate_ref[r] if decay else None, beta, lower)
    k_tiles = [pl.ds(j * block, block) for j in range(k_ref.shape[-1] // block)]
    v_tiles = [pl.ds(j * block, block) for j in range(v_ref.shape[-1] // block)]

    # 64 x 64 products first: P = dW K^T, Q = dV_new V^T give dA = (P diag(gam) + Q) diag(beta)
    # and dbeta = colsum(A * (P diag(gam) + Q)) (rowsum(dX_w * K) = colsum(A * P), rowsum(dX_u
    # * V) = colsum(A * Q)), so dX_w is never formed and dk is assembled tile by tile at the end;
    # all [64, .] values are [64, block]. P and Q share one MMA layout (A is needed in registers
    # in one layout only) and, without decay, one accumulator R = P + Q (q_plus).
    q_plus = p = None
    for cols_v in v_tiles:
        dvnew = dvnew_ref[r, cols_v]
        # exact operands; in P's precision mode so that P and Q share an MMA layout
        term = mm(dvnew, v_ref[r, cols_v], mode["fx_exact"], trans_b=True, **dots)
        q_plus = term if q_plus is None else q_plus + term
        dx_u = mm(a, dvnew, mode["fx"], trans_a=True, **dots)  # [64, block]
        dv_ref[r, cols_v] = (beta[:, None] * dx_u).astype(dv_ref.dtype)
    for cols_k in k_tiles:
        term = mm(dw_ref[r, cols_k], k_ref[r, cols_k], mode["p"], trans_b=True, **dots)
        if decay:
            p = term if p is None else p + term
        else:
            q_plus = q_plus + term
    kk = None
    for cols_k in k_tiles:
        k = k_ref[r, cols_k]
        term = mm(k, k, mode["in"], trans_b=True, **dots)
        kk = term if kk is None else kk + term
    bd, dbeta, d_g = inverse_adjoint(a, q_plus, p, kk, beta, gam, pair, lower, mode=mode, dots=dots)
    dbeta_ref[r] = dbeta
    if decay:
        dg_ref[r] = d_g + dgst_ref[r]
    # dk = dkp + diag(beta gam) A^T dW + diag(beta) D K + (diag(beta) D)^T K, per K tile
    for cols_k in k_tiles:
        k = k_ref[r, cols_k]
        dk = dkp_ref[r, cols_k].astype(jnp.float32) + coef[:, None] * mm(
            a, dw_ref[r, cols_k], mode["tf"], trans_a=True, **dots
        )
        dk = dk + mm(bd, k, mode["fx"], **dots)
        dk = dk + mm(bd, k, mode["fx"], trans_a=True, **dots)
        dk_ref[r, cols_k] = dk.astype(dk_ref.dtype)


def wy_modes(dtype, dots: str = "tf32", low_grads: bool = False) -> dict:
    """Dot modes: ``in`` 16-bit operands, ``tf`` TF32, ``split_a`` (fused kernel) the fp32
    operand split into 16-bit halves; ``fx`` / ``fx_exact``: the slim kernel's products with an
    fp32 operand / with exact 16-bit operands, TF32 (one product) or, with ``dots="split"``,
    split halves (two products: more accurate, but each product its own accumulator); ``p``:
    that of ``P = dW K^T`` (``fx``; with ``low_grads``, ``dW`` stored in the input dtype, ``P``
    and ``Q = dV_new V^T`` are plain 16-bit products). ``dots="input"`` makes every product of
    the slim kernel a 16-bit one (``A``, ``dA``, ``D`` rounded to the input dtype)."""
    if dtype == jnp.float32:
        return dict.fromkeys(("in", "tf", "split_a", "fx", "fx_exact", "p"), DotMode.IEEE)
    if dots == "input":
        return dict.fromkeys(("in", "tf", "split_a", "fx", "fx_exact", "p"), DotMode.INPUT)
    split = dots == "split"
    fx, fx_exact = (DotMode.SPLIT_A, DotMode.INPUT) if split else (DotMode.TF32, DotMode.TF32)
    p = fx
    if low_grads:
        p = fx_exact = DotMode.INPUT
    return {
        "in": DotMode.INPUT,
        "tf": DotMode.TF32,
        "split_a": DotMode.SPLIT_A,
        "fx": fx,
        "fx_exact": fx_exact,
        "p": p,
    }


def wy_backward(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    dw: jax.Array,
    dvnew: jax.Array,
    dkp: jax.Array,
    gate_sub: jax.Array | None,
    dg_st: jax.Array | None,
    *,
    block: int = 64,
    dots: str = "tf32",
    chunks: int = 1,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Run backward stage 4.

    Args:
      a: ``[B, H, L, 64]`` fp32; k: ``[B, L, H, Kp]``; v: ``[B, L, H, Vp]``; beta: ``[B, L, H]``;
        dw: ``[B, H, L, Kp]`` and dkp: ``[B, L, H, Kp]`` (stage 3; fp32, or the input dtype
        with ``BackwardConfig.grad_dtype = "input"``: ``P = dW K^T`` then in 16 bits);
        dvnew: ``[B, H, L, Vp]`` (reverse state pass); gate_sub: ``[B, H, L]`` fp32 interleaved
        log-gate or None; dg_st: ``[B, H, L]`` fp32 gate terms of stage 3 (None without gate).
      block: column tile of the ``[64, Kp|Vp]`` operands (power of two; at most ``Kp``, ``Vp``).
      dots: operands of the products with an fp32 value: ``"tf32"``, ``"split"`` (two 16-bit
        products each) or ``"input"`` (16-bit, the input dtype).
      chunks: interleaved chunks per program, walked in a loop so that Triton copies the next
        chunk's tiles during the current one (``num_stages`` > 1 then pipelines them); lowered
        to the largest power of two that divides the chunk count.

    Returns:
      ``dk [B, L, H, Kp]``, ``dv [B, L, H, Vp]`` (k.dtype), ``dbeta [B, L, H]`` fp32 and
      ``dG [B, H, L]`` fp32 (None without decay).
    """
    B, L, H, Kp = k.shape
    Vp = v.shape[-1]
    NI = L // CHUNK
    dtype = k.dtype
    decay = gate_sub is not None
    if chunks < 1:
        raise ValueError(f"wy_backward: chunks must be at least 1, got {chunks}")
    chunks = math.gcd(1 << (chunks.bit_length() - 1), NI)  # a power of two dividing NI
    span = chunks * CHUNK  # rows per program

    rows = lambda d: pl.BlockSpec((None, span, None, d), lambda c, hh, b: (b, c, hh, 0))
    head_rows = lambda d: pl.BlockSpec((None, None, span, d), lambda c, hh, b: (b, hh, c, 0))
    vec = pl.BlockSpec((None, None, span), lambda c, hh, b: (b, hh, c))
    beta_spec = pl.BlockSpec((None, span, None), lambda c, hh, b: (b, c, hh))
    inputs = [a, k, v, beta, dw, dvnew, dkp]
    in_specs = [
        head_rows(CHUNK),
        rows(Kp),
        rows(Vp),
        beta_spec,
        head_rows(Kp),
        head_rows(Vp),
        rows(Kp),
    ]
    if decay:
        inputs += [gate_sub, dg_st]
        in_specs += [vec, vec]
    out_shapes = [
        jax.ShapeDtypeStruct((B, L, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, L, H, Vp), dtype),
        jax.ShapeDtypeStruct((B, L, H), jnp.float32),
    ]
    out_specs = [rows(Kp), rows(Vp), beta_spec]
    if decay:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, L), jnp.float32))
        out_specs.append(vec)
    kernel = functools.partial(
        _kernel,
        decay=decay,
        block=min(block, Kp, Vp),
        chunks=chunks,
        mode=wy_modes(dtype, dots, low_grads=dw.dtype != jnp.float32),
        dots=dict(dtype=dtype, interpret=interpret),
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NI // chunks, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_wy",
        poison=poison,
    )
    return outs[0], outs[1], outs[2], (outs[3] if decay else None)


def _fused_kernel(*refs, decay: bool, mode: dict, dots: dict):
    a_ref, k_ref, v_ref, beta_ref, s_ref, ds_ref, vnew_ref, dvnew_ref, dkout_ref = refs[:9]
    rest = list(refs[9:])
    gate_ref = rest.pop(0) if decay else None
    dk_ref, dv_ref, dbeta_ref = rest[:3]
    dg_ref = rest[3] if decay else None

    c = CHUNK
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lower = rows > cols
    a = a_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    beta = beta_ref[...].astype(jnp.float32)
    dvnew = dvnew_ref[...]
    pair, gam, fdec, coef = chunk_decay(gate_ref[...] if decay else None, beta, lower)

    # ordered so that each [64, Kp|Vp] fp32 value dies early (register pressure)
    kf = k.astype(jnp.float32)
    x_w = coef[:, None] * kf
    d_w = -mm(dvnew, s_ref[...], mode["in"], trans_b=True, **dots)  # [64, Kp]
    d_a = mm(d_w, x_w, mode["tf"], trans_b=True, **dots)
    dx_w = mm(a, d_w, mode["tf"], trans_a=True, **dots)  # [64, Kp]
    dk = dkout_ref[...].astype(jnp.float32) + coef[:, None] * dx_w
    wk = jnp.sum(dx_w * kf, axis=1)
    dbeta = wk * gam if decay else wk
    if decay:
        p_start = wk * coef
    vf = v.astype(jnp.float32)
    d_a = d_a + mm(dvnew, beta[:, None] * vf, mode["tf"], trans_b=True, **dots)
    dx_u = mm(a, dvnew, mode["tf"], trans_a=True, **dots)  # [64, Vp]
    dv_ref[...] = (beta[:, None] * dx_u).astype(dv_ref.dtype)
    dbeta = dbeta + jnp.sum(dx_u * vf, axis=1)

    # the state update's adjoint: dk_st = fdec (V_new dE^T), p_end, p_carry
    dk_st = mm(vnew_ref[...], ds_ref[...], mode["in"], trans_b=True, **dots)
    if decay:
        dk_st = dk_st * fdec[:, None]
        p_end = jnp.sum(dk_st * kf, axis=1)
        s_ds = state_inner(s_ref[...], ds_ref[...])
    dk = dk + dk_st

    # through A = (I + M)^-1 and M = StrictLower(diag(beta) K K^T * E)
    at_da = mm(a, d_a, mode["tf"], trans_a=True, **dots)
    d_m = jnp.where(lower, -mm(at_da, a, mode["tf"], trans_b=True, **dots), 0.0)
    d_kk = d_m * pair
    kk = mm(k, k, mode["in"], trans_b=True, **dots)
    dk = dk + beta[:, None] * mm(d_kk, k, mode["split_a"], **dots)
    dk = dk + mm(beta[:, None] * d_kk, k, mode["split_a"], trans_a=True, **dots)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dbeta_ref[...] = dbeta + jnp.sum(d_kk * kk, axis=1)
    if decay:
        p_pair = d_m * (beta[:, None] * kk * pair)
        d_g = jnp.sum(p_pair, axis=1) - jnp.sum(p_pair, axis=0) + p_start
        dg_ref[...] = d_g + state_gate_terms(p_end, s_ds, gam)


def wy_backward_fused(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    h_il: jax.Array,
    dh_il: jax.Array,
    vnew: jax.Array,
    dvnew: jax.Array,
    dk_out: jax.Array,
    gate_sub: jax.Array | None,
    *,
    num_warps: int = 8,
    num_stages: int = 1,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The state update's and the WY transform's adjoints in one kernel (the previous stage 4,
    kept for comparison: ``BackwardConfig(wy_fused=True)``).

    Args:
      a: ``[B, H, L, 64]`` fp32; k: ``[B, L, H, Kp]``; v: ``[B, L, H, Vp]``; beta: ``[B, L, H]``;
        h_il, dh_il: ``[B, H, NI, Kp, Vp]`` chunk-start states and chunk-end state gradients;
        vnew, dvnew: ``[B, H, L, Vp]``; dk_out: ``[B, L, H, Kp]`` fp32 (stage 3);
        gate_sub: ``[B, H, L]`` fp32 interleaved log-gate or None.

    Returns:
      ``dk [B, L, H, Kp]``, ``dv [B, L, H, Vp]`` (k.dtype), ``dbeta [B, L, H]`` fp32 and
      ``dG [B, H, L]`` fp32 (None without decay).
    """
    B, L, H, Kp = k.shape
    Vp = v.shape[-1]
    NI = L // CHUNK
    dtype = k.dtype
    decay = gate_sub is not None

    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, hh, b: (b, c, hh, 0))
    head_rows = lambda d: pl.BlockSpec((None, None, CHUNK, d), lambda c, hh, b: (b, hh, c, 0))
    state = pl.BlockSpec((None, None, None, Kp, Vp), lambda c, hh, b: (b, hh, c, 0, 0))
    vec = pl.BlockSpec((None, None, CHUNK), lambda c, hh, b: (b, hh, c))
    beta_spec = pl.BlockSpec((None, CHUNK, None), lambda c, hh, b: (b, c, hh))
    inputs = [a, k, v, beta, h_il, dh_il, vnew, dvnew, dk_out]
    in_specs = [
        head_rows(CHUNK),
        rows(Kp),
        rows(Vp),
        beta_spec,
        state,
        state,
        head_rows(Vp),
        head_rows(Vp),
        rows(Kp),
    ]
    if decay:
        inputs.append(gate_sub)
        in_specs.append(vec)
    out_shapes = [
        jax.ShapeDtypeStruct((B, L, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, L, H, Vp), dtype),
        jax.ShapeDtypeStruct((B, L, H), jnp.float32),
    ]
    out_specs = [rows(Kp), rows(Vp), beta_spec]
    if decay:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, L), jnp.float32))
        out_specs.append(vec)
    kernel = functools.partial(
        _fused_kernel,
        decay=decay,
        mode=wy_modes(dtype),
        dots=dict(dtype=dtype, interpret=interpret),
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NI, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_wy_fused",
        poison=poison,
    )
    return outs[0], outs[1], outs[2], (outs[3] if decay else None)
