"""Backward stage 3: the output's adjoint for q and k, and its token gate terms.

Chunk-parallel over token chunks (mirror: ``chunked_backward.output_backward``; the ``dv_new``
part of that function is in stage 1 because the reverse state pass needs it). For token chunk
``J`` (64 tokens ``r``) of one (batch, head), with ``Gam`` / ``gam`` the token decays (as in
``output.py``)::

    dOh     = dO h[J]^T                                        [64, Kp]
    dq      = scale * gam * dOh
    p_start = scale * gam * rowsum(dOh * Q)
    for j in 0..n-1 (strided sub-step slices, rows t*n + j):
        D_j   = dO V_new_j^T                                   [64, 64]
        dq   += scale (D_j * Gam) K_j
        dk_j  = scale (D_j * Gam)^T Q                          (the output's part of dk)
        P    += scale (Q K_j^T) * Gam * D_j                    (products pair * d pair)
        dv_out_j = scale ((Q K_j^T) * Gam)^T dO                (with ``with_dv_out``)
    dG_tok  = rowsum(P) - colsum(P) + p_start                  (gradient w.r.t. the token cumsum)

``dq`` is complete here and written in q.dtype. Queries and ``dO`` stay at token level (64 rows),
never zero-padded to the interleaved axis. ``dv_out`` (the output's part of ``dv_new``, input
dtype) is needed by the reverse state pass; it is computed here when the forward saved ``v_new``
(else the recompute stage computes it), so this stage then runs first.

Grid ``(NT, H, B)``; the whole value dimension in one program (``dO [64, Vp]``,
``h[J] [Kp, Vp]``, ``V_new_j [64, Vp]``), so no cross-program reduction over V. Wide heads: the
products over V (``dO h^T``, ``D_j``) are sums over value tiles (``block_v``, 128) read through ref
slices, and keys above ``block_k`` (128) become a grid axis, ``(Kp / bk, NT, H, B)``: each program
writes its ``[64, bk]`` columns of ``dq`` and ``dk`` (``D_j`` is recomputed per key tile) and a
partial ``dG_tok`` (its terms are sums over K: ``Q K_j^T``, ``rowsum(dOh * Q)``) into
``[Kp / bk, B, H, T]``, summed in JAX. Up to 128 it is one tile, the untiled kernel.
Reads ``q [B, T, H, Kp]``, ``do [B, T, H, Vp]``, ``h [B, H, NT, Kp, Vp]``, ``k`` viewed as
``[B, T, n, H, Kp]``, ``v_new`` viewed as ``[B, H, T, n, Vp]`` and, with decay, the token log-gate
``[B, H, T]`` fp32. Writes ``dq [B, T, H, Kp]`` (q.dtype), ``dk_out`` as ``[B, T, n, H, Kp]``
fp32, with decay ``dG_tok [B, H, T]`` fp32 and, with ``with_dv_out``, ``dv_out`` as
``[B, H, T, n, Vp]`` (input dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backward_recompute import token_decay
from pallas_kernels.common import CHUNK, mm, pallas_call, score_modes


def _kernel(
    *refs,
    n: int,
    scale: float,
    decay: bool,
    with_dv_out: bool,
    mode: dict,
    dots: dict,
    v_tiles: list,
    tiled: bool,
):
    q_ref, do_ref, h_ref, k_ref, vnew_ref = refs[:5]
    rest = list(refs[5:])
    gate_ref = rest.pop(0) if decay else None
    dq_ref, dk_ref = rest.pop(0), rest.pop(0)
    dg_ref = rest.pop(0) if decay else None
    dvout_ref = rest.pop(0) if with_dv_out else None

    gam_mat, gam = token_decay(gate_ref[...] if decay else None)
    q = q_ref[...]
    # products over V as sums over value tiles read through ref slices (one tile: whole refs)
    nv = len(v_tiles)
    if nv == 1:
        do_all = do_ref[...]
        do_tile = lambda j: do_all
        cols = lambda ref, j: ref[...]
        sub = lambda ref, i, j: ref[:, i, :]
    else:
        do_tile = lambda j: do_ref[:, v_tiles[j]]
        cols = lambda ref, j: ref[:, v_tiles[j]]
        sub = lambda ref, i, j: ref[:, i, v_tiles[j]]
    over_v = lambda f: functools.reduce(lambda x, j: x + f(j), range(1, nv), f(0))
    do_h = over_v(
        lambda j: mm(do_tile(j), cols(h_ref, j), mode["in"], trans_b=True, **dots)
    )  # [64, Kp]
    if decay:
        do_h = do_h * gam[:, None]
        p_pair = jnp.zeros((CHUNK, CHUNK), jnp.float32)
        if tiled:  # formed now, so that do_h need not live through the loop (registers)
            p_start = jnp.sum(do_h * q.astype(jnp.float32), axis=1)
    dq = do_h
    for i in range(n):
        k = k_ref[:, i, :]
        d_scores = over_v(
            lambda j, i=i: mm(do_tile(j), sub(vnew_ref, i, j), mode["in"], trans_b=True, **dots)
        )
        d_scores = d_scores * gam_mat
        dq = dq + mm(d_scores, k, mode["split_a"], **dots)
        dk_ref[:, i, :] = (scale * mm(d_scores, q, mode["split_a"], trans_a=True, **dots)).astype(
            dk_ref.dtype
        )
        if decay or with_dv_out:
            qk = mm(q, k, mode["in"], trans_b=True, **dots)
        if decay:
            p_pair = p_pair + qk * d_scores
        if with_dv_out:
            scores = qk * (gam_mat * scale)
            for j in range(nv):
                dv = mm(scores, do_tile(j), mode["split_a"], trans_a=True, **dots)
                if nv == 1:
                    dvout_ref[:, i, :] = dv.astype(dvout_ref.dtype)
                else:
                    dvout_ref[:, i, v_tiles[j]] = dv.astype(dvout_ref.dtype)
    dq_ref[...] = (scale * dq).astype(dq_ref.dtype)
    if decay:
        if not tiled:
            p_start = jnp.sum(do_h * q.astype(jnp.float32), axis=1)
        dg_ref[...] = scale * (jnp.sum(p_pair, axis=1) - jnp.sum(p_pair, axis=0) + p_start)


def output_backward(
    q: jax.Array,
    do: jax.Array,
    h: jax.Array,
    k: jax.Array,
    vnew: jax.Array,
    gate_tok: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    with_dv_out: bool = False,
    block_k: int = 128,
    block_v: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    dk_dtype=jnp.float32,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Run backward stage 3.

    Args:
      q: ``[B, T, H, Kp]``; do: ``[B, T, H, Vp]``; h: ``[B, H, NT, Kp, Vp]``;
        k: ``[B, L, H, Kp]``; vnew: ``[B, H, L, Vp]``; gate_tok: ``[B, H, T]`` fp32 or None.
      block_k: key tile per program (a grid axis when ``Kp > block_k``; the token gate terms are
        then summed over the tiles here). block_v: value tile of the in-kernel sums over V.
        Powers of two, clipped to ``Kp``, ``Vp``; one tile each up to 128 by default.
      with_dv_out: also ``dv_out`` (needs the whole key dim in one program: ``Kp <= block_k``).
      dk_dtype: dtype of the output's ``dk`` (fp32; ``BackwardConfig.grad_dtype``).

    Returns:
      ``dq [B, T, H, Kp]`` (q.dtype), the output's ``dk [B, L, H, Kp]`` (``dk_dtype``),
      ``dG_tok [B, H, T]`` fp32 (None without decay) and, with ``with_dv_out``, the output's
      ``dv_new`` part ``dv_out [B, H, L, Vp]`` in q.dtype.
    """
    B, T, H, Kp = q.shape
    Vp = do.shape[-1]
    n = num_householder
    L = T * n
    NT = T // CHUNK
    dtype = q.dtype
    decay = gate_tok is not None
    bk, bv = min(block_k, Kp), min(block_v, Vp)
    nk = Kp // bk
    if with_dv_out and nk > 1:
        raise ValueError(f"with_dv_out needs the whole key dim in one program (Kp={Kp} > {bk})")

    # grid (NT, H, B), or (Kp / bk, NT, H, B) with key tiles; f(kt, t, hh, b) -> block index
    if nk == 1:
        spec = lambda block, f: pl.BlockSpec(block, lambda t, hh, b: f(0, t, hh, b))
        grid = (NT, H, B)
    else:
        spec = lambda block, f: pl.BlockSpec(block, f)
        grid = (nk, NT, H, B)
    inputs = [q, do, h, k.reshape(B, T, n, H, Kp), vnew.reshape(B, H, T, n, Vp)]
    q_spec = spec((None, CHUNK, None, bk), lambda kt, t, hh, b: (b, t, hh, kt))
    dk_spec = spec((None, CHUNK, n, None, bk), lambda kt, t, hh, b: (b, t, 0, hh, kt))
    in_specs = [
        q_spec,
        spec((None, CHUNK, None, Vp), lambda kt, t, hh, b: (b, t, hh, 0)),
        spec((None, None, None, bk, Vp), lambda kt, t, hh, b: (b, hh, t, kt, 0)),
        dk_spec,
        spec((None, None, CHUNK, n, Vp), lambda kt, t, hh, b: (b, hh, t, 0, 0)),
    ]
    vec = spec((None, None, CHUNK), lambda kt, t, hh, b: (b, hh, t))
    if decay:
        inputs.append(gate_tok)
        in_specs.append(vec)
    out_shapes = [
        jax.ShapeDtypeStruct((B, T, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, T, n, H, Kp), dk_dtype),
    ]
    out_specs = [q_spec, dk_spec]
    if decay and nk == 1:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, T), jnp.float32))
        out_specs.append(vec)
    elif decay:  # one partial per key tile (the terms are sums over K), summed below
        out_shapes.append(jax.ShapeDtypeStruct((nk, B, H, T), jnp.float32))
        out_specs.append(spec((None, None, None, CHUNK), lambda kt, t, hh, b: (kt, b, hh, t)))
    if with_dv_out:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, T, n, Vp), dtype))
        out_specs.append(spec((None, None, CHUNK, n, Vp), lambda kt, t, hh, b: (b, hh, t, 0, 0)))
    modes = score_modes(dtype)
    kernel = functools.partial(
        _kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        with_dv_out=with_dv_out,
        mode=modes,
        dots=dict(dtype=dtype, interpret=interpret),
        v_tiles=[pl.ds(j * bv, bv) for j in range(Vp // bv)],
        tiled=nk > 1 or bv < Vp,
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=grid,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_output",
        poison=poison,
    )
    dq, dk = outs.pop(0), outs.pop(0).reshape(B, L, H, Kp)
    dg = outs.pop(0) if decay else None
    if dg is not None and nk > 1:
        dg = jnp.sum(dg, axis=0)
    if with_dv_out:
        return dq, dk, dg, outs.pop(0).reshape(B, H, L, Vp)
    return dq, dk, dg
