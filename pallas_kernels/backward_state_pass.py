"""Backward stage 2: the reverse state pass (mirror: ``chunked_backward.state_pass_backward``).

Sequential over interleaved chunks, last to first, for one (batch, head, value tile). ``dE`` is
the gradient w.r.t. the state at the *end* of the current interleaved chunk ``c`` (starts as the
final-state cotangent ``dht``)::

    for c = NI-1 .. 0 (c = J*n + i, i = c mod n):
        dh_il[c] = dE                                             (stored for stage 4)
        dv_new_c = dv_out_c + fdec_c * (K_c dE)                   complete dv_new  [64, BV]
        y        = A_c^T dv_new_c                                 (= dX_u of the WY backward)
        dE      <- gam_end_c dE - K_c^T (beta_c gam_c * y)        (= gam_end dE - W_c^T dv_new)
        if i == 0: dE += scale (diag(gam_tok) Q_J)^T dO_J         (the output reads h[J])
    dh0 = dE

with ``dE [Kp, BV]`` fp32 in registers. ``W_c`` is never formed (``W^T x = K^T diag(beta gam)
A^T x``) unless the forward's 16-bit ``W`` is given (``BackwardConfig.state_stored_w``:
``W^T dv_new``, two dependent products per step). Without decay every gate factor is 1.

One loop step covers one interleaved chunk (``loop="sub"``, the default): the read term is
formed on every sub-chunk and kept on the first (``read_masked``, the default up to one wave of
programs: every load is then pipelined) or formed behind ``lax.cond`` (beyond one wave, where
the pass also compiles with at most 2 pipeline stages so that two programs share an SM:
``launch_plan``; and, by ``BackwardConfig.state_products``, from n_h = 3, with the cheaper
products below). ``loop="token"`` steps one token chunk at a time, its ``n_h`` sub-chunks
unrolled, ``Q_J``, ``dO_J`` loaded at its start and the read term added after sub-chunk 0.
``dv_out`` enters through a product with the identity (``common.through_product``) so that its
load is pipelined too (read on its own it was a synchronous load on the chain). With
``dv_out=None`` (``BackwardConfig.state_fused_dv_out``) the pass forms each chunk's ``dv_out``
itself from the token chunk's ``Q``, ``dO`` it reads for the read term and the chunk's keys
(as stage 1's ``dv_out`` kernel: ``scale ((Q_J K_c^T) * Gam[s, token(r)])^T dO_J``, kept in
fp32), off the dependent chain.

Grid ``(Vp / BV, H, B)`` (as the forward state pass). Reads the whole sequence of one head:
``A [L, 64]`` fp32, ``K [L, Kp]``, ``beta [L]`` (fp32 rows of a ``[B, H, L]`` copy: a pipelined
load), ``dv_out [L, BV]``, ``Q [T, Kp]``,
``dO [T, BV]`` and, with decay, ``gam, fdec [L]`` and the token ``gam_tok [T]`` fp32, plus
``dht [Kp, BV]`` fp32. Writes ``dv_new [L, BV]`` and ``dh_il [NI, Kp, BV]`` (input dtype) and
``dh0 [Kp, BV]`` fp32.

Sequence split (``pieces > 1``; ``BackwardConfig.state_split``) as the forward's
``state_pass``: a transfer launch runs each piece from a zero end gradient (value tiles, with the
local ``dv_out`` and read terms) and from the identity (extra tiles without them), giving
``dE_start = M dE_end + E`` per piece; ``common.chain_pieces`` chains them from the last piece to
the first, and the second launch runs every piece from its true end gradient.

Products for 16-bit inputs as in the forward pass: ``K dE`` with ``dE`` rounded to the input
dtype, ``A^T dv_new`` in TF32, ``K^T x`` with ``x`` split into two 16-bit halves (``dots="split"``),
or in TF32 (``dots="tf32"``: one product instead of two on the chain), or, with
``dots="input"``, all three with 16-bit operands. The fused ``dv_out``'s ``scores^T dO`` takes the
fp32 scores as two 16-bit halves (``dv_out_dots="split"``) or rounded to the input dtype
(``"input"``: one product instead of two). fp32 inputs: IEEE.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backward_recompute import row_tokens, token_decay
from pallas_kernels.common import (
    AUTO_SPLIT,
    CHUNK,
    ONE_WAVE_PROGRAMS,
    DotMode,
    chain_pieces,
    element_select,
    identity_columns,
    mm,
    pallas_call,
    pipeline_stages,
    score_modes,
    state_chunk_bytes,
    state_loop_for,
    state_pass_pieces,
    through_product,
)

STATE_DOTS = ("split", "tf32", "input")  # the chain's products (state_pass_backward's dots)
DV_OUT_DOTS = ("split", "input")  # the fused dv_out's scores^T dO product


def _kernel(
    *refs,
    n: int,
    num_token_chunks: int,
    scale: float,
    decay: bool,
    pieces: int,
    transfer_tiles: int | None,
    read_masked: bool,
    loop: str,
    stored_w: bool,
    fused_dv_out: bool,
    mode: dict,
    dots: dict,
):
    rest = list(refs)
    a_ref, k_ref, beta_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    dvout_ref = None if fused_dv_out else rest.pop(0)
    q_ref, do_ref, dht_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    w_ref = a_ref if stored_w else None
    gam_ref, fdec_ref, gtok_ref = (rest.pop(0), rest.pop(0), rest.pop(0)) if decay else (None,) * 3
    glog_ref = rest.pop(0) if decay and fused_dv_out else None
    transfer = transfer_tiles is not None
    if transfer:
        (dh0_ref,) = rest
        dvnew_ref = dhil_ref = None
    else:
        dvnew_ref, dhil_ref, dh0_ref = rest

    kp, bv = dh0_ref.shape
    local = 1.0  # weight of the terms that do not depend on dE (dv_out, the output's read)
    if transfer:  # value tiles from zero; identity tiles (tile >= transfer_tiles) from I
        tile = pl.program_id(0)
        d_start = identity_columns(kp, bv, (tile - transfer_tiles) * bv)
        local = (tile < transfer_tiles).astype(jnp.float32)
    else:
        d_start = dht_ref[...].astype(jnp.float32)
    tokens_per_piece = num_token_chunks // pieces
    last_token = tokens_per_piece - 1
    if pieces > 1:
        last_token = last_token + lax.rem(pl.program_id(2), pieces) * tokens_per_piece

    def output_dv(c, k, reads):  # dv_out of chunk c from its token chunk's Q, dO (stage 1's)
        q, do = reads
        gate = None
        if decay:
            gate = glog_ref[pl.ds(pl.multiple_of(lax.div(c, n) * CHUNK, CHUNK), CHUNK)]
        weight, _ = token_decay(gate, col_token=row_tokens(lax.rem(c, n), n))  # Gam[s, t(r)]
        scores = mm(q, k, mode["in"], trans_b=True, **dots) * (weight * scale)  # [s, r]
        return mm(scores, do, mode["dvo"], trans_a=True, **dots)

    def sub_chunk(c, d_state, reads=None):  # interleaved chunk c: dE at its end -> at its start
        if dhil_ref is not None:
            dhil_ref[c] = d_state.astype(dhil_ref.dtype)
        rows = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        k = k_ref[rows, :]
        k_ds = mm(k, d_state, mode["ks"], **dots)  # [64, BV]
        coef = beta_ref[rows]
        if decay:
            gam = gam_ref[rows]
            k_ds = k_ds * fdec_ref[rows][:, None]
            coef = coef * gam
            d_state = d_state * element_select(gam, CHUNK - 1)
        if fused_dv_out:
            dv_out = output_dv(c, k, reads)
        else:
            dv_out = through_product(dvout_ref[rows, :], mode["in"], **dots)  # a pipelined load
        dvnew = (dv_out * local if transfer else dv_out) + k_ds
        if dvnew_ref is not None:
            dvnew_ref[rows, :] = dvnew.astype(dvnew_ref.dtype)
        if stored_w:  # W^T dv_new: one product on the chain instead of two
            return d_state - mm(w_ref[rows, :], dvnew, mode["kv"], trans_a=True, **dots)
        y = mm(a_ref[rows, :], dvnew, mode["ax"], trans_a=True, **dots)
        return d_state - mm(k, coef[:, None] * y, mode["kv"], trans_a=True, **dots)

    def token_reads(token_chunk):  # (Q_J, dO_J) as stored
        tok = pl.ds(pl.multiple_of(token_chunk * CHUNK, CHUNK), CHUNK)
        return q_ref[tok, :], do_ref[tok, :]

    def read_term(token_chunk, reads):  # the output reads h[J]: scale (diag(gam_tok) Q_J)^T dO_J
        q, do = reads
        if decay:
            tok = pl.ds(pl.multiple_of(token_chunk * CHUNK, CHUNK), CHUNK)
            q = q.astype(jnp.float32) * gtok_ref[tok][:, None]
        return (scale * local) * mm(q, do, mode["in"], trans_a=True, **dots)

    if loop == "token":  # one step per token chunk, the read term added without a branch

        def token_step(step, d_state):
            j = last_token - step
            reads = token_reads(j)  # loaded first, used last
            for i in reversed(range(n)):
                d_state = sub_chunk(j * n + i, d_state, reads)
            return d_state + read_term(j, reads)

        dh0_ref[...] = lax.fori_loop(0, tokens_per_piece, token_step, d_start)
        return

    last = (last_token + 1) * n - 1

    def sub_step(step, d_state):  # one step per interleaved chunk; the read term on i == 0
        c = last - step
        j = lax.div(c, n)
        reads = token_reads(j) if fused_dv_out else None  # else loaded for the read term only
        d_state = sub_chunk(c, d_state, reads)
        with_read = lambda x: x + read_term(j, reads if reads is not None else token_reads(j))
        if n == 1:
            return with_read(d_state)
        first = lax.rem(c, n) == 0
        if read_masked:  # loads and product every sub-chunk (no branch), kept on the first
            return jnp.where(first, with_read(d_state), d_state)
        return lax.cond(first, with_read, lambda x: x, d_state)

    dh0_ref[...] = lax.fori_loop(0, tokens_per_piece * n, sub_step, d_start)


def state_pass_backward(
    a: jax.Array,
    k: jax.Array,
    beta: jax.Array,
    dv_out: jax.Array | None,
    q: jax.Array,
    do: jax.Array,
    dht: jax.Array,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    gam_tok: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    split: int = AUTO_SPLIT,
    loop: str = "auto",
    read_masked: bool | None = None,
    dots: str = "split",
    dv_out_dots: str = "split",
    w: jax.Array | None = None,
    gate_tokens: jax.Array | None = None,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run backward stage 2.

    Args:
      a: ``[B, H, L, 64]`` fp32; k: ``[B, L, H, Kp]``; beta: ``[B, L, H]``;
        dv_out: ``[B, H, L, Vp]`` (stage 1), or None: the pass forms each chunk's ``dv_out``
        itself from its token chunk's ``Q``, ``dO`` (which it reads for the read term) and the
        chunk's keys, ``scale ((Q_J K_c^T) * Gam)^T dO_J`` in fp32, so that stage 1's kernel and
        its ``[L, Vp]`` round trip through memory are not needed (with decay it then needs
        ``gate_tokens``); q: ``[B, T, H, Kp]``; do: ``[B, T, H, Vp]``;
        dht: ``[B, H, Kp, Vp]`` fp32 final-state cotangent; gam, fdec: ``[B, H, L]`` fp32 or
        None; gam_tok: ``[B, H, T]`` fp32 decay of the token-chunk start state to each token
        (0 after a reset) or None.
      split: walk the sequence as up to this many pieces of whole token chunks in parallel (as
        the forward's ``state_pass``: a transfer launch gives each piece's map
        ``dE_start = M dE_end + E``, the pieces' end gradients follow in plain JAX, then every
        piece runs again from its own; ``common.split_pieces`` picks the count; ``AUTO_SPLIT``,
        the default: ``common.auto_split`` of the ``B * H * Vp / BV`` programs).
      num_stages: the pipeline depth, at most: lowered to what fits in shared memory
        (``common.pipeline_stages``) and, for the read term behind its branch beyond one wave of
        programs, to 2 (``launch_plan``).
      loop: ``"sub"``: one loop step per interleaved chunk; ``"token"``: one per token chunk,
        its ``n_h`` sub-chunks unrolled and the read term added after the first without a
        branch (its ``Q``, ``dO`` loads issued first; falls back to ``"sub"`` above ``n_h = 2``
        or where it would not pipeline, ``common.state_loop_for``); ``"auto"`` (the default):
        ``"sub"``.
      read_masked: with ``loop="sub"`` and ``n_h > 1``, load ``Q``, ``dO`` and form the read
        term on every sub-chunk and keep it on the first (no ``lax.cond``: the loads are
        pipelined) instead of a branch on the first sub-chunk of each token chunk; ``None``
        (the default): masked up to one wave of programs (on an H100 at B=4, H=8, n_h=2:
        0.309 against 0.384 ms), the branch beyond (B=8: 0.586 against 0.715 ms, both at 2
        stages; docs/BENCHMARKS.md).
      dots: the chain's products for 16-bit inputs: ``"split"`` (``A^T dv_new`` in TF32, ``K^T x``
        with ``x`` split into two 16-bit halves), ``"tf32"`` (both in TF32: one product each) or
        ``"input"`` (both with 16-bit operands: one 16-bit product each, as FLA's backward).
      dv_out_dots: with ``dv_out=None``, the fp32 scores of ``scores^T dO`` for 16-bit inputs as
        two 16-bit halves (``"split"``, two products) or rounded to the input dtype
        (``"input"``, one product, as FLA's backward).
      gate_tokens: ``[B, H, T]`` fp32 token log-gate (``-inf`` at resets), for ``dv_out=None``
        with decay (``Gam``).
      w: the WY key factor ``W = A diag(beta gam) K`` ``[B, H, L, Kp]`` in the input dtype (the
        forward's ``Residuals.w``, as FLA's backward keeps it): when given, the chain subtracts
        ``W^T dv_new`` (two dependent products per step instead of three; ``a`` is not read).

    Returns:
      ``(dv_new [B, H, L, Vp], dh_il [B, H, NI, Kp, Vp])`` in k.dtype (``dh_il[c]``: gradient
      w.r.t. the state at the *end* of interleaved chunk ``c``) and ``dh0 [B, H, Kp, Vp]`` fp32.
    """
    B, L, H, Kp = k.shape
    if dots not in STATE_DOTS or dv_out_dots not in DV_OUT_DOTS:
        raise ValueError(
            f"state_pass_backward: dots must be one of {STATE_DOTS} and dv_out_dots one of "
            f"{DV_OUT_DOTS}, got {dots!r} and {dv_out_dots!r}"
        )
    if dv_out is None and gam is not None and gate_tokens is None:
        raise ValueError(
            "state_pass_backward: dv_out=None with decay (gam given) needs gate_tokens, the "
            "[B, H, T] token log-gate"
        )
    chunks = L // (CHUNK * num_householder)
    pieces = state_pass_pieces(split, chunks, B * H, do.shape[-1], block_v)
    stored_w = w is not None
    if stored_w:
        a = w
    launch = functools.partial(
        _launch,
        a,
        k,
        jnp.swapaxes(beta, 1, 2).astype(jnp.float32),  # [B, H, L]: rows a pipelined load
        dv_out,
        q,
        do,
        gam,
        fdec,
        gam_tok,
        gate_tokens,
        num_householder=num_householder,
        scale=scale,
        block_v=block_v,
        num_warps=num_warps,
        num_stages=num_stages,
        loop=loop,
        read_masked=read_masked,
        dots=dots,
        dv_out_dots=dv_out_dots,
        stored_w=stored_w,
        interpret=interpret,
        poison=poison,
    )
    if pieces == 1:
        return tuple(launch(dht, pieces=1))
    (transfer,) = launch(dht, pieces=pieces, transfer=True)
    ends = chain_pieces(transfer, dht, B, pieces, reverse=True)
    dvnew, dh_il, dh0s = launch(ends, pieces=pieces)
    return dvnew, dh_il, dh0s.reshape(B, pieces, *dh0s.shape[1:])[:, 0]


