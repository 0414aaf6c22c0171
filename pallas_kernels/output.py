"""Stage 3 of the forward: outputs per token chunk (SPEC §2.4, §2.7.4), chunk-parallel.

For token chunk ``J`` (64 tokens ``r``) of one (batch, head, value tile)::

    G, seg  = within-chunk cumsum of the token log-gate (-inf = reset)
    gam_r   = exp(G_r) if seg_r == 0 else 0
    Gam_rs  = exp(G_r - G_s) if s <= r and seg_r == seg_s else 0         causal incl. diagonal
    o       = scale * [ diag(gam) Q h[J]  +  sum_j ((Q K_j^T) * Gam) V_new_j ]

where ``K_j`` / ``V_new_j`` are the rows ``t * n_h + j`` of the chunk (sub-step ``j`` of each
token, read with a stride of ``n_h`` rows): token ``r`` sees all ``n_h`` sub-steps of itself and of
earlier tokens. Queries are read at token level; nothing is zero-padded to the interleaved axis.
Without decay ``gam = 1`` and ``Gam`` is the causal mask.

Grid ``(Vp / BV, NT, H, B)`` (the Triton lowering folds it to 3-D); defaults ``BV = 64``, 4 warps
(fastest of the variants tried on an H100, docs/BENCHMARKS.md).
Reads  ``q [B, T, H, Kp]`` (64 x Kp block), ``k`` viewed as ``[B, T, n_h, H, Kp]`` (64 x n_h x Kp),
``v_new`` viewed as ``[B, H, T, n_h, Vp]`` (64 x n_h x BV), ``h [B, H, NT, Kp, Vp]`` (Kp x BV) and,
with decay, the token log-gate ``[B, H, T]`` fp32.
Writes ``o [B, T, H, Vp]`` (q.dtype, 64 x BV). Products: input-dtype operands with fp32
accumulation, except that the fp32 masked scores are split into two 16-bit halves before they
multiply ``v_new`` (their 16-bit rounding was the largest error term); IEEE fp32 for fp32 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import CHUNK, DotMode, mm, pallas_call, segment_cumsum


def _kernel(
    *refs,
    n: int,
    scale: float,
    decay: bool,
    dot: DotMode,
    score_dot: DotMode,
    dtype,
    interpret: bool,
):
    q_ref, k_ref, vnew_ref, h_ref = refs[:4]
    gate_ref = refs[4] if decay else None
    o_ref = refs[-1]

    c = CHUNK
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = rows >= cols
    q = q_ref[...]
    if decay:
        g_cum, seg, _, _ = segment_cumsum(gate_ref[...])
        visible = causal & (seg[:, None] == seg[None, :])
        diff = jnp.where(visible, g_cum[:, None] - g_cum[None, :], 0.0)
        gam_mat = jnp.where(visible, jnp.exp(diff), 0.0)
        gam = jnp.where(seg == 0.0, jnp.exp(g_cum), 0.0)
        q_state = q.astype(jnp.float32) * gam[:, None]
    else:
        q_state = q
    o = mm(q_state, h_ref[...], dot, dtype=dtype, interpret=interpret)
    for j in range(n):
        scores = mm(q, k_ref[:, j, :], dot, dtype=dtype, interpret=interpret, trans_b=True)
        scores = scores * gam_mat if decay else jnp.where(causal, scores, 0.0)
        o = o + mm(scores, vnew_ref[:, j, :], score_dot, dtype=dtype, interpret=interpret)
    o_ref[...] = (o * scale).astype(o_ref.dtype)


def output(
    q: jax.Array,
    k: jax.Array,
    vnew: jax.Array,
    h: jax.Array,
    gate: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    block_v: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Run stage 3.

    Args:
      q: ``[B, T, H, Kp]`` padded queries (``T % 64 == 0``); k: ``[B, T*n_h, H, Kp]``;
        vnew: ``[B, H, T*n_h, Vp]`` and h: ``[B, H, T/64, Kp, Vp]`` from ``state_pass``;
        gate: ``[B, H, T]`` fp32 token log-gate (``-inf`` = reset) or None.
      block_v: value tile ``BV`` (power of two dividing ``Vp``).

    Returns:
      ``o [B, T, H, Vp]`` in q.dtype.
    """
    B, T, H, Kp = q.shape
    Vp = vnew.shape[-1]
    n = num_householder
    NT = T // CHUNK
    bv = min(block_v, Vp)
    dtype = q.dtype
    dot = DotMode.IEEE if dtype == jnp.float32 else DotMode.INPUT
    decay = gate is not None

    inputs = [q, k.reshape(B, T, n, H, Kp), vnew.reshape(B, H, T, n, Vp), h]
    in_specs = [
        pl.BlockSpec((None, CHUNK, None, Kp), lambda i, t, hh, b: (b, t, hh, 0)),
        pl.BlockSpec((None, CHUNK, n, None, Kp), lambda i, t, hh, b: (b, t, 0, hh, 0)),
        pl.BlockSpec((None, None, CHUNK, n, bv), lambda i, t, hh, b: (b, hh, t, 0, i)),
        pl.BlockSpec((None, None, None, Kp, bv), lambda i, t, hh, b: (b, hh, t, 0, i)),
    ]
    if decay:
        inputs.append(gate)
        in_specs.append(pl.BlockSpec((None, None, CHUNK), lambda i, t, hh, b: (b, hh, t)))
    score_dot = DotMode.IEEE if dtype == jnp.float32 else DotMode.SPLIT_A
    kernel = functools.partial(
        _kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        dot=dot,
        score_dot=score_dot,
        dtype=dtype,
        interpret=interpret,
    )
    (o,) = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=[jax.ShapeDtypeStruct((B, T, H, Vp), dtype)],
        out_specs=[pl.BlockSpec((None, CHUNK, None, bv), lambda i, t, hh, b: (b, t, hh, i))],
        grid=(Vp // bv, NT, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_output",
        poison=poison,
    )
    return o
