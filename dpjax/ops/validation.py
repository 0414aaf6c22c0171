"""Argument checks for ``delta_product``: every mismatch is a ``ValueError`` that names the
argument, what was received and what was expected, raised before any tracing of the algorithm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "pallas", "chunked", "reference")


@dataclass(frozen=True)
class CallShape:
    """Static description of a validated call."""

    batch: int
    tokens: int
    heads: int
    key_dim: int
    value_dim: int
    num_householder: int
    gated: bool
    num_states: int  # rows of initial/final state: B, or the number of documents with cu_seqlens


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _require_float(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype (bf16/fp16/fp32/fp64), got {dtype}")


def _require_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(
            f"{name}: expected rank {rank} with layout {layout}, got shape {_shape(x)}"
        )


def is_concrete(x) -> bool:
    """True when ``x`` holds values known at trace time (numpy, Python, or a non-traced array)."""
    return not isinstance(x, jax.core.Tracer)


def validate(
    q,
    k,
    v,
    beta,
    g,
    *,
    num_householder,
    scale,
    initial_state,
    segment_ids,
    cu_seqlens,
    impl,
) -> CallShape:
    """Check every argument of ``delta_product``; return the static call shape."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _require_rank("q", q, 4, "[B, T, H, K]")
    _require_rank("k", k, 4, "[B, T*n_h, H, K]")
    _require_rank("v", v, 4, "[B, T*n_h, H, V]")
    _require_rank("beta", beta, 3, "[B, T*n_h, H]")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _require_float(name, x)
    B, T, H, K = _shape(q)
    if T < 1:
        raise ValueError(f"q: expected at least one token (T >= 1), got shape {_shape(q)}")
    if K < 1:
        raise ValueError(f"q: expected key dim K >= 1, got shape {_shape(q)}")
    kb, L, kh, kk = _shape(k)
    if (kb, kh, kk) != (B, H, K):
        raise ValueError(
            f"k: expected shape [B={B}, T*n_h, H={H}, K={K}] to match q {_shape(q)}, "
            f"got {_shape(k)}"
        )
    if L % T != 0:
        raise ValueError(
            f"k: its time axis must be T*n_h with T={T} from q {_shape(q)}; got {L} rows, "
            f"which is not a multiple of {T}"
        )
    inferred = L // T
    if num_householder is not None:
        if isinstance(num_householder, bool) or not isinstance(num_householder, (int, np.integer)):
            raise ValueError(f"num_householder: expected a positive int, got {num_householder!r}")
        if num_householder < 1:
            raise ValueError(f"num_householder: expected >= 1, got {num_householder}")
        if num_householder != inferred:
            raise ValueError(
                f"num_householder: got {num_householder}, but k {_shape(k)} and q {_shape(q)} "
                f"imply n_h = {L}/{T} = {inferred}"
            )
    n = int(inferred)
    vb, vl, vh, V = _shape(v)
    if (vb, vl, vh) != (B, L, H):
        raise ValueError(
            f"v: expected shape [B={B}, T*n_h={L}, H={H}, V] to match k {_shape(k)}, "
            f"got {_shape(v)}"
        )
    if V < 1:
        raise ValueError(f"v: expected value dim V >= 1, got shape {_shape(v)}")
    if _shape(beta) != (B, L, H):
        raise ValueError(
            f"beta: expected shape [B={B}, T*n_h={L}, H={H}] to match k {_shape(k)}, "
            f"got {_shape(beta)}"
        )
    if g is not None:
        _require_rank("g", g, 3, "[B, T, H]")
        _require_float("g", g)
        if _shape(g) != (B, T, H):
            raise ValueError(
                f"g: expected shape [B={B}, T={T}, H={H}] (token level, like q), got {_shape(g)}"
            )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale: expected a finite number, got {scale}")

    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("segment_ids and cu_seqlens: give at most one way to mark documents")
    num_states = B
    if segment_ids is not None:
        if _shape(segment_ids) != (B, T):
            raise ValueError(
                f"segment_ids: expected shape [B={B}, T={T}], got {_shape(segment_ids)}"
            )
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(
                f"segment_ids: expected an integer dtype, got {jnp.result_type(segment_ids)}"
            )
    if cu_seqlens is not None:
        if np.ndim(cu_seqlens) != 1 or _shape(cu_seqlens)[0] < 2:
            raise ValueError(
                f"cu_seqlens: expected a 1-D array [N+1] with N >= 1, got shape "
                f"{_shape(cu_seqlens)}"
            )
        if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
            raise ValueError(
                f"cu_seqlens: expected an integer dtype, got {jnp.result_type(cu_seqlens)}"
            )
        if B != 1:
            raise ValueError(
                f"cu_seqlens: requires batch size 1 (documents packed along T), got q with B={B}"
            )
        num_states = _shape(cu_seqlens)[0] - 1
        if is_concrete(cu_seqlens):
            cu = np.asarray(cu_seqlens)
            if cu[0] != 0:
                raise ValueError(f"cu_seqlens: expected to start at 0, got {cu.tolist()}")
            if np.any(np.diff(cu) <= 0):
                raise ValueError(
                    f"cu_seqlens: expected strictly increasing offsets, got {cu.tolist()}"
                )
            if cu[-1] != T:
                raise ValueError(
                    f"cu_seqlens: expected to end at T={T} (q's time axis), got {cu.tolist()}"
                )
    if initial_state is not None:
        _require_float("initial_state", initial_state)
        want = (num_states, H, K, V)
        if _shape(initial_state) != want:
            what = "number of documents" if cu_seqlens is not None else "batch"
            raise ValueError(
                f"initial_state: expected shape [N={num_states} ({what}), H={H}, K={K}, V={V}], "
                f"got {_shape(initial_state)}"
            )
    return CallShape(B, T, H, K, V, n, g is not None, num_states)
