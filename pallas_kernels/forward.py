"""The chunked DeltaProduct forward composed from the three kernel stages (pure arrays in/out).

``forward`` pads (head dims to powers of two >= 16, time to a multiple of 64), builds the token
and interleaved log-gates (``-inf`` marks a reset: one mechanism for gates and document starts),
runs ``prepare -> state_pass -> output`` and un-pads. Differentiation is wired elsewhere
(``dpjax.ops.pallas``); this module knows nothing of ``dpjax``.

Shapes (``n = n_h``, ``L = T*n``): q ``[B, T, H, K]``; k ``[B, L, H, K]``; v ``[B, L, H, V]``;
beta ``[B, L, H]``; g ``[B, T, H]`` fp32 or None; h0 ``[B, H, K, V]`` fp32 or None; resets
``[B, T]`` bool or None (True: the state is zeroed before that token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import (
    AUTO_SPLIT,
    STATE_LOOPS,
    default_interpret,
    next_pow2,
    pad_to,
    padded_length,
)
from pallas_kernels.output import output
from pallas_kernels.prepare import prepare
from pallas_kernels.state_pass import state_pass

MAX_KEY_DIM = 256  # the state tile [Kp, BV] lives in registers
MIN_DIM = 16  # smallest tensor-core operand side


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and Triton launch parameters of the three stages (defaults: the fastest
    variants on an H100 at K = V = 128, docs/BENCHMARKS.md; ``dpjax.ops.pallas.config_for`` adds
    warps for wide heads)."""

    state_block_v: int = 32
    state_warps: int = 4
    state_stages: int = 3
    state_tf32: bool = False  # W S with TF32 operands instead of a 16-bit rounded state
    # the state pass's loop: "token" (one step per token chunk, sub-chunks unrolled, stores of h
    # without branches), "sub" (one step per interleaved chunk) or "auto" (token up to one wave
    # of programs, common.resolve_state_loop)
    state_loop: str = "auto"
    # the state pass forms v_new = U - W S from W = A diag(beta gam) K and U = A diag(beta) V
    # formed first in the input dtype (two dependent products per chunk instead of three); the
    # prepare kernel then forms them too: 255 registers at 4 warps, 140 at prep_warps=8 (offline
    # ptxas, sm_90, K = V = 128)
    state_stored_wu: bool = False
    out_block_v: int = 64
    out_warps: int = 4
    out_stages: int = 2
    prep_warps: int = 4
    prep_stages: int = 1
    prep_blocked: bool = True  # 16x16-block inverse (False: the previous 64x64 one)
    prep_precision: str = "ieee"  # products joining A's blocks: "ieee", "split3" or "tf32"
    prep_unroll: int = 3  # substitution steps per loop iteration: 1, 3 or 5
    # Sequence split of the state pass: up to this many pieces of whole token chunks walked in
    # parallel (the largest count dividing the token chunks is used; 1 = no split). Each piece
    # first runs from zero and from the identity (``Kp / BV`` extra tiles) to get its map
    # ``end = M start + E``; the pieces' start states follow in plain JAX, then every piece runs
    # again from its true start, writing the states and ``v_new``: about 2 + K/V times the
    # sequential work, for P times the parallelism (long single sequences, few heads).
    # AUTO_SPLIT (0): ``common.auto_split`` picks it from the program count.
    state_split: int = AUTO_SPLIT

    def __post_init__(self):
        if self.state_loop not in STATE_LOOPS:
            raise ValueError(
                f"KernelConfig.state_loop must be one of {STATE_LOOPS}, got {self.state_loop!r}"
            )


class Residuals(NamedTuple):
    """What the forward can hand to a backward: the WY inverse per interleaved chunk, the
    log-gates it used, and the chunk-start states (all padded). With ``save_states`` also the
    state pass's ``v_new`` and the other interleaved chunk-start states (else None: the backward
    recomputes them)."""

    a: jax.Array  # [B, H, L_pad, 64] fp32
    gate_tokens: jax.Array | None  # [B, H, T_pad] fp32
    gate_substeps: jax.Array | None  # [B, H, L_pad] fp32
    h: jax.Array  # [B, H, NT, Kp, Vp]
    v_new: jax.Array | None = None  # [B, H, L_pad, Vp]
    h_mid: jax.Array | None = None  # [B, H, NT*(n-1), Kp, Vp] (n > 1)
    w: jax.Array | None = None  # [B, H, L_pad, Kp] WY key factor (save_w)


def padded_dims(key_dim: int, value_dim: int) -> tuple[int, int]:
    """``(Kp, Vp)``: head dims as the kernels see them."""
    return max(MIN_DIM, next_pow2(key_dim)), max(MIN_DIM, next_pow2(value_dim))


