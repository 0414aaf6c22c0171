"""The causal depthwise short convolution + SiLU in one pass over the tokens: forward and backward.

Forward (``dpjax.nn.conv.ShortConv``; kernel width ``W``, per channel ``c``)::

    z_t = b + sum_{i<W} w[W-1-i] x_{t-i} [same(t-i, t)]      y_t = SiLU(z_t)

with ``same(u, t)``: ``u >= 0`` and tokens ``u`` and ``t`` in one document (segment ids equal).
Given ``dy``, with ``dz_t = dy_t SiLU'(z_t)``::

    dx_u     = sum_{i<W} w[W-1-i] dz_{u+i} [same(u, u+i)]
    dw[W-1-i] = sum_{b,t} x_{t-i} dz_t [same(t-i, t)]      db = sum_{b,t} dz_t

Autodiff of the forward makes XLA write ``dz`` in fp32 and read it back in a separate reduction
(on the 392M language models these fusions were ≈ 10 % of the train step). ``short_conv_backward``
reads ``x`` and ``dy`` once, writes ``dx`` once and per-program partial sums of ``dw``, ``db``
(summed in JAX); ``short_conv_forward`` reads ``x`` once and writes ``y`` once. All sums in fp32.

Grid ``(cdiv(T, R L), C / BC, B)``: each program owns ``R`` stretches of ``L`` tokens (``rows``,
``seg_len``) of ``BC`` channels of one row, walked together one token at a time: step ``j``
handles token ``j`` of every stretch as one ``[R, BC]`` block. The last ``W-1`` values of ``x``
(and in the backward of ``dz``) slide along in registers, so ``z`` and ``dz`` are computed once
per token; the backward writes ``dx`` of token ``t - (W-1)`` at step ``t`` (once its ``dz`` window
is complete). A stretch reads the ``W-1`` tokens before its start (and the backward runs ``W-1``
steps past its end): its neighbours' tokens, from the caches. The loads of token ``t + ahead``
are issued before token ``t``'s arithmetic (Triton pipelines only loads that feed a dot). A
first, tiled backward that recomputed ``z`` and ``dz`` at every shift a tile needed was 3x
slower on an H100 (docs/DESIGN_DECISIONS.md).

Tiles (both functions): ``block_c`` channels, clipped to ``channel_block(C, block_c)`` (``C``
must have a power-of-two divisor >= 16); ``rows`` stretches (a power of two) of ``seg_len``
tokens per program, the length cut to ``cdiv(T, rows)`` where one program covers the whole row
(short sequences walk no empty stretches); loads issued ``ahead`` tokens early (each one more
holds another ``[rows, block_c]`` block of each input in registers). The defaults, 8 x 64 tokens
of 64 channels at 4 warps, were the fastest of nine tile choices for the backward on an H100 at
B=8, T=4096, C=2048 (docs/BENCHMARKS.md); ``num_warps`` defaults to 4 per 64 channels of the tile
(the same registers per thread: 128 channels at 4 warps take 226 in the backward, 128 at 8).

``norm_group`` (the mixer's q and k) L2-normalises each group of that many channels after the
SiLU: the group is the channel tile, so the norm is a per-token reduction inside the program;
the backward turns the normalised output's cotangent into ``dy`` there
(``r (g - y_hat <y_hat, g>)``, ``r = 1 / sqrt(sum y^2 + eps)``) before ``dz``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import next_pow2, pallas_call

MAX_BLOCK_C = 128


def channel_block(
    channels: int, most: int = MAX_BLOCK_C, norm_group: int | None = None
) -> int | None:
    """The channel tile: the largest power of two ``<= most`` dividing ``channels`` (at least
    16); with ``norm_group`` the group itself if it is such a divisor (``most`` ignored). None
    when there is none (the kernels do not serve such channel counts or groups)."""
    if norm_group is not None:
        valid = norm_group >= 16 and not norm_group & (norm_group - 1)
        return norm_group if valid and channels % norm_group == 0 else None
    block = most
    while block >= 16:
        if channels % block == 0:
            return block
        block //= 2
    return None


# ---------------------------------------------------------------------------------------------
# pieces both kernels use inside a program


def _taps(w_ref, width: int) -> tuple[list[jax.Array], jax.Array]:
    """``taps[i] = w[W-1-i]`` as ``[BC]`` fp32 rows of the padded ``[Wp, BC]`` kernel block,
    and the slot index ``[Wp, 1]``."""
    w = w_ref[...].astype(jnp.float32)
    slot = jnp.arange(w.shape[0], dtype=jnp.int32)[:, None]
    return [jnp.sum(jnp.where(slot == width - 1 - i, w, 0.0), axis=0) for i in range(width)], slot


def _stretch_starts(rows: int, seg_len: int) -> tuple[jax.Array, jax.Array]:
    """``(local, starts)`` ``[R]``: the stretches' first rows in this program's output block and
    their tokens."""
    local = jnp.arange(rows, dtype=jnp.int32) * seg_len
    return local, pl.program_id(0) * rows * seg_len + local


def _reader(refs: list, seg_ref, starts: jax.Array, tokens: int) -> Callable:
    """``read(j) -> (values, doc)``: each ref of ``refs`` at token ``starts + j`` of every
    stretch (``[R, BC]``, its dtype, 0 outside ``[0, T)``) and the document ids (``[R]`` int32;
    None without segment ids)."""

    def read(j) -> tuple:
        t = starts + j
        inside = ((t >= 0) & (t < tokens))[:, None]
        idx = jnp.clip(t, 0, tokens - 1)
        values = tuple(jnp.where(inside, ref[idx, :], 0) for ref in refs)
        return values, (seg_ref[idx] if seg_ref is not None else None)

    return read


# Documents: bit k of ``links`` ([R] int32) says token t-k continues the document of token t-k-1
# (k < W-1). Token t-i is in t's document iff bits 0..i-1 are set; token u = t-(W-1) and u+i are
# iff bits W-1-i..W-2 are. The comparisons run on [R] values, and one [R] -> [R, BC] broadcast per
# token moves them to the layout of x (each broadcast of a 1-D value is a layout conversion
# through shared memory, with barriers).


def _run_mask(i: int) -> int:
    """Links that put token ``t - i`` in token ``t``'s document."""
    return (1 << i) - 1


