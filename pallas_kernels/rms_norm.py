"""RMSNorm and gated RMSNorm over the last axis, forward and backward, one pass each.

Per row ``x [D]`` with weight ``w [D]`` and (gated) ``z [D]``, ``s = SiLU(z)`` (else ``s = 1``)::

    r = 1 / sqrt(mean(x^2) + eps)      x_hat = x r      y = x_hat w s

Given the cotangent ``g`` of ``y``, with ``a = g w s``::

    dx = r (a - x_hat mean(x_hat a))    dz = g x_hat w SiLU'(z)    dw = sum_rows g x_hat s

``rms_norm_forward`` reads ``x`` (and ``z``) once and writes ``y`` and ``r [N]`` fp32;
``rms_norm_backward`` reads ``x``, ``g`` (and ``z``) and ``r`` once and writes ``dx`` (and
``dz``) and per-program partial sums of ``dw`` (summed in JAX; each backward program walks
``row_steps`` row blocks). All arithmetic is fp32.

Grid ``(cdiv(N, block_rows),)``: each program owns ``block_rows`` whole rows, padded to the next
power of two ``Dp >= D`` columns (masked loads and stores: any ``D`` and ``N``). The row count
keeps ``block_rows * Dp`` near ``ELEMENTS_PER_PROGRAM``, at 8 warps (4 for smaller tiles): offline
(Triton 3.6 for sm_90) the backward then takes 80–99 registers without spilling at the 392M
models' norms, where the gated one at 4 warps took 128 and spilled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import next_pow2, pallas_call

ELEMENTS_PER_PROGRAM = 4096
BACKWARD_PROGRAMS = 1024
MAX_STEPS = 16


def tiles(rows: int, dim: int, block_rows: int | None = None) -> tuple[int, int, int]:
    """``(block_rows, Dp, num_warps)`` for ``rows`` rows of ``dim`` features."""
    block_dim = next_pow2(dim)
    if block_rows is None:
        block_rows = max(1, ELEMENTS_PER_PROGRAM // block_dim)
        block_rows = min(block_rows, next_pow2(rows))
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows: expected a power of two, got {block_rows}")
    return block_rows, block_dim, 8 if block_rows * block_dim >= ELEMENTS_PER_PROGRAM else 4


def _where(n_rows: int, dim: int, block_rows: int, block_dim: int):
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    cols = jnp.arange(block_dim)
    row_ok, col_ok = rows < n_rows, cols < dim
    return (rows[:, None], cols[None, :]), row_ok[:, None] & col_ok[None, :], rows, row_ok, cols


def _load(ref, index, mask):
    return pltriton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _forward_kernel(x_ref, w_ref, *refs, n_rows, dim, block_rows, block_dim, eps, gated):
    z_ref = refs[0] if gated else None
    y_ref, r_ref = refs[-2:]
    index, mask, rows, row_ok, cols = _where(n_rows, dim, block_rows, block_dim)
    x = _load(x_ref, index, mask)
    r = lax.rsqrt(jnp.sum(x * x, axis=1) / dim + eps)
    y = x * r[:, None] * _load(w_ref, cols, cols < dim)[None, :]
    if gated:
        z = _load(z_ref, index, mask)
        y = y * (z * jax.nn.sigmoid(z))
    pltriton.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)
    pltriton.store(r_ref.at[rows], r, mask=row_ok)


def _backward_kernel(
    x_ref, w_ref, r_ref, g_ref, *refs, n_rows, dim, block_rows, block_dim, steps, gated
):
    z_ref = refs[0] if gated else None
    dx_ref = refs[1] if gated else refs[0]
    dz_ref = refs[2] if gated else None
    dw_ref = refs[-1]
    cols = jnp.arange(block_dim)
    w = _load(w_ref, cols, cols < dim)[None, :]
    program = pl.program_id(0)  # read outside the loop (interpret mode cannot inside it)

    def block(step, dw):
        first = (program * steps + step) * block_rows
        rows = first + jnp.arange(block_rows)
        row_ok = rows < n_rows
        index = (rows[:, None], cols[None, :])
        mask = row_ok[:, None] & (cols < dim)[None, :]
        x = _load(x_ref, index, mask)
        g = _load(g_ref, index, mask)
        r = _load(r_ref, rows, row_ok)[:, None]
        x_hat = x * r
        if gated:
            z = _load(z_ref, index, mask)
            sig = jax.nn.sigmoid(z)
            gs = g * (z * sig)
            dz = g * x_hat * w * sig * (1.0 + z * (1.0 - sig))
            pltriton.store(dz_ref.at[index], dz.astype(dz_ref.dtype), mask=mask)
        else:
            gs = g
        a = gs * w
        dx = r * (a - x_hat * (jnp.sum(x_hat * a, axis=1, keepdims=True) / dim))
        pltriton.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=mask)
        return dw + jnp.sum(gs * x_hat, axis=0)

    dw = lax.fori_loop(0, steps, block, jnp.zeros((block_dim,), jnp.float32))
    dw_ref[...] = dw[None, :]


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "block_rows", "interpret"))
def rms_norm_forward(
    x: jax.Array,
    weight: jax.Array,
    gate: jax.Array | None = None,
    *,
    eps: float,
    out_dtype: jnp.dtype,
    block_rows: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(y [..., D] out_dtype, r [...] fp32)``: ``y = x r weight (SiLU(gate))`` (module doc).

    Args:
      x: ``[..., D]`` any float dtype; weight: ``[D]``; gate: ``[..., D]`` like ``x`` or None.
      eps: added to the mean square; out_dtype: dtype of ``y``.
      block_rows: rows per program (a power of two; default from ``tiles``).
      interpret: Pallas interpret mode (CPU).
    """
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight: expected shape ({dim},), got {weight.shape}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate: expected the shape of x {x.shape}, got {gate.shape}")
    xs = _rows(x)
    n = xs.shape[0]
    br, bd, warps = tiles(n, dim, block_rows)
    inputs = [xs, weight] + ([] if gate is None else [_rows(gate)])
    kernel = functools.partial(
        _forward_kernel,
        n_rows=n,
        dim=dim,
        block_rows=br,
        block_dim=bd,
        eps=eps,
        gated=gate is not None,
    )
    y, r = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=[pl.BlockSpec()] * len(inputs),
        out_shapes=[
            jax.ShapeDtypeStruct((n, dim), jnp.dtype(out_dtype)),
            jax.ShapeDtypeStruct((n,), jnp.float32),
        ],
        out_specs=[pl.BlockSpec()] * 2,
        grid=(pl.cdiv(n, br),),
        num_warps=warps,
        num_stages=1,
        interpret=interpret,
        name="rms_norm_fwd",
    )
    return y.reshape(x.shape), r.reshape(x.shape[:-1])