def launch_plan(
    loop: str,
    read_masked: bool | None,
    num_stages: int,
    programs: int,
    num_householder: int,
    chunk_bytes: int,
    token_bytes: int,
    *,
    reads_every_chunk: bool = False,
) -> tuple[str, bool, int, int]:
    """``(loop, read_masked, num_stages, bytes_per_stage)`` of a reverse-pass launch of
    ``programs`` programs (the arguments as ``state_pass_backward``'s; ``chunk_bytes`` and
    ``token_bytes``: the pipelined loads of one interleaved chunk and of one token chunk's
    ``Q``, ``dO``; ``reads_every_chunk``: the sub-chunk loop loads those on every sub-chunk
    whatever ``read_masked``, as with ``dv_out`` formed in the pass). Up to one wave
    (``ONE_WAVE_PROGRAMS``) the ``"auto"`` choices take every load into the pipeline (the read
    term masked); beyond it they keep the shared memory small enough for two programs per SM
    (the read term behind its branch, at most 2 stages; on an H100 at 256 programs: 0.586 ms
    against 0.761 with 3 stages, and 0.612 masked with 3)."""
    n = num_householder
    one_wave = programs <= ONE_WAVE_PROGRAMS
    if loop == "auto":
        loop = "sub"
    loop = state_loop_for(loop, programs, n, num_stages, n * chunk_bytes + token_bytes)
    if read_masked is None:
        read_masked = one_wave
    if loop == "sub" and not read_masked and not one_wave:
        num_stages = min(num_stages, 2)
    if loop == "token":
        return loop, read_masked, num_stages, n * chunk_bytes + token_bytes
    reads = read_masked or reads_every_chunk
    return loop, read_masked, num_stages, chunk_bytes + (token_bytes if reads else 0)