def _out_mask(i: int, lag: int) -> int:
    """Links that put token ``u + i`` in token ``u = t - lag``'s document."""
    return ((1 << i) - 1) << (lag - i)


def _keep(links2: jax.Array | None, mask: int, value: jax.Array) -> jax.Array:
    """``value`` where every link of ``mask`` holds, else 0 (no ids: always ``value``)."""
    if links2 is None or mask == 0:
        return value
    return jnp.where(links2 & mask == mask, value, 0.0)


def _advance_links(links, doc_prev, doc_now, lag: int, block: tuple) -> tuple:
    """``(links, links as [R, BC])`` after token ``t`` (None, None without segment ids)."""
    if doc_now is None:
        return None, None
    links = ((links << 1) | (doc_now == doc_prev).astype(jnp.int32)) & ((1 << lag) - 1)
    return links, jnp.broadcast_to(links[:, None], block)


def _window_start(read: Callable, seg_ref, starts, tokens: int, width: int) -> tuple:
    """Before each stretch's first token: the ``W-1`` previous ``x`` (fp32, newest first), the
    previous token's document and the links between the previous tokens."""
    lag = width - 1
    before = [read(-i) for i in range(1, width)]  # tokens start-1, .., start-(W-1)
    xs = tuple(values[0].astype(jnp.float32) for values, _ in before)
    if seg_ref is None:
        return xs, None, None
    doc_prev = before[0][1] if width > 1 else seg_ref[jnp.clip(starts - 1, 0, tokens - 1)]
    links = jnp.zeros(starts.shape, jnp.int32)
    for k in range(1, lag):  # bit k-1 before step 0 = link of token start-k
        links = links | ((before[k - 1][1] == before[k][1]).astype(jnp.int32) << (k - 1))
    return xs, doc_prev, links