@functools.partial(jax.jit, static_argnames=("block_rows", "row_steps", "interpret"))
def rms_norm_backward(
    x: jax.Array,
    weight: jax.Array,
    gate: jax.Array | None,
    r: jax.Array,
    dy: jax.Array,
    *,
    block_rows: int | None = None,
    row_steps: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(dx, dgate or None, dweight)`` of ``rms_norm_forward`` given ``dy [..., D]`` and its
    saved ``r [...]`` fp32: ``dx`` like ``x``, ``dgate`` like ``gate``, ``dweight [D]`` fp32.

    ``row_steps``: row blocks each program walks, adding its weight gradient in registers (by
    default enough for about ``BACKWARD_PROGRAMS`` programs, at most ``MAX_STEPS``), so the
    partial sums written are ``[programs, Dp]``, not one row per block."""
    dim = x.shape[-1]
    xs = _rows(x)
    n = xs.shape[0]
    br, bd, warps = tiles(n, dim, block_rows)
    blocks = pl.cdiv(n, br)
    steps = min(MAX_STEPS, max(1, blocks // BACKWARD_PROGRAMS)) if row_steps is None else row_steps
    if steps < 1:
        raise ValueError(f"row_steps: expected >= 1, got {row_steps}")
    programs = pl.cdiv(blocks, steps)
    inputs = [xs, weight, r.reshape(n), _rows(dy)] + ([] if gate is None else [_rows(gate)])
    out_shapes = [jax.ShapeDtypeStruct((n, dim), x.dtype)]
    if gate is not None:
        out_shapes.append(jax.ShapeDtypeStruct((n, dim), gate.dtype))
    out_shapes.append(jax.ShapeDtypeStruct((programs, bd), jnp.float32))
    kernel = functools.partial(
        _backward_kernel,
        n_rows=n,
        dim=dim,
        block_rows=br,
        block_dim=bd,
        steps=steps,
        gated=gate is not None,
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=[pl.BlockSpec()] * len(inputs),
        out_shapes=out_shapes,
        out_specs=[pl.BlockSpec()] * (len(out_shapes) - 1)
        + [pl.BlockSpec((1, bd), lambda i: (i, 0))],
        grid=(programs,),
        num_warps=warps,
        num_stages=1,
        interpret=interpret,
        name="rms_norm_bwd",
    )
    dx = outs[0].reshape(x.shape)
    dgate = outs[1].reshape(gate.shape) if gate is not None else None
    return dx, dgate, jnp.sum(outs[-1], axis=0)[:dim]
