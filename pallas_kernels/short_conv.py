"""The backward of the causal depthwise short convolution + SiLU, in one pass over the tokens.

Forward (``dpjax.nn.conv.ShortConv``; kernel width ``W``, per channel ``c``)::

    z_t = b + sum_{i<W} w[W-1-i] x_{t-i} [same(t-i, t)]      y_t = SiLU(z_t)

with ``same(u, t)``: ``u >= 0`` and tokens ``u`` and ``t`` in one document (segment ids equal).
Given ``dy``, with ``dz_t = dy_t SiLU'(z_t)``::

    dx_u     = sum_{i<W} w[W-1-i] dz_{u+i} [same(u, u+i)]
    dw[W-1-i] = sum_{b,t} x_{t-i} dz_t [same(t-i, t)]      db = sum_{b,t} dz_t

Autodiff of the forward makes XLA write ``dz`` in fp32 and read it back in a separate reduction
(on the 392M language models these fusions were ≈ 10 % of the train step). This kernel reads
``x`` and ``dy`` once, writes ``dx`` once and per-program partial sums of ``dw``, ``db`` (summed in
JAX); all sums in fp32.

Grid ``(cdiv(T, R L), C / BC, B)``: each program owns ``R`` stretches of ``L`` tokens (``rows``,
``seg_len``) of ``BC`` channels of one row, walked together one token at a time: step ``j``
handles token ``j`` of every stretch as one ``[R, BC]`` block. The last ``W-1`` values of ``x``
and ``dz`` slide along in registers, so ``z`` and ``dz`` are computed once per token; ``dx`` of
token ``t - (W-1)`` is written at step ``t`` (once its ``dz`` window is complete), and each
stretch reads the ``W-1`` tokens before its start and runs ``W-1`` steps past its end (its
neighbours' tokens, from the caches). The loads of token ``t + ahead`` are issued before token
``t``'s arithmetic (Triton pipelines only loads that feed a dot). A first, tiled layout that
recomputed ``z`` and ``dz`` at every shift a tile needed was 3x slower on an H100
(docs/DESIGN_DECISIONS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import next_pow2, pallas_call

MAX_BLOCK_C = 128


def channel_block(channels: int, most: int = MAX_BLOCK_C) -> int | None:
    """The channel tile: the largest power of two ``<= most`` dividing ``channels`` (at least
    16), or None when there is none (the kernel does not serve such channel counts)."""
    block = most
    while block >= 16:
        if channels % block == 0:
            return block
        block //= 2
    return None


def _kernel(
    *refs,
    width: int,
    tokens: int,
    rows: int,
    seg_len: int,
    ahead: int,
    has_bias: bool,
    has_seg: bool,
):
    x_ref, dy_ref, w_ref = refs[:3]
    rest = list(refs[3:])
    b_ref = rest.pop(0) if has_bias else None
    seg_ref = rest.pop(0) if has_seg else None
    dx_ref, dw_ref, db_ref = rest

    w = w_ref[...].astype(jnp.float32)  # [Wp, BC]
    slot = jnp.arange(w.shape[0], dtype=jnp.int32)[:, None]
    taps = [jnp.sum(jnp.where(slot == width - 1 - i, w, 0.0), axis=0) for i in range(width)]
    bias = b_ref[...].astype(jnp.float32) if has_bias else None
    span = rows * seg_len
    local = jnp.arange(rows, dtype=jnp.int32) * seg_len  # [R] row starts in this program's dx
    starts = pl.program_id(0) * span + local  # [R] their tokens
    block = (rows, w.shape[1])

    def read(j) -> tuple:
        """x, dy at token ``starts + j`` of every row ([R, BC], input dtype, 0 outside
        ``[0, T)``) and its document id ([R] int32; None without segment ids)."""
        t = starts + j
        inside = ((t >= 0) & (t < tokens))[:, None]
        idx = jnp.clip(t, 0, tokens - 1)
        x = jnp.where(inside, x_ref[idx, :], 0)
        dy = jnp.where(inside, dy_ref[idx, :], 0)
        return x, dy, (seg_ref[idx] if has_seg else None)

    lag = width - 1
    # Documents: bit k of ``links`` ([R] int32) says token t-k continues the document of token
    # t-k-1 (k < W-1). Token t-i is in t's document iff bits 0..i-1 are set; token u = t-(W-1)
    # and u+i are iff bits W-1-i..W-2 are. The comparisons run on [R] values, and one [R] -> [R,
    # BC] broadcast per token moves them to the layout of x (each broadcast of a 1-D value is a
    # layout conversion through shared memory, with barriers).
    run_masks = [(1 << i) - 1 for i in range(width)]  # token t-i linked to t
    out_masks = [((1 << i) - 1) << (lag - i) for i in range(width)]  # u linked to u+i

    def keep(links, mask: int, value: jax.Array) -> jax.Array:
        """``value`` where every link of ``mask`` holds, else 0 (no ids: always ``value``)."""
        return value if links is None or mask == 0 else jnp.where(links & mask == mask, value, 0.0)

    def step(j, carry, accumulate: bool, store: bool):
        """Token ``t = starts + j``: its ``dz``; ``dw, db`` terms (``accumulate``); ``dx`` of
        token ``t - (W-1)``, whose ``dz`` window is complete now (``store``)."""
        pending, xs, dzs, doc_prev, links, dw, db = carry
        x_now, dy_now, doc_now = pending[0]
        # token t + ahead's reads are issued before this token's arithmetic (latency hiding)
        pending = (*pending[1:], read(j + ahead))
        x_now = x_now.astype(jnp.float32)
        links2 = None
        if has_seg:
            links = ((links << 1) | (doc_now == doc_prev).astype(jnp.int32)) & ((1 << lag) - 1)
            links2 = jnp.broadcast_to(links[:, None], block)
        # xs[i-1] = x at t - i (i = 1 .. W-1)
        seen = [x_now] + [keep(links2, run_masks[i], xs[i - 1]) for i in range(1, width)]
        z = seen[0] * taps[0]
        for i in range(1, width):
            z = z + seen[i] * taps[i]
        if bias is not None:
            z = z + bias[None, :]
        sig = jax.nn.sigmoid(z)
        dz = dy_now.astype(jnp.float32) * sig * (1.0 + z * (1.0 - sig))
        if accumulate:
            dw = tuple(dw[i] + seen[i] * dz for i in range(width))
            db = db + dz
        dz_win = [dz, *dzs]  # dz at t, t-1, .., t-W+1
        if store:  # dx at u = t - (W-1): sum_i tap_i dz(u + i), same document
            dx = dz_win[lag] * taps[0]
            for i in range(1, width):
                dx = dx + keep(links2, out_masks[i], dz_win[lag - i]) * taps[i]
            dx_ref[local + j - lag, :] = dx.astype(dx_ref.dtype)
        xs = (x_now, *xs[:-1]) if width > 1 else xs
        return pending, xs, tuple(dz_win[:lag]), doc_now, links, dw, db

    # the W-1 tokens before each row's first: the x window and the links between them
    before = [read(-i) for i in range(1, width)]  # tokens start-1, .., start-(W-1)
    links = doc_prev = None
    if has_seg:
        doc_prev = before[0][2] if width > 1 else seg_ref[jnp.clip(starts - 1, 0, tokens - 1)]
        links = jnp.zeros((rows,), jnp.int32)
        for k in range(1, lag):  # bit k-1 before step 0 = link of token start-k
            links = links | ((before[k - 1][2] == before[k][2]).astype(jnp.int32) << (k - 1))
    zero = jnp.zeros(block, jnp.float32)
    carry = (
        tuple(read(j) for j in range(ahead)),
        tuple(b[0].astype(jnp.float32) for b in before),
        tuple(zero for _ in range(lag)),
        doc_prev,
        links,
        tuple(zero for _ in range(width)),
        zero,
    )
    # one body in phases: [0, lag) accumulate only, [lag, L) both, [L, L + lag) store only
    # (for L < W - 1: [0, L) accumulate, [L, W-1) only advance the windows, then store)
    phases = [
        (0, min(lag, seg_len), True, False),
        (seg_len, lag, False, False),
        (lag, seg_len, True, True),
        (max(seg_len, lag), seg_len + lag, False, True),
    ]
    for lo, hi, acc, st in phases:
        if hi > lo:
            body = functools.partial(step, accumulate=acc, store=st)
            carry = lax.fori_loop(lo, hi, body, carry)
    dw, db = carry[5], carry[6]
    dw_sum = [jnp.sum(d, axis=0) for d in dw]
    dw_ref[...] = sum(
        jnp.where(slot == width - 1 - i, dw_sum[i][None, :], 0.0) for i in range(width)
    )
    db_ref[...] = jnp.sum(db, axis=0)


def short_conv_backward(
    x: jax.Array,
    dy: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    *,
    block_c: int = 64,
    rows: int = 8,
    seg_len: int = 64,
    ahead: int = 1,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``y = SiLU(causal_depthwise_conv(x, kernel) + bias)`` (module doc).

    Args:
      x: ``[B, T, C]`` the convolution's input (any float dtype; padding already zeroed).
      dy: ``[B, T, C]`` the output cotangent.
      kernel: ``[W, C]`` (``kernel[W-1]`` multiplies the current token); bias: ``[C]`` or None.
      segment_ids: ``[B, T]`` int document ids or None (one document per row).
      block_c: channel tile, clipped to ``channel_block(C, block_c)`` (``C`` must have a
        power-of-two divisor >= 16).
      rows, seg_len: stretches per program (a power of two) and their length (the defaults, 8
        x 64 tokens of 64 channels at 4 warps, were the fastest of nine tile choices on an H100
        at B=8, T=4096, C=2048: docs/BENCHMARKS.md); the length is cut to ``cdiv(T, rows)``
        where one program covers the whole row, so short sequences do not walk empty stretches.
      ahead: how many tokens ahead of the one being computed the loads are issued (each one more
        holds another ``[rows, block_c]`` of ``x`` and ``dy`` in registers).

    Returns:
      ``dx [B, T, C]`` (x.dtype), ``dkernel [W, C]`` fp32, ``dbias [C]`` fp32 (None without bias).
    """
    B, T, C = x.shape
    W = kernel.shape[0]
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {x.shape}, got {dy.shape}")
    if kernel.shape != (W, C):
        raise ValueError(f"kernel: expected shape [W, {C}], got {kernel.shape}")
    bc = channel_block(C, block_c)
    if bc is None:
        raise ValueError(f"x: channel count {C} has no power-of-two divisor >= 16")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows: expected a power of two, got {rows}")
    if seg_len < 1:
        raise ValueError(f"seg_len: expected a positive length, got {seg_len}")
    if ahead < 1:
        raise ValueError(f"ahead: expected a positive count, got {ahead}")
    seg_len = max(1, min(seg_len, pl.cdiv(T, rows)))
    span = rows * seg_len
    Wp = next_pow2(W)
    NT = pl.cdiv(T, span)  # programs along T
    w = jnp.pad(kernel.astype(jnp.float32), ((0, Wp - W), (0, 0)))
    has_bias, has_seg = bias is not None, segment_ids is not None

    whole_rows = pl.BlockSpec((None, T, bc), lambda j, c, b: (b, 0, c))
    inputs = [x, dy, w]
    in_specs = [whole_rows, whole_rows, pl.BlockSpec((Wp, bc), lambda j, c, b: (0, c))]
    if has_bias:
        inputs.append(bias.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((bc,), lambda j, c, b: (c,)))
    if has_seg:
        inputs.append(segment_ids.astype(jnp.int32))
        in_specs.append(pl.BlockSpec((None, T), lambda j, c, b: (b, 0)))
    out_shapes = [
        jax.ShapeDtypeStruct((B, NT * span, C), x.dtype),
        jax.ShapeDtypeStruct((B, NT, Wp, C), jnp.float32),
        jax.ShapeDtypeStruct((B, NT, C), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, span, bc), lambda j, c, b: (b, j, c)),
        pl.BlockSpec((None, None, Wp, bc), lambda j, c, b: (b, j, 0, c)),
        pl.BlockSpec((None, None, bc), lambda j, c, b: (b, j, c)),
    ]
    kern = functools.partial(
        _kernel,
        width=W,
        tokens=T,
        rows=rows,
        seg_len=seg_len,
        ahead=ahead,
        has_bias=has_bias,
        has_seg=has_seg,
    )
    dx, dw, db = pallas_call(
        kern,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NT, C // bc, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="short_conv_bwd",
    )
    dw = jnp.sum(dw, axis=(0, 1))[:W]
    return dx[:, :T], dw, (jnp.sum(db, axis=(0, 1)) if has_bias else None)