def _pre_activation(x_now, xs, links2, taps, bias) -> tuple[jax.Array, list[jax.Array]]:
    """``z`` ``[R, BC]`` fp32 at token ``t`` and the inputs each tap saw (0 across documents)."""
    seen = [x_now] + [_keep(links2, _run_mask(i), xs[i - 1]) for i in range(1, len(taps))]
    z = seen[0] * taps[0]
    for i in range(1, len(taps)):
        z = z + seen[i] * taps[i]
    if bias is not None:
        z = z + bias[None, :]
    return z, seen


def _inverse_norm(y: jax.Array, eps: float) -> jax.Array:
    """``1 / sqrt(sum(y^2) + eps)`` over the channels of each row of ``y [R, BC]`` -> ``[R, 1]``."""
    return lax.rsqrt(jnp.sum(y * y, axis=1, keepdims=True) + eps)


# ---------------------------------------------------------------------------------------------
# kernels


def _unpack(refs: tuple, n_in: int, has_bias: bool, has_seg: bool) -> tuple:
    """``(inputs..., w, bias | None, seg | None, outputs...)`` from a kernel's refs, whose
    first ``n_in`` are the token inputs (``x``; ``x, dy``)."""
    rest = list(refs[n_in + 1 :])
    b_ref = rest.pop(0) if has_bias else None
    seg_ref = rest.pop(0) if has_seg else None
    return (*refs[: n_in + 1], b_ref, seg_ref, *rest)


def _forward_kernel(
    *refs,
    width: int,
    tokens: int,
    rows: int,
    seg_len: int,
    ahead: int,
    has_bias: bool,
    has_seg: bool,
    norm_eps: float | None,
):
    x_ref, w_ref, b_ref, seg_ref, y_ref = _unpack(refs, 1, has_bias, has_seg)
    taps, _ = _taps(w_ref, width)
    bias = b_ref[...].astype(jnp.float32) if has_bias else None
    local, starts = _stretch_starts(rows, seg_len)
    block = (rows, taps[0].shape[0])
    read = _reader([x_ref], seg_ref, starts, tokens)
    lag = width - 1

    def step(j, carry):
        pending, xs, doc_prev, links = carry
        (x_now,), doc_now = pending[0]
        pending = (*pending[1:], read(j + ahead))  # issued before this token's arithmetic
        x_now = x_now.astype(jnp.float32)
        links, links2 = _advance_links(links, doc_prev, doc_now, lag, block)
        z, _ = _pre_activation(x_now, xs, links2, taps, bias)
        y = z * jax.nn.sigmoid(z)
        if norm_eps is not None:
            y = y * _inverse_norm(y, norm_eps)
        y_ref[local + j, :] = y.astype(y_ref.dtype)
        xs = (x_now, *xs[:-1]) if width > 1 else xs
        return pending, xs, doc_now, links

    xs, doc_prev, links = _window_start(read, seg_ref, starts, tokens, width)
    carry = (tuple(read(j) for j in range(ahead)), xs, doc_prev, links)
    lax.fori_loop(0, seg_len, step, carry)


