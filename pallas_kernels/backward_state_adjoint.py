"""Backward stage 3: the state update's adjoint per interleaved chunk (the products with states).

Chunk-parallel over interleaved chunks (mirror: ``chunked_backward.chunk_state_step_backward``'s
``dw``, ``dk``, ``p_to_end`` and ``p_carry``). For interleaved chunk ``c = J*n + i`` (64 sub-step
rows; token chunk ``J``) of one (batch, head), with ``S`` the chunk's start
state (``h[J]`` for ``i = 0``, else ``h_mid[J*(n-1) + i-1]``), ``dE = dh_il[c]`` the gradient at
its end (reverse state pass) and ``gam, fdec`` the interleaved decay vectors::

    dW     = -dV_new S^T                                  [64, Kp]  (to the WY adjoint)
    dk_st  = fdec * (V_new dE^T)                          the state update's part of dk
    dkp    = dk_out + dk_st                               dk so far (output + state update)
    p_end  = rowsum(dk_st * K) ;  p_carry = gam_end <S, dE>
    dG_st  = -p_end ;  dG_st[63] += sum(p_end) + p_carry   (with decay)

These are the only backward products that need the ``[Kp, Vp]`` states; splitting them from the
WY adjoint keeps both kernels small (registers, shared memory) so that several programs share an
SM.

Grid ``(NI, H, B)``, whole head dims per program (for ``n > 1`` both state inputs are mapped and a
``lax.cond`` loads the one that holds ``S``). Head dims above the state tile (``block_k``,
``block_v``; 128 by default, 64 x 128 for wide heads by ``backward.config_for``) loop over
``[bk, bv]`` tiles of ``S`` and ``dE`` read through ref slices: per key tile, ``dW`` and ``dk_st``
(``[64, bk]`` fp32) are summed over the value tiles and stored, ``p_end`` and ``<S, dE>`` are
summed over all tiles in registers (no cross-program sum). One tile (up to 128 by default) is the
untiled kernel exactly. Reads ``h [B, H, NT, Kp, Vp]``,
``h_mid [B, H, NT*(n-1), Kp, Vp]`` (n > 1), ``dh_il [B, H, NI, Kp, Vp]`` (input dtype),
``v_new, dv_new [B, H, L, Vp]``, ``dk_out [B, L, H, Kp]`` fp32 and, with decay,
``k [B, L, H, Kp]`` and ``gam, fdec [B, H, L]`` fp32. Writes ``dW [B, H, L, Kp]`` fp32,
``dkp [B, L, H, Kp]`` fp32 and, with decay, ``dG_st [B, H, L]`` fp32.
Products: 16-bit operands (the states are stored in the input dtype), fp32 accumulation; IEEE
fp32 for fp32 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import CHUNK, DotMode, mm, pallas_call, state_gate_terms, state_inner


def _kernel(*refs, n: int, decay: bool, mode: DotMode, dots: dict, k_tiles: list, v_tiles: list):
    h_ref = refs[0]
    rest = list(refs[1:])
    hmid_ref = rest.pop(0) if n > 1 else None
    ds_ref, vnew_ref, dvnew_ref, dkout_ref = (rest.pop(0) for _ in range(4))
    k_ref, gam_ref, fdec_ref = (rest.pop(0) for _ in range(3)) if decay else (None,) * 3
    dw_ref, dkp_ref = rest.pop(0), rest.pop(0)
    dg_ref = rest.pop(0) if decay else None

    nk, nv = len(k_tiles), len(v_tiles)
    # one tile (Kp, Vp <= 128 by default): whole refs, the untiled kernel exactly
    tile = lambda ref, i, j: ref[...] if nk == nv == 1 else ref[k_tiles[i], v_tiles[j]]
    cols = lambda ref, tiles, j: ref[...] if len(tiles) == 1 else ref[:, tiles[j]]
    if n == 1:
        state = lambda i, j: tile(h_ref, i, j)
    else:  # the first sub-chunk of a token chunk starts at h[J], the others at h_mid
        first = lax.rem(pl.program_id(0), n) == 0
        state = lambda i, j: lax.cond(
            first, lambda: tile(h_ref, i, j), lambda: tile(hmid_ref, i, j)
        )
    # per K tile: dW, dk_st summed over V tiles (state tiles [Kp/nk, Vp/nv])
    s_ds = p_end = None
    add = lambda acc, x: x if acc is None else acc + x
    pending = []  # the last tile's <S, dE> and the last K tile's dkp store come last
    for i in range(nk):
        dw = dk_st = None
        for j in range(nv):
            s = state(i, j)
            ds = tile(ds_ref, i, j)
            dw = add(dw, mm(cols(dvnew_ref, v_tiles, j), s, mode, trans_b=True, **dots))
            if j == nv - 1 and nk == 1:
                dw_ref[...] = (-dw).astype(dw_ref.dtype)
            elif j == nv - 1:
                dw_ref[:, k_tiles[i]] = (-dw).astype(dw_ref.dtype)
            dk_st = add(dk_st, mm(cols(vnew_ref, v_tiles, j), ds, mode, trans_b=True, **dots))
            if decay:
                pending.append((s, ds))
                if i < nk - 1 or j < nv - 1:
                    s_ds = add(s_ds, state_inner(*pending.pop()))
        if decay:
            dk_st = dk_st * fdec_ref[...][:, None]
            p_end = add(p_end, jnp.sum(dk_st * cols(k_ref, k_tiles, i).astype(jnp.float32), 1))
        dkp = lambda i=i, dk_st=dk_st: (
            cols(dkout_ref, k_tiles, i).astype(jnp.float32) + dk_st
        ).astype(dkp_ref.dtype)
        if i < nk - 1:
            dkp_ref[:, k_tiles[i]] = dkp()
    if decay:
        s_ds = add(s_ds, state_inner(*pending.pop()))
        dg_ref[...] = state_gate_terms(p_end, s_ds, gam_ref[...])
    if nk == 1:
        dkp_ref[...] = dkp()
    else:
        dkp_ref[:, k_tiles[-1]] = dkp()


def state_adjoint(
    h: jax.Array,
    h_mid: jax.Array | None,
    dh_il: jax.Array,
    vnew: jax.Array,
    dvnew: jax.Array,
    dk_out: jax.Array,
    k: jax.Array | None,
    gam: jax.Array | None,
    fdec: jax.Array | None,
    *,
    num_householder: int,
    block_k: int = 128,
    block_v: int = 128,
    num_warps: int = 8,
    num_stages: int = 1,
    out_dtype=jnp.float32,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Run backward stage 3 (the state update's adjoint).

    Args:
      h: ``[B, H, NT, Kp, Vp]`` token-chunk start states; h_mid: ``[B, H, NT*(n-1), Kp, Vp]``
        the other interleaved chunk-start states (None when n == 1); dh_il:
        ``[B, H, NI, Kp, Vp]`` chunk-end state gradients; vnew, dvnew: ``[B, H, L, Vp]``;
        dk_out: ``[B, L, H, Kp]`` fp32 or 16-bit (output adjoint); k: ``[B, L, H, Kp]`` (used
        with decay);
        gam, fdec: ``[B, H, L]`` fp32 or None (no decay).
      block_k, block_v: state tile (powers of two; clipped to ``Kp``, ``Vp``): ``dW`` and
        ``dk_st`` are formed per K tile, summed over V tiles (one tile up to 128 by default).
      out_dtype: dtype of ``dW`` and ``dkp`` (fp32; the input dtype halves their traffic,
        ``BackwardConfig.grad_dtype``).

    Returns:
      ``dW [B, H, L, Kp]``, ``dkp = dk_out + dk_st [B, L, H, Kp]`` (``out_dtype``) and
      ``dG_st [B, H, L]`` fp32 (None without decay).
    """
    B, H, NT, Kp, Vp = h.shape
    L = dvnew.shape[2]
    n = num_householder
    NI = L // CHUNK
    decay = gam is not None
    dtype = h.dtype

    def mid_index(c, hh, b):  # h_mid[J*(n-1) + i-1] for c = J*n + i, i > 0 (i = 0: unused)
        return (b, hh, lax.div(c, n) * (n - 1) + jnp.maximum(lax.rem(c, n) - 1, 0), 0, 0)

    state = lambda index: pl.BlockSpec((None, None, None, Kp, Vp), index)
    head_rows = lambda d: pl.BlockSpec((None, None, CHUNK, d), lambda c, hh, b: (b, hh, c, 0))
    rows = pl.BlockSpec((None, CHUNK, None, Kp), lambda c, hh, b: (b, c, hh, 0))
    vec = pl.BlockSpec((None, None, CHUNK), lambda c, hh, b: (b, hh, c))
    inputs = [h]
    in_specs = [state(lambda c, hh, b: (b, hh, lax.div(c, n), 0, 0))]
    if n > 1:
        inputs.append(h_mid)
        in_specs.append(state(mid_index))
    inputs += [dh_il, vnew, dvnew, dk_out]
    in_specs += [state(lambda c, hh, b: (b, hh, c, 0, 0)), head_rows(Vp), head_rows(Vp), rows]
    if decay:
        inputs += [k, gam, fdec]
        in_specs += [rows, vec, vec]
    out_shapes = [
        jax.ShapeDtypeStruct((B, H, L, Kp), out_dtype),
        jax.ShapeDtypeStruct((B, L, H, Kp), out_dtype),
    ]
    out_specs = [head_rows(Kp), rows]
    if decay:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, L), jnp.float32))
        out_specs.append(vec)
    mode = DotMode.IEEE if dtype == jnp.float32 else DotMode.INPUT
    bk, bv = min(block_k, Kp), min(block_v, Vp)
    kernel = functools.partial(
        _kernel,
        n=n,
        decay=decay,
        mode=mode,
        dots=dict(dtype=dtype, interpret=interpret),
        k_tiles=[pl.ds(i * bk, bk) for i in range(Kp // bk)],
        v_tiles=[pl.ds(j * bv, bv) for j in range(Vp // bv)],
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
        name="dp_bwd_state_adjoint",
        poison=poison,
    )
    return outs[0], outs[1], (outs[2] if decay else None)
