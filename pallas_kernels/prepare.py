"""Stage 1 of the forward: the intra-chunk UT transform (SPEC §2.2, §2.7.2), chunk-parallel.

Per interleaved chunk of ``C = 64`` sub-steps (rows ``r``) of one (batch, head)::

    G, seg   = within-chunk cumsum of the interleaved log-gate; -inf entries are resets
    E_ij     = exp(G_i - G_j) if seg_i == seg_j else 0              (i > j)
    M        = strict_lower(diag(beta) K K^T * E)                    [C, C] fp32
    A        = (I + M)^-1                                            [C, C] fp32, unit lower
    gam_r    = exp(G_r) if seg_r == 0 else 0                         decay from the chunk start
    fdec_r   = exp(G_end - G_r) if seg_r == seg_end else 0           decay to the chunk end

Ungated calls without resets skip every gate term (``decay=False``: gam = fdec = 1). The WY
factors ``W = A diag(beta gam) K`` and ``U = A diag(beta) V`` are never stored: the state pass
applies ``A`` to ``diag(beta)(V - diag(gam) K S)`` directly, which is more accurate (no 16-bit
rounding of ``W`` and ``U``, whose difference ``U - W S`` cancels) and moves fewer bytes (``A`` is
64 fp32 per row against ``K + V`` 16-bit values for ``W`` and ``U``); ``factors`` forms them
anyway from the stored ``A`` for the state passes' stored-factor options.

The inverse (default, ``blocked=True``), by 16x16 blocks as FLA's ``solve_tril``: Triton cannot
slice values, so ``M`` is computed whole (one 64x64x``Kp`` product), parked in the output
block ``A`` (global memory, a barrier), and read back by blocks and rows through ref slices.
The four diagonal blocks are inverted by a 15-step forward substitution on 16x16 values (each
step loads one row of ``M`` and does one warp-local reduction per block); the off-diagonal
blocks follow from two levels of block-triangular inverses (``A_10 = -A_11 M_10 A_00``, then the
lower-left 32x32 block ``-A_hi M_lo A_lo``), sixteen 16x16x16 products in exact fp32 (FMA; TF32
or three bf16 products on request), and ``A`` is stored by blocks over ``M``. Everything is
exact fp32 but the 16-bit ``K K^T`` products. ``blocked=False`` keeps the previous kernel: a
16-step masked substitution on the whole 64x64 value (two 64x64 reductions per step) and four
64x64x64 products as three bf16 products each.
No power series in ``M`` itself (entries up to 2 with beta in [0, 2] would overflow).

Grid ``(NC, H, B)`` with ``NC = L_pad / 64``; one program per (chunk, head, batch), 4 warps
(130 registers, no spills, for sm_90 by ptxas; the previous kernel took 204).
Reads  ``k [B, L, H, Kp]``, ``beta [B, L, H]`` (blocks of 64 rows) and, when ``decay``, the
interleaved log-gate ``[B, H, L]`` fp32.
Writes ``A [B, H, L, 64]`` fp32 (row ``r`` of a chunk holds row ``r`` of its inverse) and, when
``decay``, ``gam, fdec [B, H, L]`` fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import CHUNK, DotMode, mm, pallas_call, segment_cumsum

SUB = 16  # block size of the triangular inverse
NB = CHUNK // SUB  # blocks per chunk side


def unit_lower_inverse(m: jax.Array, mode: DotMode, interpret: bool) -> jax.Array:
    """``(I + m)^-1`` for a strictly lower-triangular ``[C, C]`` fp32 value ``m``."""
    c = m.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    same_block = (rows // SUB) == (cols // SUB)
    m_diag = jnp.where(same_block, m, 0.0)
    row_in_block = rows % SUB

    def substitute(i, x):
        # rows p = SUB*a + i of every block at once: x_p <- e_p - sum_c m[p, c] x_c
        sel = row_in_block == i
        coeff = jnp.sum(jnp.where(sel, m_diag, 0.0), axis=0)  # [C]; column c -> its block's row
        update = jnp.sum(coeff[:, None] * x, axis=0)  # x is block diagonal: no mixing of blocks
        return jnp.where(sel & same_block, x - update[None, :], x)

    eye = jnp.where(rows == cols, 1.0, 0.0)
    d = lax.fori_loop(0, SUB, substitute, eye)
    p = -mm(d, jnp.where(same_block, 0.0, m), mode, interpret=interpret)  # -N, nilpotent
    a = d
    levels = (c // SUB).bit_length() - 1  # sum_{k < c/SUB} P^k = prod_l (I + P^(2^l))
    for level in range(levels):
        a = a + mm(p, a, mode, interpret=interpret)
        if level + 1 < levels:
            p = mm(p, p, mode, interpret=interpret)
    return a


def _diag_inverses(m_ref, unroll: int) -> list[jax.Array]:
    """``(I + M_bb)^-1`` for the four diagonal ``[SUB, SUB]`` blocks of the strictly lower
    ``M`` held in ``m_ref``, by forward substitution on all four at once (exact fp32).

    Row ``i`` of ``A = (I + M)^-1`` is ``e_i + sum_c a_c A_c`` with ``a = -M[i, :]`` (zero from
    column ``i`` on), read straight from ``m_ref``. The blocks are built transposed
    (``Z = A^T``: row ``i`` of ``A`` is column ``i`` of ``Z``) so that each step's reduction
    runs along the lanes of one warp, and transposed back by an exact fp32 product with ``I``.
    ``unroll`` steps (1, 3 or 5) make one loop iteration. With one step per iteration Triton
    carries a block in two layouts (a shared-memory conversion, two barriers per step; 3-9 %
    slower on an H100); the fully unrolled 15 steps compiled 6x slower with the pip Triton and,
    gated, did not finish within a minute on the H100 (2026-11-23).
    """
    rows = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0)

    def step(i, zs):
        out = []
        for b, z in enumerate(zs):
            a = -m_ref[b * SUB + i, pl.ds(b * SUB, SUB)]  # [SUB]; zero from column i on
            col = jnp.sum(a[None, :] * z, axis=1)  # A_i - e_i (columns >= i of z are e_c)
            out.append(jnp.where(cols == i, z + col[:, None], z))
        return tuple(out)

    def steps(j, zs):
        for s in range(unroll):
            zs = step(1 + j * unroll + s, zs)
        return zs

    if unroll not in (1, 3, 5):
        raise ValueError(f"unroll must be 1, 3 or 5, got {unroll}")
    zs = lax.fori_loop(0, (SUB - 1) // unroll, steps, (eye,) * NB)
    return [mm(z, eye, DotMode.IEEE, trans_a=True) for z in zs]


def sum_dots(dot, pairs: list) -> jax.Array:
    """``sum_p dot(x_p, y_p)``."""
    out = None
    for x, y in pairs:
        out = dot(x, y) if out is None else out + dot(x, y)
    return out


def _kernel(
    *refs,
    decay: bool,
    factors: str,
    dot: DotMode,
    a_dot: DotMode,
    dtype,
    unroll: int,
    interpret: bool,
):
    k_ref, beta_ref = refs[:2]
    rest = list(refs[2:])
    v_ref = rest.pop(0) if factors == "wu" else None
    gate_ref = rest.pop(0) if decay else None
    a_ref = rest.pop(0)
    gam_ref, fdec_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)
    factor_refs = rest  # W (and U) when asked for

    # M, parked in A's output block to be read back by 16x16 blocks (Triton slices refs only)
    a_ref[...] = _m_matrix(k_ref, beta_ref, gate_ref, gam_ref, fdec_ref, dot, dtype, interpret)
    barrier = (lambda: None) if interpret else pltriton.debug_barrier
    barrier()  # M visible to every thread of the program
    blk = lambda i, j: a_ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)]
    m = {(i, j): blk(i, j) for i in range(NB) for j in range(i)}
    diag = _diag_inverses(a_ref, unroll)
    barrier()  # every read of M done before A overwrites it

    # A by 16x16 blocks (FLA's solve_tril merge), in two levels of block-triangular inverses:
    # 32x32 diagonal blocks A_10 = -A_11 M_10 A_00, A_32 = -A_33 M_32 A_22, then the lower-left
    # 32x32 block -A_hi M_lo A_lo, with A_lo = A[0:32, 0:32], A_hi = A[32:64, 32:64].
    prod = lambda x, y: mm(x, y, a_dot, interpret=interpret)
    a = {(b, b): diag[b] for b in range(NB)}
    for b in (0, 2):
        a[(b + 1, b)] = -prod(a[(b + 1, b + 1)], prod(m[(b + 1, b)], a[(b, b)]))
    t = {  # M_lo A_lo
        (i, j): sum_dots(prod, [(m[(i, c)], a[(c, j)]) for c in range(j, 2)])
        for i in (2, 3)
        for j in (0, 1)
    }
    for i in (2, 3):
        for j in (0, 1):
            a[(i, j)] = -sum_dots(prod, [(a[(i, c)], t[(c, j)]) for c in range(2, i + 1)])
    for (i, j), block in a.items():  # blocks above the diagonal still hold M's zeros
        a_ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)] = block
    if factor_refs:
        barrier()  # every block of A stored
        _store_factors(a_ref, k_ref, v_ref, beta_ref, gam_ref, factor_refs, dtype, interpret)


def _store_factors(a_ref, k_ref, v_ref, beta_ref, gam_ref, factor_refs, dtype, interpret) -> None:
    """``W = (A diag(beta gam)) K`` (and ``U = (A diag(beta)) V``) from the stored ``A``, rounded
    to the input dtype. For 16-bit inputs the fp32 left factor is split into two 16-bit halves
    against the exact 16-bit ``K`` / ``V`` (nearly fp32; 16-bit operands keep the registers
    down); fp32 inputs: IEEE."""
    mode = DotMode.IEEE if dtype == jnp.float32 else DotMode.SPLIT_A
    dots = dict(dtype=dtype, interpret=interpret)
    a = a_ref[...]
    beta = beta_ref[...].astype(jnp.float32)
    coef = beta if gam_ref is None else beta * gam_ref[...]
    w_ref = factor_refs[0]
    w_ref[...] = mm(a * coef[None, :], k_ref[...], mode, **dots).astype(w_ref.dtype)
    if v_ref is not None:
        u_ref = factor_refs[1]
        u_ref[...] = mm(a * beta[None, :], v_ref[...], mode, **dots).astype(u_ref.dtype)


def _m_matrix(k_ref, beta_ref, gate_ref, gam_ref, fdec_ref, dot, dtype, interpret) -> jax.Array:
    """``M = strict_lower(diag(beta) K K^T * E)`` ``[C, C]`` fp32; stores ``gam``/``fdec``."""
    c = CHUNK
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lower = rows > cols
    k = k_ref[...]
    beta = beta_ref[...].astype(jnp.float32)
    kk = mm(k, k, dot, dtype=dtype, interpret=interpret, trans_b=True)  # [C, C]
    if gate_ref is None:
        return jnp.where(lower, beta[:, None] * kk, 0.0)
    g_cum, seg, g_end, seg_end = segment_cumsum(gate_ref[...])
    visible = lower & (seg[:, None] == seg[None, :])
    diff = jnp.where(visible, g_cum[:, None] - g_cum[None, :], 0.0)
    gam_ref[...] = jnp.where(seg == 0.0, jnp.exp(g_cum), 0.0)
    fdec_ref[...] = jnp.where(seg == seg_end, jnp.exp(g_end - g_cum), 0.0)
    return jnp.where(visible, beta[:, None] * kk * jnp.exp(diff), 0.0)


def _dense_kernel(*refs, decay: bool, dot: DotMode, a_dot: DotMode, dtype, interpret: bool):
    """The previous stage 1: the whole 64x64 inverse as values (``unit_lower_inverse``)."""
    k_ref, beta_ref = refs[:2]
    rest = list(refs[2:])
    gate_ref = rest.pop(0) if decay else None
    a_ref = rest.pop(0)
    gam_ref, fdec_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)
    m = _m_matrix(k_ref, beta_ref, gate_ref, gam_ref, fdec_ref, dot, dtype, interpret)
    a_ref[...] = unit_lower_inverse(m, a_dot, interpret)


def prepare(
    k: jax.Array,
    beta: jax.Array,
    gate: jax.Array | None,
    *,
    num_warps: int = 4,
    num_stages: int = 1,
    blocked: bool = True,
    precision: str = "ieee",
    unroll: int = 3,
    v: jax.Array | None = None,
    factors: str = "",
    interpret: bool = False,
    poison: bool = False,
) -> dict[str, jax.Array]:
    """Run stage 1 on padded interleaved inputs.

    Args:
      k: ``[B, L, H, Kp]``, beta: ``[B, L, H]`` with ``L % 64 == 0`` and ``Kp`` a power of two
        ``>= 16``; bf16/fp16/fp32.
      gate: ``[B, H, L]`` fp32 interleaved log-gate (``-inf`` = reset) or None (no decay).
      blocked: the 16x16-block inverse (default) or the previous 64x64 one.
      precision: operands of the fp32 products that build ``A`` from its blocks for 16-bit
        inputs: ``"ieee"`` (fp32 FMA), ``"split3"`` (three bf16 products) or ``"tf32"``;
        fp32 inputs always use ``"ieee"``.
      unroll: substitution steps per loop iteration for the diagonal blocks (1, 3 or 5).
      factors: also the WY factors from the stored ``A`` (blocked kernel only): ``"w"`` for
        ``W = A diag(beta gam) K``, ``"wu"`` also ``U = A diag(beta) V`` (``v [B, L, H, Vp]``
        needed); ``""`` (default) neither.

    Returns:
      dict with ``a [B, H, L, 64]`` fp32 and, when ``gate`` is given, ``gam``, ``fdec``
      ``[B, H, L]`` fp32; with ``factors``, ``w [B, H, L, Kp]`` (and ``u [B, H, L, Vp]``) in
      k.dtype.
    """
    if factors not in ("", "w", "wu"):
        raise ValueError(f"factors must be '', 'w' or 'wu', got {factors!r}")
    if factors and not blocked:
        raise ValueError("factors need the blocked inverse (blocked=True)")
    if (factors == "wu") != (v is not None):
        raise ValueError(f"v is needed exactly when factors == 'wu' (factors={factors!r})")
    B, L, H, Kp = k.shape
    NC = L // CHUNK
    precise = k.dtype == jnp.float32
    decay = gate is not None

    head_vec = pl.BlockSpec((None, None, CHUNK), lambda c, h, b: (b, h, c))
    inputs = [k, beta]
    in_specs = [
        pl.BlockSpec((None, CHUNK, None, Kp), lambda c, h, b: (b, c, h, 0)),
        pl.BlockSpec((None, CHUNK, None), lambda c, h, b: (b, c, h)),
    ]
    if v is not None:
        inputs.append(v)
        in_specs.append(
            pl.BlockSpec((None, CHUNK, None, v.shape[-1]), lambda c, h, b: (b, c, h, 0))
        )
    if decay:
        inputs.append(gate)
        in_specs.append(head_vec)
    out_shapes = [jax.ShapeDtypeStruct((B, H, L, CHUNK), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, CHUNK, CHUNK), lambda c, h, b: (b, h, c, 0))]
    names = ["a"]
    if decay:
        out_shapes += [jax.ShapeDtypeStruct((B, H, L), jnp.float32)] * 2
        out_specs += [head_vec, head_vec]
        names += ["gam", "fdec"]
    for name, x in (("w", k), ("u", v))[: len(factors)]:
        out_shapes.append(jax.ShapeDtypeStruct((B, H, L, x.shape[-1]), k.dtype))
        out_specs.append(
            pl.BlockSpec((None, None, CHUNK, x.shape[-1]), lambda c, h, b: (b, h, c, 0))
        )
        names.append(name)
    if blocked:
        a_dot = DotMode.IEEE if precise else DotMode(precision)
        body = functools.partial(_kernel, unroll=unroll, factors=factors)
    else:
        a_dot = DotMode.IEEE if precise else DotMode.SPLIT3
        body = _dense_kernel
    kernel = functools.partial(
        body,
        decay=decay,
        dot=DotMode.IEEE if precise else DotMode.INPUT,
        a_dot=a_dot,
        dtype=k.dtype,
        interpret=interpret,
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NC, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_prepare",
        poison=poison,
    )
    return dict(zip(names, outs, strict=True))