def _backward_kernel(
    *refs,
    width: int,
    tokens: int,
    rows: int,
    seg_len: int,
    ahead: int,
    has_bias: bool,
    has_seg: bool,
    norm_eps: float | None,
):
    x_ref, dy_ref, w_ref, b_ref, seg_ref, dx_ref, dw_ref, db_ref = _unpack(
        refs, 2, has_bias, has_seg
    )
    taps, slot = _taps(w_ref, width)
    bias = b_ref[...].astype(jnp.float32) if has_bias else None
    local, starts = _stretch_starts(rows, seg_len)
    block = (rows, taps[0].shape[0])
    read = _reader([x_ref, dy_ref], seg_ref, starts, tokens)
    lag = width - 1

    def step(j, carry, accumulate: bool, store: bool):
        """Token ``t = starts + j``: its ``dz``; ``dw, db`` terms (``accumulate``); ``dx`` of
        token ``t - (W-1)``, whose ``dz`` window is complete now (``store``)."""
        pending, xs, dzs, doc_prev, links, dw, db = carry
        (x_now, dy_now), doc_now = pending[0]
        pending = (*pending[1:], read(j + ahead))  # issued before this token's arithmetic
        x_now = x_now.astype(jnp.float32)
        links, links2 = _advance_links(links, doc_prev, doc_now, lag, block)
        z, seen = _pre_activation(x_now, xs, links2, taps, bias)
        sig = jax.nn.sigmoid(z)
        dy_now = dy_now.astype(jnp.float32)
        if norm_eps is not None:  # dy_now is the normalised output's cotangent
            y = z * sig
            r = _inverse_norm(y, norm_eps)
            y_hat = y * r
            dy_now = r * (dy_now - y_hat * jnp.sum(y_hat * dy_now, axis=1, keepdims=True))
        dz = dy_now * sig * (1.0 + z * (1.0 - sig))
        if accumulate:
            dw = tuple(dw[i] + seen[i] * dz for i in range(width))
            db = db + dz
        dz_win = [dz, *dzs]  # dz at t, t-1, .., t-W+1
        if store:  # dx at u = t - (W-1): sum_i tap_i dz(u + i), same document
            dx = dz_win[lag] * taps[0]
            for i in range(1, width):
                dx = dx + _keep(links2, _out_mask(i, lag), dz_win[lag - i]) * taps[i]
            dx_ref[local + j - lag, :] = dx.astype(dx_ref.dtype)
        xs = (x_now, *xs[:-1]) if width > 1 else xs
        return pending, xs, tuple(dz_win[:lag]), doc_now, links, dw, db

    xs, doc_prev, links = _window_start(read, seg_ref, starts, tokens, width)
    zero = jnp.zeros(block, jnp.float32)
    carry = (
        tuple(read(j) for j in range(ahead)),
        xs,
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


# ---------------------------------------------------------------------------------------------
# wrappers


def _launch(
    kernel_fn: Callable,
    tokens_in: list[jax.Array],
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    out_dtypes: list,
    sums: bool,
    *,
    norm_group: int | None,
    norm_eps: float,
    block_c: int,
    rows: int,
    seg_len: int,
    ahead: int,
    num_warps: int | None,
    num_stages: int,
    interpret: bool,
    name: str,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Check the arguments, lay out the grid and run ``kernel_fn``: ``([B, T, C]`` outputs of
    ``out_dtypes``, and with ``sums`` the ``[B, NT, Wp, C]``, ``[B, NT, C]`` fp32 partial sums)."""
    x = tokens_in[0]
    B, T, C = x.shape
    W = kernel.shape[0]
    if kernel.shape != (W, C):
        raise ValueError(f"kernel: expected shape [W, {C}], got {kernel.shape}")
    bc = channel_block(C, block_c, norm_group)
    if bc is None and norm_group is None:
        raise ValueError(f"x: channel count {C} has no power-of-two divisor >= 16")
    if bc is None:
        raise ValueError(
            f"norm_group: expected a power of two >= 16 dividing the {C} channels, got {norm_group}"
        )
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
    has_bias, has_seg = bias is not None, segment_ids is not None

    whole_rows = pl.BlockSpec((None, T, bc), lambda j, c, b: (b, 0, c))
    inputs = [*tokens_in, jnp.pad(kernel.astype(jnp.float32), ((0, Wp - W), (0, 0)))]
    in_specs = [whole_rows] * len(tokens_in) + [pl.BlockSpec((Wp, bc), lambda j, c, b: (0, c))]
    if has_bias:
        inputs.append(bias.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((bc,), lambda j, c, b: (c,)))
    if has_seg:
        inputs.append(segment_ids.astype(jnp.int32))
        in_specs.append(pl.BlockSpec((None, T), lambda j, c, b: (b, 0)))
    out_shapes = [jax.ShapeDtypeStruct((B, NT * span, C), d) for d in out_dtypes]
    out_specs = [pl.BlockSpec((None, span, bc), lambda j, c, b: (b, j, c)) for _ in out_dtypes]
    if sums:
        out_shapes += [
            jax.ShapeDtypeStruct((B, NT, Wp, C), jnp.float32),
            jax.ShapeDtypeStruct((B, NT, C), jnp.float32),
        ]
        out_specs += [
            pl.BlockSpec((None, None, Wp, bc), lambda j, c, b: (b, j, 0, c)),
            pl.BlockSpec((None, None, bc), lambda j, c, b: (b, j, c)),
        ]
    kern = functools.partial(
        kernel_fn,
        width=W,
        tokens=T,
        rows=rows,
        seg_len=seg_len,
        ahead=ahead,
        has_bias=has_bias,
        has_seg=has_seg,
        norm_eps=None if norm_group is None else norm_eps,
    )
    outs = pallas_call(
        kern,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NT, C // bc, B),
        num_warps=num_warps or 4 * max(1, bc // 64),
        num_stages=num_stages,
        interpret=interpret,
        name=name,
    )
    n = len(out_dtypes)
    return [o[:, :T] for o in outs[:n]], list(outs[n:])


def short_conv_forward(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    out_dtype: jnp.dtype,
    *,
    norm_group: int | None = None,
    norm_eps: float = 1e-6,
    block_c: int = 64,
    rows: int = 8,
    seg_len: int = 64,
    ahead: int = 1,
    num_warps: int | None = None,
    num_stages: int = 1,
    interpret: bool = False,
) -> jax.Array:
    """``y = SiLU(causal_depthwise_conv(x, kernel) + bias)`` ``[B, T, C]`` in ``out_dtype``
    (module doc; the same function as ``dpjax.nn.conv.conv_silu``), with ``norm_group`` each
    group of that many channels L2-normalised (``y / sqrt(sum y^2 + norm_eps)``).

    Args:
      x: ``[B, T, C]`` (any float dtype; padding already zeroed).
      kernel: ``[W, C]`` (``kernel[W-1]`` multiplies the current token); bias: ``[C]`` or None.
      segment_ids: ``[B, T]`` int document ids or None (one document per row).
      out_dtype: dtype of ``y``.
      norm_group: None, or the L2 norm's group size (a power of two >= 16 dividing ``C``; the
        channel tile, ``block_c`` is then ignored); norm_eps: its epsilon.
      block_c, rows, seg_len, ahead, num_warps, num_stages: tiles and launch (module doc).
    """
    (y,), _ = _launch(
        _forward_kernel,
        [x],
        kernel,
        bias,
        segment_ids,
        [jnp.dtype(out_dtype)],
        False,
        norm_group=norm_group,
        norm_eps=norm_eps,
        block_c=block_c,
        rows=rows,
        seg_len=seg_len,
        ahead=ahead,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="short_conv_fwd",
    )
    return y


def short_conv_backward(
    x: jax.Array,
    dy: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    *,
    norm_group: int | None = None,
    norm_eps: float = 1e-6,
    block_c: int = 64,
    rows: int = 8,
    seg_len: int = 64,
    ahead: int = 1,
    num_warps: int | None = None,
    num_stages: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``y = SiLU(causal_depthwise_conv(x, kernel) + bias)`` (module doc), or with
    ``norm_group`` of ``y`` with each group of channels L2-normalised (``short_conv_forward``).

    Args:
      x: ``[B, T, C]`` the convolution's input (any float dtype; padding already zeroed).
      dy: ``[B, T, C]`` the output cotangent (of the normalised output with ``norm_group``).
      kernel: ``[W, C]`` (``kernel[W-1]`` multiplies the current token); bias: ``[C]`` or None.
      segment_ids: ``[B, T]`` int document ids or None (one document per row).
      norm_group, norm_eps: as ``short_conv_forward``.
      block_c, rows, seg_len, ahead, num_warps, num_stages: tiles and launch (module doc).

    Returns:
      ``dx [B, T, C]`` (x.dtype), ``dkernel [W, C]`` fp32, ``dbias [C]`` fp32 (None without bias).
    """
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {x.shape}, got {dy.shape}")
    (dx,), (dw, db) = _launch(
        _backward_kernel,
        [x, dy],
        kernel,
        bias,
        segment_ids,
        [x.dtype],
        True,
        norm_group=norm_group,
        norm_eps=norm_eps,
        block_c=block_c,
        rows=rows,
        seg_len=seg_len,
        ahead=ahead,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="short_conv_bwd",
    )
    dw = jnp.sum(dw, axis=(0, 1))[: kernel.shape[0]]
    return dx, dw, (jnp.sum(db, axis=(0, 1)) if bias is not None else None)