def _launch(
    a: jax.Array,
    k: jax.Array,
    beta: jax.Array,
    dv_out: jax.Array,
    q: jax.Array,
    do: jax.Array,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    gam_tok: jax.Array | None,
    gate_tokens: jax.Array | None,
    dht: jax.Array,
    *,
    num_householder: int,
    scale: float,
    block_v: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    poison: bool,
    pieces: int,
    loop: str = "auto",
    read_masked: bool | None = None,
    dots: str = "split",
    dv_out_dots: str = "split",
    stored_w: bool = False,
    transfer: bool = False,
) -> list[jax.Array]:
    """One ``pallas_call`` of the reverse-pass kernel; ``pieces`` and ``transfer`` as the
    forward's ``state_pass._launch`` (``dht`` per piece ``[B * P, H, Kp, Vp]`` when
    ``pieces > 1`` and not ``transfer``; the transfer launch ignores it)."""
    B, L, H, Kp = k.shape
    Vp = do.shape[-1]
    n = num_householder
    fused_dv_out = dv_out is None
    T = L // n
    NT = T // CHUNK
    bv = min(block_v, Vp, Kp) if transfer else min(block_v, Vp)
    nv = Vp // bv
    dtype = k.dtype
    decay = gam is not None
    P = pieces
    row = (lambda bp: bp) if P == 1 else (lambda bp: lax.div(bp, P))
    vtile = (lambda i: i) if not transfer else (lambda i: jnp.minimum(i, nv - 1))

    head_vec = lambda size: pl.BlockSpec((None, None, size), lambda i, h, b: (row(b), h, 0))
    piece_state = pl.BlockSpec((None, None, Kp, bv), lambda i, h, b: (b, h, 0, i))
    inputs = [a, k, beta]
    in_specs = [
        pl.BlockSpec((None, None, L, Kp if stored_w else CHUNK), lambda i, h, b: (row(b), h, 0, 0)),
        pl.BlockSpec((None, L, None, Kp), lambda i, h, b: (row(b), 0, h, 0)),
        head_vec(L),
    ]
    if not fused_dv_out:
        inputs.append(dv_out)
        in_specs.append(pl.BlockSpec((None, None, L, bv), lambda i, h, b: (row(b), h, 0, vtile(i))))
    inputs += [q, do]
    in_specs += [
        pl.BlockSpec((None, T, None, Kp), lambda i, h, b: (row(b), 0, h, 0)),
        pl.BlockSpec((None, T, None, bv), lambda i, h, b: (row(b), 0, h, vtile(i))),
    ]
    # the transfer launch reads no dht: it gets the (value-tile) final-state cotangent only as a
    # placeholder operand with a valid block index
    inputs.append(dht)
    in_specs.append(
        pl.BlockSpec((None, None, Kp, bv), lambda i, h, b: (row(b), h, 0, vtile(i)))
        if transfer
        else piece_state
    )
    if decay:
        inputs += [gam, fdec, gam_tok]
        in_specs += [head_vec(L), head_vec(L), head_vec(T)]
        if fused_dv_out:
            inputs.append(gate_tokens)
            in_specs.append(head_vec(T))
    if transfer:
        out_shapes = [jax.ShapeDtypeStruct((B * P, H, Kp, Vp + Kp), jnp.float32)]
        out_specs = [piece_state]
    else:
        out_shapes = [
            jax.ShapeDtypeStruct((B, H, L, Vp), dtype),
            jax.ShapeDtypeStruct((B, H, NT * n, Kp, Vp), dtype),
            jax.ShapeDtypeStruct((B * P, H, Kp, Vp), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, L, bv), lambda i, h, b: (row(b), h, 0, i)),
            pl.BlockSpec((None, None, NT * n, Kp, bv), lambda i, h, b: (row(b), h, 0, 0, i)),
            piece_state,
        ]
    chain = DotMode.IEEE if dtype == jnp.float32 else DotMode.INPUT
    modes = score_modes(dtype) | dict.fromkeys(("ks", "ax", "kv"), chain)
    modes["dvo"] = modes["in" if dv_out_dots == "input" else "split_a"]
    if dtype != jnp.float32 and dots in ("split", "tf32"):
        modes.update(ax=DotMode.TF32, kv=DotMode.SPLIT_B if dots == "split" else DotMode.TF32)
    size = jnp.dtype(dtype).itemsize
    per_chunk = state_chunk_bytes(Kp, bv, size, stored_factor=stored_w, decay=decay)
    if fused_dv_out:
        per_chunk -= CHUNK * bv * size  # no dv_out tile
    per_token = CHUNK * (Kp * size + bv * size + (4 if decay else 0))  # Q, dO (and gam_tok)
    per_token += CHUNK * 4 if decay and fused_dv_out else 0  # the token log-gate
    grid = (nv + (Kp // bv if transfer else 0), H, B * P)
    loop, read_masked, num_stages, per_step = launch_plan(
        loop,
        read_masked,
        num_stages,
        math.prod(grid),
        n,
        per_chunk,
        per_token,
        reads_every_chunk=fused_dv_out,
    )
    kernel = functools.partial(
        _kernel,
        n=n,
        num_token_chunks=NT,
        scale=float(scale),
        decay=decay,
        pieces=P,
        transfer_tiles=nv if transfer else None,
        loop=loop,
        read_masked=read_masked,
        stored_w=stored_w,
        fused_dv_out=fused_dv_out,
        mode=modes,
        dots=dict(dtype=dtype, interpret=interpret),
    )
    return pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=grid,
        num_warps=num_warps,
        num_stages=pipeline_stages(num_stages, per_step),
        interpret=interpret,
        name="dp_bwd_state_transfer" if transfer else "dp_bwd_state_pass",
        poison=poison,
    )