def pad_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, n: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q ``[B, Tp, H, Kp]``, k ``[B, Tp*n, H, Kp]``, v ``[B, Tp*n, H, Vp]`` (k, v cast to
    ``q.dtype``) and beta ``[B, Tp*n, H]``, zero-padded as the kernels take them."""
    Kp, Vp = padded_dims(q.shape[-1], v.shape[-1])
    Tp = padded_length(q.shape[1])
    return (
        pad_to(pad_to(q, 3, Kp), 1, Tp),
        pad_to(pad_to(k.astype(q.dtype), 3, Kp), 1, Tp * n),
        pad_to(pad_to(v.astype(q.dtype), 3, Vp), 1, Tp * n),
        pad_to(beta, 1, Tp * n),
    )


def pad_state(x: jax.Array, key_pad: int, value_pad: int) -> jax.Array:
    """``[B, H, K, V]`` -> fp32 ``[B, H, Kp, Vp]`` (zero-padded head dims)."""
    return pad_to(pad_to(x.astype(jnp.float32), 2, key_pad), 3, value_pad)


def log_gates(
    g: jax.Array | None, resets: jax.Array | None, n: int, tokens_pad: int
) -> tuple[jax.Array | None, jax.Array | None]:
    """Token ``[B, H, T_pad]`` and interleaved ``[B, H, T_pad*n]`` fp32 log-gates, or Nones.

    A reset at token ``t`` is a log-gate of ``-inf`` there; on the interleaved axis the gate sits
    on sub-step 0 of each token (decay before the first Householder step), zeros elsewhere.
    """
    if g is None and resets is None:
        return None, None
    # without g: one gate row [B, T, 1], broadcast over heads by the caller
    gate = jnp.zeros((*resets.shape, 1), jnp.float32) if g is None else g.astype(jnp.float32)
    if resets is not None:
        gate = jnp.where(resets[:, :, None], -jnp.inf, gate)
    B, T = gate.shape[:2]
    tokens = jnp.moveaxis(pad_to(gate, 1, tokens_pad), 1, 2)  # [B, H|1, T_pad]
    substeps = jnp.zeros(tokens.shape + (n,), jnp.float32).at[..., 0].set(tokens)
    substeps = substeps.reshape(B, tokens.shape[1], tokens_pad * n)
    return tokens, substeps


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    h0: jax.Array | None,
    resets: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    config: KernelConfig = KernelConfig(),
    interpret: bool | None = None,
    poison: bool = False,
    save_states: bool = False,
    save_mid_states: bool = True,
    save_w: bool = False,
) -> tuple[jax.Array, jax.Array, Residuals]:
    """DeltaProduct forward through the Pallas kernels.

    Returns ``(o [B, T, H, V] q.dtype, final_state [B, H, K, V] fp32, Residuals)``.
    ``poison=True`` starts every kernel output buffer as NaN (tests: unwritten elements show).
    ``save_states=True`` keeps ``v_new`` and every interleaved chunk-start state in the residuals
    (for the backward; the plain forward leaves it off); ``save_mid_states=False`` leaves out
    the start states of the interleaved chunks that do not start a token chunk (``h_mid``, for a
    backward that does not read them: ``BackwardConfig.reads_mid_states``). ``save_w=True``
    keeps the WY key factor ``W = A diag(beta gam) K`` (formed by the prepare kernel) for a
    backward whose reverse state pass reads it (``BackwardConfig.state_stored_w``).
    """
    if interpret is None:
        interpret = default_interpret()
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = num_householder
    Kp, Vp = padded_dims(K, V)
    Tp = padded_length(T)
    qp, kp, vp, bp = pad_inputs(q, k, v, beta, n)
    gate_tok, gate_sub = log_gates(g, resets, n, Tp)
    if gate_tok is not None and gate_tok.shape[1] != H:
        gate_tok = jnp.broadcast_to(gate_tok, (B, H, Tp))
        gate_sub = jnp.broadcast_to(gate_sub, (B, H, Tp * n))
    h0p = None if h0 is None else pad_state(h0, Kp, Vp)

    common = dict(interpret=interpret, poison=poison)
    prep = prepare(
        kp,
        bp,
        gate_sub,
        num_warps=config.prep_warps,
        num_stages=config.prep_stages,
        blocked=config.prep_blocked,
        precision=config.prep_precision,
        unroll=config.prep_unroll,
        v=vp if config.state_stored_wu else None,
        factors="wu" if config.state_stored_wu else ("w" if save_w else ""),
        **common,
    )
    h, vnew, final, *h_mid = state_pass(
        prep["a"],
        kp,
        vp,
        bp,
        prep.get("gam"),
        prep.get("fdec"),
        h0p,
        num_householder=n,
        block_v=config.state_block_v,
        num_warps=config.state_warps,
        num_stages=config.state_stages,
        tf32_state=config.state_tf32,
        mid_states=save_states and save_mid_states,
        split=config.state_split,
        wu=(prep["w"], prep["u"]) if config.state_stored_wu else None,
        loop=config.state_loop,
        **common,
    )
    o = output(
        qp,
        kp,
        vnew,
        h,
        gate_tok,
        num_householder=n,
        scale=scale,
        block_v=config.out_block_v,
        num_warps=config.out_warps,
        num_stages=config.out_stages,
        **common,
    )
    res = Residuals(
        a=prep["a"],
        gate_tokens=gate_tok,
        gate_substeps=gate_sub,
        h=h,
        v_new=vnew if save_states else None,
        h_mid=h_mid[0] if h_mid else None,
        w=prep["w"] if save_w else None,
    )
    return o[:, :T, :, :V], final[:, :, :K, :V], res
