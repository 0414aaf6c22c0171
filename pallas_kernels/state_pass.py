"""Stage 2 of the forward: the inter-chunk state recurrence (SPEC §2.3, §2.7.3), sequential.

For interleaved chunks ``c = 0 .. NC-1`` of one (batch, head, value tile)::

    if c % n_h == 0: h[c / n_h] = S                        # state at the start of token chunk
    v_new_c = A_c diag(beta_c) (V_c - diag(gam_c) K_c S)   # [64, BV] = U_c - W_c S (SPEC §2.3)
    S      <- gam_end_c * S + K_c^T (fdec_c * v_new_c)

with ``S [Kp, BV]`` fp32 carried in registers (``gam_end_c`` is ``gam`` at the chunk's last row;
without decay all gate factors are 1). The WY factors are applied on the fly from ``A`` (stage 1),
so they are never rounded to 16 bits nor stored (the option ``wu``,
``KernelConfig.state_stored_wu``: ``v_new = U - W S`` from the prepare kernel's 16-bit ``W``, ``U``,
as FLA). Chunk-start states are stored at token-chunk boundaries (every ``n_h``-th chunk) as
``h``; with ``mid_states`` (n_h > 1, for the backward) the other chunk-start states go to a second
output ``h_mid``, so that the backward never re-runs the recurrence.

Grid ``(Vp / BV, H, B)``: one program per value tile and (head, batch), so ``B*H = 32`` heads with
``BV = 32`` and ``V = 128`` still give 128 programs (defaults: ``BV = 32``, 4 warps, 3 pipeline
stages, the fastest tried on an H100; 8 warps for K = 256). Each program walks the whole (padded)
sequence of its head, reading per chunk ``A [64, 64]`` fp32, ``K [64, Kp]``, ``V [64, BV]``,
``beta [64]`` (fp32 rows of a ``[B, H, L]`` copy, so that the Triton pipeliner copies them
asynchronously like the tiles; and ``gam, fdec [64]``), and ``h0 [Kp, BV]`` once; it writes
``v_new [L, BV]`` and ``h [NT, Kp, BV]`` (input dtype) and the final state ``[Kp, BV]`` fp32. One
loop step covers a token chunk (its ``n_h`` sub-chunks unrolled, ``loop="token"``; by default
where the programs run as one wave, ``n_h <= 2`` and the step still pipelines in shared memory,
``common.state_loop_for``), else one interleaved chunk.

Sequence split (``pieces = P > 1``; ``KernelConfig.state_split``): the grid's last axis runs over
(batch row, piece) pairs and each program walks only its piece's token chunks. A first
"transfer" launch runs every piece from a zero state (value tiles) and from the identity (``Kp /
BV`` extra tiles with zero values), giving the affine map ``end = M start + E`` of each piece;
``common.chain_pieces`` chains them in plain JAX (``P - 1`` products ``[Kp, Kp] x [Kp, Vp]``),
and the second launch runs every piece from its true start, writing the states and ``v_new``.
That is ``2 + Kp/Vp`` times the sequential work for ``P`` times the programs: it pays only where
``B * H * Vp / BV`` programs leave SMs idle (long single sequences, few heads). ``AUTO_SPLIT``, the
default, splits exactly there (``common.auto_split``: below 96 programs, up to 8 pieces).

Products for 16-bit inputs: ``K S`` with the state rounded to the input dtype (TF32 with
``tf32_state``), ``A x`` in TF32, ``K^T v_new`` with ``v_new`` split into two 16-bit halves (nearly
fp32; keys are exact in 16 bits). fp32 inputs: IEEE fp32 throughout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    AUTO_SPLIT,
    CHUNK,
    DotMode,
    chain_pieces,
    element_select,
    identity_columns,
    mm,
    pallas_call,
    pipeline_stages,
    state_chunk_bytes,
    state_loop_for,
    state_pass_pieces,
)


def _kernel(
    *refs,
    n: int,
    num_token_chunks: int,
    decay: bool,
    with_h0: bool,
    mid_states: bool,
    pieces: int,
    transfer_tiles: int | None,
    stored_wu: bool,
    loop: str,
    ks_dot: DotMode,
    ax_dot: DotMode,
    kv_dot: DotMode,
    dtype,
    interpret: bool,
):
    a_ref, k_ref, v_ref, beta_ref = refs[:4]
    rest = list(refs[4:])
    gam_ref, fdec_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)
    h0_ref = rest.pop(0) if with_h0 else None
    transfer = transfer_tiles is not None
    if transfer:
        (final_ref,) = rest
        h_ref = vnew_ref = hmid_ref = None
    else:
        h_ref, vnew_ref, final_ref = rest[:3]
        hmid_ref = rest[3] if mid_states else None

    kp, bv = final_ref.shape
    if transfer:  # value tiles from zero; identity tiles (tile >= transfer_tiles) from I
        tile = pl.program_id(0)
        state = identity_columns(kp, bv, (tile - transfer_tiles) * bv)
        value_scale = (tile < transfer_tiles).astype(jnp.float32)
    elif with_h0:
        state = h0_ref[...].astype(jnp.float32)
    else:
        state = jnp.zeros((kp, bv), jnp.float32)
    dots = dict(dtype=dtype, interpret=interpret)
    tokens_per_piece = num_token_chunks // pieces
    first_token = 0 if pieces == 1 else lax.rem(pl.program_id(2), pieces) * tokens_per_piece

    def store_mid(c, i, state):  # start state of sub-chunk i > 0 of token chunk c // n
        if hmid_ref is not None:
            hmid_ref[lax.div(c, n) * (n - 1) + i - 1] = state.astype(hmid_ref.dtype)

    def sub_chunk(c, state):  # interleaved chunk c: its v_new, and the state at its end
        rows = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        k = k_ref[rows, :]
        vals = v_ref[rows, :].astype(jnp.float32)
        if transfer:
            vals = vals * value_scale
        if decay:
            gam = gam_ref[rows]
        if stored_wu:  # a_ref holds W, v_ref U: v_new = U - W S, one product on the chain
            vnew = vals - mm(a_ref[rows, :], state, ks_dot, **dots)
        else:
            ks = mm(k, state, ks_dot, **dots)  # [64, BV]
            if decay:
                ks = ks * gam[:, None]
            x = beta_ref[rows][:, None] * (vals - ks)
            vnew = mm(a_ref[rows, :], x, ax_dot, **dots)
        if vnew_ref is not None:
            vnew_ref[rows, :] = vnew.astype(vnew_ref.dtype)
        if decay:
            vnew = vnew * fdec_ref[rows][:, None]
            state = state * element_select(gam, CHUNK - 1)
        return state + mm(k, vnew, kv_dot, trans_a=True, **dots)

    if loop == "token":  # one step per token chunk, no branches

        def token_step(j, state):
            j = first_token + j
            if h_ref is not None:
                h_ref[j] = state.astype(h_ref.dtype)
            for i in range(n):
                if i > 0:
                    store_mid(j * n + i, i, state)
                state = sub_chunk(j * n + i, state)
            return state

        final_ref[...] = lax.fori_loop(0, tokens_per_piece, token_step, state)
        return

    def sub_step(j, state):  # one step per interleaved chunk, the stores behind branches
        c = first_token * n + j
        if h_ref is not None:

            @pl.when(lax.rem(c, n) == 0)
            def _():
                h_ref[lax.div(c, n)] = state.astype(h_ref.dtype)

        if hmid_ref is not None:

            @pl.when(lax.rem(c, n) != 0)
            def _():
                store_mid(c, lax.rem(c, n), state)

        return sub_chunk(c, state)

    final_ref[...] = lax.fori_loop(0, tokens_per_piece * n, sub_step, state)


def state_pass(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    h0: jax.Array | None,
    *,
    num_householder: int,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    tf32_state: bool = False,
    mid_states: bool = False,
    split: int = AUTO_SPLIT,
    wu: tuple[jax.Array, jax.Array] | None = None,
    loop: str = "auto",
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, ...]:
    """Run stage 2.

    Args:
      a: ``[B, H, L, 64]`` fp32 from ``prepare``; k: ``[B, L, H, Kp]``, v: ``[B, L, H, Vp]``,
        beta: ``[B, L, H]`` padded inputs; gam, fdec: ``[B, H, L]`` fp32 or None (no decay);
        h0: ``[B, H, Kp, Vp]`` fp32 or None.
      num_householder: ``n_h``; ``L = n_h * T_pad``.
      block_v: value tile ``BV`` (power of two dividing ``Vp``).
      tf32_state: for 16-bit inputs, multiply ``K S`` with TF32 operands instead of rounding the
        fp32 state to the input dtype.
      mid_states: also return the start states of the interleaved chunks that do not start a token
        chunk (only meaningful for ``n_h > 1``).
      split: walk the sequence as up to this many pieces of whole token chunks in parallel
        (``common.split_pieces`` picks the largest count dividing ``T_pad / 64``); 1 = one
        sequential walk; ``AUTO_SPLIT`` (0, the default) = ``common.auto_split`` of the
        ``B * H * Vp / BV`` programs (a split only where they leave SMs idle).
      loop: ``"token"``: one loop step per token chunk, its ``n_h`` sub-chunks unrolled, the
        stores of ``h`` and ``h_mid`` without branches; ``"sub"``: one step per interleaved
        chunk, the stores behind ``pl.when``; ``"auto"`` (the default): the token loop up to one
        wave of programs (``common.state_loop_for``: also where the token loop falls back to
        the sub-chunk loop, above ``n_h = 2`` or where it would not pipeline).
      num_stages: the pipeline depth, at most: lowered to what fits in shared memory
        (``common.pipeline_stages``).
      wu: the WY factors ``(W [B, H, L, Kp], U [B, H, L, Vp])`` in the input dtype
        (``W = A diag(beta gam) K``, ``U = A diag(beta) V``: ``prepare(factors="wu")``, as FLA's
        forward keeps them): ``v_new = U - W S`` on the chain, two dependent products per chunk
        instead of three (``a`` and ``v`` are then not read).

    Returns:
      ``(h [B, H, NT, Kp, Vp], v_new [B, H, L, Vp], final [B, H, Kp, Vp] fp32)``, plus
      ``h_mid [B, H, NT*(n_h-1), Kp, Vp]`` with ``mid_states`` (``h_mid[J*(n_h-1) + i-1]`` is the
      start state of interleaved chunk ``J*n_h + i``, ``0 < i < n_h``); h, v_new and h_mid in
      k.dtype, ``NT = T_pad / 64``.
    """
    B, L, H, Kp = k.shape
    chunks = L // (CHUNK * num_householder)
    pieces = state_pass_pieces(split, chunks, B * H, v.shape[-1], block_v)
    stored_wu = wu is not None
    if stored_wu:
        a, v = wu
    launch = functools.partial(
        _launch,
        a,
        k,
        v,
        jnp.swapaxes(beta, 1, 2).astype(jnp.float32),  # [B, H, L]: rows a pipelined load
        gam,
        fdec,
        num_householder=num_householder,
        block_v=block_v,
        num_warps=num_warps,
        num_stages=num_stages,
        tf32_state=tf32_state,
        stored_wu=stored_wu,
        loop=loop,
        interpret=interpret,
        poison=poison,
    )
    if pieces == 1:
        return launch(h0, mid_states=mid_states, pieces=1)
    (transfer,) = launch(None, pieces=pieces, transfer=True)
    zero = jnp.zeros((B, H, Kp, v.shape[-1]), jnp.float32)
    starts = chain_pieces(transfer, zero if h0 is None else h0, B, pieces)
    h, vnew, finals, *h_mid = launch(starts, mid_states=mid_states, pieces=pieces)
    final = finals.reshape(B, pieces, *finals.shape[1:])[:, -1]
    return (h, vnew, final, *h_mid)


def _launch(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    h0: jax.Array | None,
    *,
    num_householder: int,
    block_v: int,
    num_warps: int,
    num_stages: int,
    tf32_state: bool,
    interpret: bool,
    poison: bool,
    pieces: int,
    stored_wu: bool = False,
    loop: str = "auto",
    mid_states: bool = False,
    transfer: bool = False,
) -> list[jax.Array]:
    """One ``pallas_call`` of the stage-2 kernel. With ``pieces > 1`` the grid's last axis runs
    over ``B * P`` (batch row, piece) pairs, ``h0`` and the final states are per piece
    ``[B * P, H, Kp, Vp]``, and each program walks only its piece's chunks (writing its rows of
    the shared ``h``/``v_new`` outputs). ``transfer=True`` adds ``Kp / BV`` identity tiles after
    the value tiles, writes nothing but the final states ``[B * P, H, Kp, Vp + Kp]`` and starts
    every value tile from zero."""
    B, L, H, Kp = k.shape
    Vp = v.shape[-1]
    n = num_householder
    NT = L // (CHUNK * n)
    bv = min(block_v, Vp, Kp) if transfer else min(block_v, Vp)
    nv = Vp // bv
    dtype = k.dtype
    precise = dtype == jnp.float32
    decay = gam is not None
    with_h0 = h0 is not None and not transfer
    mid_states = mid_states and n > 1 and not transfer
    P = pieces
    row = (lambda bp: bp) if P == 1 else (lambda bp: lax.div(bp, P))
    vtile = (lambda i: i) if not transfer else (lambda i: jnp.minimum(i, nv - 1))

    seq = lambda d, tile: pl.BlockSpec(
        (None, L, None, d), lambda i, h, b: (row(b), 0, h, vtile(i) if tile else 0)
    )
    head_vec = pl.BlockSpec((None, None, L), lambda i, h, b: (row(b), h, 0))
    inputs = [a, k, v, beta]
    head_rows = lambda d, tile: pl.BlockSpec(
        (None, None, L, d), lambda i, h, b: (row(b), h, 0, vtile(i) if tile else 0)
    )
    in_specs = [
        head_rows(Kp if stored_wu else CHUNK, False),
        seq(Kp, False),
        head_rows(bv, True) if stored_wu else seq(bv, True),
        head_vec,
    ]
    if decay:
        inputs += [gam, fdec]
        in_specs += [head_vec, head_vec]
    piece_state = pl.BlockSpec((None, None, Kp, bv), lambda i, h, b: (b, h, 0, i))
    if with_h0:
        inputs.append(h0)
        in_specs.append(piece_state)
    if transfer:
        out_shapes = [jax.ShapeDtypeStruct((B * P, H, Kp, Vp + Kp), jnp.float32)]
        out_specs = [piece_state]
    else:
        out_shapes = [
            jax.ShapeDtypeStruct((B, H, NT, Kp, Vp), dtype),
            jax.ShapeDtypeStruct((B, H, L, Vp), dtype),
            jax.ShapeDtypeStruct((B * P, H, Kp, Vp), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, NT, Kp, bv), lambda i, h, b: (row(b), h, 0, 0, i)),
            pl.BlockSpec((None, None, L, bv), lambda i, h, b: (row(b), h, 0, i)),
            piece_state,
        ]
    if mid_states:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, NT * (n - 1), Kp, Vp), dtype))
        out_specs.append(
            pl.BlockSpec((None, None, NT * (n - 1), Kp, bv), lambda i, h, b: (row(b), h, 0, 0, i))
        )
    if precise:
        ks_dot = ax_dot = kv_dot = DotMode.IEEE
    else:
        ks_dot = DotMode.TF32 if tf32_state else DotMode.INPUT
        ax_dot, kv_dot = DotMode.TF32, DotMode.SPLIT_B
    per_chunk = state_chunk_bytes(
        Kp, bv, jnp.dtype(dtype).itemsize, stored_factor=stored_wu, decay=decay
    )
    grid = (nv + (Kp // bv if transfer else 0), H, B * P)
    loop = state_loop_for(loop, math.prod(grid), n, num_stages, n * per_chunk)
    chunks_per_step = n if loop == "token" else 1
    kernel = functools.partial(
        _kernel,
        n=n,
        num_token_chunks=NT,
        decay=decay,
        with_h0=with_h0,
        mid_states=mid_states,
        pieces=P,
        transfer_tiles=nv if transfer else None,
        stored_wu=stored_wu,
        loop=loop,
        ks_dot=ks_dot,
        ax_dot=ax_dot,
        kv_dot=kv_dot,
        dtype=dtype,
        interpret=interpret,
    )
    return pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=grid,
        num_warps=num_warps,
        num_stages=pipeline_stages(num_stages, chunks_per_step * per_chunk),
        interpret=interpret,
        name="dp_state_transfer" if transfer else "dp_state_pass",
        poison=poison,
    )
