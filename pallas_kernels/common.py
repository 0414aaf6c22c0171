"""Helpers shared by the Pallas (Triton backend) kernel stages.

Everything here is plain JAX; nothing imports ``dpjax`` (arrows point from ``dpjax.ops`` to
``pallas_kernels`` only).

* ``CHUNK``: chunk length (64) on both the interleaved sub-step axis and the token axis.
* ``next_pow2`` / ``padded_length`` / ``pad_to``: the Triton backend needs every array operation
  to have a power-of-2 size, so head dims are zero-padded to powers of two and time is padded to a
  multiple of ``CHUNK`` (zero rows leave the recurrence unchanged: ``k = v = beta = 0`` writes
  nothing and a zero log-gate does not decay).
* ``default_interpret``: run kernels in interpret mode unless the default backend is a GPU.
* ``compiler_params``: Triton compiler parameters (``num_warps``, ``num_stages``).
* ``DotMode`` / ``mm``: matrix products with an explicit operand precision; fp32 accumulation
  always.
* ``element_select``: one element of a 1-D value (Triton cannot slice values: mask + sum).
* ``segment_cumsum``: within-chunk gate cumsums where ``-inf`` log-gates are document resets.
* ``pallas_call``: ``pl.pallas_call`` with the Triton parameters and optional NaN-poisoned outputs.
* ``split_pieces`` / ``identity_columns`` / ``chain_pieces``: a sequence split's piece count,
  the identity start of its transfer launch, and the join of its pieces through their maps.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

CHUNK = 64
# the state passes' token loop (``loop="token"``) unrolls up to this many sub-chunks per step;
# above, the sub-chunk loop (n_h = 3 unrolled would pipeline 256 KB of shared memory at 2 stages
# in the reverse pass, more than an H100's 227 KB)
UNROLL_MAX = 2


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def padded_length(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of ``CHUNK``."""
    return -(-tokens // CHUNK) * CHUNK


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``x`` along ``axis`` to ``size`` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def default_interpret() -> bool:
    """Interpret mode (a jitted scan over the grid) everywhere but on a GPU backend."""
    return jax.default_backend() != "gpu"


def compiler_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Triton backend compiler parameters."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


class DotMode(enum.Enum):
    """Operand precision of a matrix product inside a kernel (accumulation is always fp32).

    * ``INPUT``: operands cast to the 16-bit input dtype (bf16/fp16 tensor cores).
    * ``SPLIT_A`` / ``SPLIT_B``: the fp32 operand ``a`` (or ``b``) is split into two 16-bit parts,
      ``hi + lo``, and multiplied twice with the other operand in the 16-bit dtype: nearly fp32
      accuracy for that operand at twice the 16-bit cost.
    * ``SPLIT3``: both fp32 operands split into bf16 halves, three bf16 products
      (``hi hi + hi lo + lo hi``, about 16 mantissa bits).
    * ``TF32``: fp32 operands as TF32 (10-bit mantissa) on tensor cores.
    * ``IEEE``: exact fp32 products (``Precision.HIGHEST``, no tensor cores).
    """

    INPUT = "input"
    SPLIT_A = "split_a"
    SPLIT_B = "split_b"
    SPLIT3 = "split3"
    TF32 = "tf32"
    IEEE = "ieee"


def score_modes(dtype) -> dict[str, DotMode]:
    """Dot modes of the attention-like products of the output-side kernels: ``in`` for two
    stored 16-bit tiles (``INPUT``), ``split_a`` for an fp32 left operand (scores, their
    gradients) split into two 16-bit halves (``SPLIT_A``); ``IEEE`` for fp32 inputs."""
    if dtype == jnp.float32:
        return dict.fromkeys(("in", "split_a"), DotMode.IEEE)
    return {"in": DotMode.INPUT, "split_a": DotMode.SPLIT_A}


def truncate_to_tf32(x: jax.Array) -> jax.Array:
    """fp32 with the 13 low mantissa bits cleared: what tensor cores read of an fp32 operand in
    TF32 mode (used to emulate TF32 products in interpret mode, pessimistically)."""
    bits = lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-8192)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _split(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    hi = x.astype(dtype)
    return hi, (x.astype(jnp.float32) - hi.astype(jnp.float32)).astype(dtype)


def mm(
    a: jax.Array,
    b: jax.Array,
    mode: DotMode,
    *,
    dtype=jnp.bfloat16,
    interpret: bool = False,
    trans_a: bool = False,
    trans_b: bool = False,
) -> jax.Array:
    """``op(a) @ op(b)`` of two 2-D values with fp32 accumulation, returned in fp32.

    ``dtype`` is the 16-bit operand dtype of ``INPUT`` / ``SPLIT_*``. ``trans_a``/``trans_b``
    contract over the first/last axis instead (no explicit transpose). In interpret mode (CPU)
    TF32 operands are truncated to TF32 explicitly so that CPU tests see GPU-like rounding.
    """
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    dot = lambda x, y, precision=None: lax.dot_general(
        x, y, dims, precision=precision, preferred_element_type=jnp.float32
    )
    if mode is DotMode.INPUT:
        return dot(a.astype(dtype), b.astype(dtype))
    if mode is DotMode.SPLIT_A:
        hi, lo = _split(a, dtype)
        b = b.astype(dtype)
        return dot(hi, b) + dot(lo, b)
    if mode is DotMode.SPLIT_B:
        hi, lo = _split(b, dtype)
        a = a.astype(dtype)
        return dot(a, hi) + dot(a, lo)
    if mode is DotMode.SPLIT3:
        a_hi, a_lo = _split(a, jnp.bfloat16)
        b_hi, b_lo = _split(b, jnp.bfloat16)
        return dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if mode is DotMode.IEEE:
        return dot(a, b, lax.Precision.HIGHEST)
    if interpret:  # TF32
        return dot(truncate_to_tf32(a), truncate_to_tf32(b), lax.Precision.HIGHEST)
    return dot(a, b, lax.Precision.DEFAULT)


def element_select(values: jax.Array, index) -> jax.Array:
    """Element ``index`` of a 1-D value as a scalar (mask + sum)."""
    pos = lax.broadcasted_iota(jnp.int32, values.shape, 0)
    return jnp.sum(jnp.where(pos == index, values, 0.0))


def state_inner(s: jax.Array, ds: jax.Array) -> jax.Array:
    """``<S, dE>`` of two state tiles (fp32 scalar; one axis at a time for the lowering)."""
    return jnp.sum(jnp.sum(s.astype(jnp.float32) * ds.astype(jnp.float32), axis=1))


def state_gate_terms(p_end: jax.Array, s_ds: jax.Array, gam: jax.Array) -> jax.Array:
    """The gate terms ``[64]`` fp32 of one interleaved chunk's state update adjoint: ``-p_end``
    with ``sum(p_end) + gam_end <S, dE>`` added on the last row, from ``p_end =
    rowsum(fdec (V_new dE^T) * K)`` ``[64]``, ``s_ds = <S, dE>`` (scalar) and the decays from the
    chunk start ``gam`` ``[64]``."""
    last = lax.broadcasted_iota(jnp.int32, p_end.shape, 0) == p_end.shape[0] - 1
    carry = s_ds * element_select(gam, p_end.shape[0] - 1)
    return jnp.where(last, jnp.sum(p_end) + carry, 0.0) - p_end


def segment_cumsum(log_gate: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Inclusive within-chunk cumsum of a log-gate vector whose ``-inf`` entries mark resets.

    A reset (``-inf``) at row ``r`` zeroes the state before row ``r`` is written. Instead of
    exponentiating ``-inf`` differences (NaN-prone), resets become segment boundaries.

    Args:
      log_gate: ``[C]`` fp32 log-gates (``<= 0``), ``-inf`` where the state is reset.

    Returns:
      ``(G, seg, G_end, seg_end)``: ``G [C]`` inclusive cumsum of the finite gates, ``seg [C]``
      number of resets at rows ``<= r`` (fp32), and their totals over the chunk (scalars).
    """
    reset = log_gate == -jnp.inf
    finite = jnp.where(reset, 0.0, log_gate)
    resets = reset.astype(jnp.float32)
    return jnp.cumsum(finite), jnp.cumsum(resets), jnp.sum(finite), jnp.sum(resets)


def pallas_call(
    kernel,
    *,
    inputs: list[jax.Array],
    in_specs: list,
    out_shapes: list[jax.ShapeDtypeStruct],
    out_specs: list,
    grid: tuple[int, ...],
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
    poison: bool = False,
) -> list[jax.Array]:
    """``pl.pallas_call`` with the Triton compiler parameters and optional output poisoning.

    With ``poison=True`` every output buffer starts as NaN (aliased input buffers), so any element
    the kernel fails to write shows up as NaN downstream (GPU tests). The kernel sees only its real
    inputs and outputs.
    """
    from jax.experimental import pallas as pl

    n_in = len(inputs)
    aliases: dict[int, int] = {}
    if poison:
        fills = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
        aliases = {n_in + i: i for i in range(len(out_shapes))}
        inputs = [*inputs, *fills]
        in_specs = [*in_specs, *out_specs]

        def body(*refs):
            kernel(*refs[:n_in], *refs[n_in + len(out_shapes) :])

    else:
        body = kernel
    outs = pl.pallas_call(
        body,
        out_shape=out_shapes,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
    return list(outs)


def split_pieces(token_chunks: int, most: int) -> int:
    """The largest piece count ``<= most`` that divides ``token_chunks`` (at least 1): how many
    pieces a sequence-split state pass uses for ``state_split = most``."""
    return max(p for p in range(1, max(1, min(most, token_chunks)) + 1) if token_chunks % p == 0)


# ``state_split = AUTO_SPLIT``: split the sequence only where the state pass has too few programs
# to fill the GPU. Measured on an H100 (132 SMs; docs/BENCHMARKS.md "sequence split"): at 128
# programs (B=4, H=8, four value tiles) no split is fastest (forward 0.264 ms, split 2: 0.440);
# at 32 programs (B=1, T=32768) split 8 is fastest (forward 1.842 -> 0.882 ms, backward
# 3.263 -> 1.504 ms), split 4 next (1.026 / 1.786).
AUTO_SPLIT = 0

# shared memory a Triton program may use on an H100 (sm_90): 227 KB
SHARED_MEMORY_BYTES = 232_448


def pipeline_stages(requested: int, bytes_per_stage: int, reserve: int = 8192) -> int:
    """The pipeline depth (Triton ``num_stages``) a loop kernel compiles with: ``requested``,
    lowered until ``stages * bytes_per_stage`` (the shared-memory buffers of the loads pipelined
    per loop step) plus ``reserve`` (the kernel's other buffers, e.g. a product's operand staged
    in shared memory) fits ``SHARED_MEMORY_BYTES``; at least 1."""
    stages = requested
    while stages > 1 and stages * bytes_per_stage + reserve > SHARED_MEMORY_BYTES:
        stages -= 1
    return stages


def state_chunk_bytes(
    key_dim: int, value_tile: int, itemsize: int, *, stored_factor: bool, decay: bool
) -> int:
    """Shared memory one interleaved chunk's pipelined loads take in a state pass: ``K [64, Kp]``,
    ``A [64, 64]`` fp32 (or a stored 16-bit WY factor ``[64, Kp]``), the value-side tile
    ``[64, BV]`` (``V`` or ``dv_out``), the fp32 ``beta`` row and, with decay, two fp32 gate
    rows (for ``pipeline_stages``)."""
    factor = key_dim * itemsize if stored_factor else CHUNK * 4
    per_row = key_dim * itemsize + factor + value_tile * itemsize + 4 + (8 if decay else 0)
    return CHUNK * per_row


# an H100's (H200's) SM count: up to this many programs of a state pass run as one wave
ONE_WAVE_PROGRAMS = 132
STATE_LOOPS = ("auto", "token", "sub")


def resolve_state_loop(loop: str, programs: int) -> str:
    """The loop of a forward state pass of ``programs`` programs: ``"token"`` (one step per
    token chunk, more shared memory per program) or ``"sub"`` (one step per interleaved chunk);
    ``"auto"`` takes the token loop where the programs run as one wave (on an H200 2-3 % faster
    at 128 programs) and the sub-chunk loop beyond (at 256 programs on an H100: 0.316 against
    0.397 ms; docs/BENCHMARKS.md). The reverse pass resolves its own ``"auto"``
    (``backward_state_pass.launch_plan``)."""
    if loop not in STATE_LOOPS:
        raise ValueError(f"state_loop must be one of {STATE_LOOPS}, got {loop!r}")
    if loop == "auto":
        return "token" if programs <= ONE_WAVE_PROGRAMS else "sub"
    return loop


def state_loop_for(
    loop: str, programs: int, num_householder: int, num_stages: int, token_step_bytes: int
) -> str:
    """The loop a state pass compiles: ``resolve_state_loop(loop, programs)``, except that the
    token loop (its ``n_h`` sub-chunks unrolled in one step) falls back to the sub-chunk loop
    above ``UNROLL_MAX`` sub-chunks or where the step's pipelined loads
    (``token_step_bytes``) would not fit at least 2 stages (``num_stages`` if less) in shared
    memory."""
    loop = resolve_state_loop(loop, programs)
    if loop == "token":
        fits = pipeline_stages(num_stages, token_step_bytes) >= min(num_stages, 2)
        if num_householder > UNROLL_MAX or not fits:
            return "sub"
    return loop


SPLIT_FREE_PROGRAMS = 96  # at least this many (B * H * value tiles) programs: no split
SPLIT_TARGET_PROGRAMS = 256  # else double the pieces until programs x pieces reach this
MAX_AUTO_SPLIT = 8


def auto_split(programs: int) -> int:
    """The sequence split ``AUTO_SPLIT`` picks for a state pass of ``programs`` programs per
    piece (``B * H * Vp / BV``): 1 from ``SPLIT_FREE_PROGRAMS`` on, else the smallest power of two
    that brings ``programs x pieces`` to ``SPLIT_TARGET_PROGRAMS`` (at most ``MAX_AUTO_SPLIT``)."""
    if programs >= SPLIT_FREE_PROGRAMS:
        return 1
    pieces = 1
    while pieces < MAX_AUTO_SPLIT and programs * pieces < SPLIT_TARGET_PROGRAMS:
        pieces *= 2
    return pieces


def state_pass_pieces(
    split: int, token_chunks: int, batch_heads: int, value_dim: int, block_v: int
) -> int:
    """How many pieces a state pass (forward or backward) of ``batch_heads`` (B * H) heads walks,
    its value dim ``value_dim`` in tiles of ``block_v`` (clipped to it): ``split``
    (``AUTO_SPLIT``: ``auto_split`` of the programs) clipped to a count dividing
    ``token_chunks``."""
    if split < 0:
        raise ValueError(f"state_split must be >= 0 (0 = automatic), got {split}")
    programs = batch_heads * -(-value_dim // min(block_v, value_dim))
    most = auto_split(programs) if split == AUTO_SPLIT else split
    return split_pieces(token_chunks, most)


def identity_columns(rows: int, cols: int, first: jax.Array) -> jax.Array:
    """Columns ``first .. first + cols - 1`` of the ``rows x rows`` identity, fp32 ``[rows, cols]``
    (zero where they fall outside it); ``first`` may be traced (a program id)."""
    r = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    c = lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + first
    return jnp.where(r == c, 1.0, 0.0).astype(jnp.float32)


def through_product(tile: jax.Array, mode: DotMode, **dots) -> jax.Array:
    """``tile [R, C]`` as fp32, exactly, as the product ``I @ tile`` (``mode``: ``INPUT`` for a
    16-bit tile, ``IEEE`` for fp32). Triton pipelines (copies ahead asynchronously) only loads
    that feed a product; a tile loaded inside a loop for elementwise use alone is read
    synchronously where it is used (seen in the reverse state pass on an H100 with ncu)."""
    rows = tile.shape[0]
    eye = identity_columns(rows, rows, 0).astype(tile.dtype)
    return mm(eye, tile, mode, **dots)


def chain_pieces(
    transfer: jax.Array, boundary: jax.Array, batch: int, pieces: int, *, reverse: bool = False
) -> jax.Array:
    """Join a sequence split (``state_pass`` / ``state_pass_backward`` with ``pieces > 1``).

    ``transfer [B * P, H, Kp, Vp + Kp]`` fp32 holds per piece its offset ``E`` (the piece run
    from zero) and its map ``M`` (the piece run from the identity), so that what leaves a piece
    is ``M x + E`` for what enters it. Walking the pieces in order (last to first with
    ``reverse``) from ``boundary [B, H, Kp, Vp]`` gives what enters every piece, returned as
    ``[B * P, H, Kp, Vp]`` fp32 in piece order (``P - 1`` products in plain JAX, fp32).
    """
    _, H, Kp, width = transfer.shape
    Vp = width - Kp
    t = transfer.reshape(batch, pieces, H, Kp, width)
    offsets, maps = t[..., :Vp], t[..., Vp:]
    order = list(range(pieces))[::-1] if reverse else list(range(pieces))
    x = boundary.astype(jnp.float32)
    entering = {order[0]: x}
    for p, nxt in zip(order[:-1], order[1:], strict=True):
        x = jnp.einsum("bhij,bhjv->bhiv", maps[:, p], x, precision=lax.Precision.HIGHEST)
        x = x + offsets[:, p]
        entering[nxt] = x
    return jnp.stack([entering[p] for p in range(pieces)], axis=1).reshape(
        batch * pieces, H, Kp, Vp
    )
