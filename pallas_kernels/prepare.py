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
64 fp32 per row against ``K + V`` 16-bit values for ``W`` and ``U``).

The inverse: the four 16x16 diagonal blocks are inverted together by a 16-step masked forward
substitution on the block-diagonal part (Triton cannot slice values, so each step handles rows
``{i, 16+i, 32+i, 48+i}`` of a 64x64 value with masks and two reductions); with ``D`` that
block-diagonal inverse and ``N = D M_off`` (strictly block-lower, ``N^4 = 0``),
``A = (I - N)(I + N^2) D`` takes four 64x64x64 products (each as three bf16 products of split
operands, ~16 mantissa bits, on the GPU; IEEE for fp32 inputs).
No power series in ``M`` itself (entries up to 2 with beta in [0, 2] would overflow).

Grid ``(NC, H, B)`` with ``NC = L_pad / 64``; one program per (chunk, head, batch), 4 warps.
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

from pallas_kernels.common import CHUNK, DotMode, mm, pallas_call, segment_cumsum

SUB = 16  # diagonal block size of the triangular inverse


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


def _kernel(*refs, decay: bool, dot: DotMode, a_dot: DotMode, dtype, interpret: bool):
    k_ref, beta_ref = refs[:2]
    rest = list(refs[2:])
    gate_ref = rest.pop(0) if decay else None
    a_ref = rest.pop(0)
    gam_ref, fdec_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)

    c = CHUNK
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lower = rows > cols
    k = k_ref[...]
    beta = beta_ref[...].astype(jnp.float32)
    kk = mm(k, k, dot, dtype=dtype, interpret=interpret, trans_b=True)  # [C, C]
    if decay:
        g_cum, seg, g_end, seg_end = segment_cumsum(gate_ref[...])
        visible = lower & (seg[:, None] == seg[None, :])
        diff = jnp.where(visible, g_cum[:, None] - g_cum[None, :], 0.0)
        m = jnp.where(visible, beta[:, None] * kk * jnp.exp(diff), 0.0)
        gam_ref[...] = jnp.where(seg == 0.0, jnp.exp(g_cum), 0.0)
        fdec_ref[...] = jnp.where(seg == seg_end, jnp.exp(g_end - g_cum), 0.0)
    else:
        m = jnp.where(lower, beta[:, None] * kk, 0.0)
    a_ref[...] = unit_lower_inverse(m, a_dot, interpret)


def prepare(
    k: jax.Array,
    beta: jax.Array,
    gate: jax.Array | None,
    *,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
    poison: bool = False,
) -> dict[str, jax.Array]:
    """Run stage 1 on padded interleaved inputs.

    Args:
      k: ``[B, L, H, Kp]``, beta: ``[B, L, H]`` with ``L % 64 == 0`` and ``Kp`` a power of two
        ``>= 16``; bf16/fp16/fp32.
      gate: ``[B, H, L]`` fp32 interleaved log-gate (``-inf`` = reset) or None (no decay).

    Returns:
      dict with ``a [B, H, L, 64]`` fp32 and, when ``gate`` is given, ``gam``, ``fdec``
      ``[B, H, L]`` fp32.
    """
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
    kernel = functools.partial(
        _kernel,
        decay=decay,
        dot=DotMode.IEEE if precise else DotMode.INPUT,
        a_dot=DotMode.IEEE if precise else DotMode.SPLIT3,
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
