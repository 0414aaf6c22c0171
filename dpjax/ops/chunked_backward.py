"""Hand-written backward of the chunk-parallel DeltaProduct (SPEC §2.8, dedicated product form).

Works on token-level ``q``/``do`` (no zero-padded interleaved queries) and stores no per-token
state: memory is ``O(T*(K+V) + NT*K*V)`` per head. Layouts and names as in ``chunked_forward``.

Residuals saved by the forward: the chunk-layout inputs ``q, k, v, beta``, the gate cumsums
``G_il``/``G_tok``, the document starts, ``A = (I + M)^-1`` and ``h0``.

Stages (each a candidate Pallas kernel):

1. ``recompute``: ``W, U`` from ``A``; ``h`` (token-chunk starts) and ``v_new`` by re-running the
   forward state pass.
2. ``output_backward`` (chunk-parallel over token chunks): ``dq``, the output's part of ``dk`` and
   ``dv_new``, and the token-level gate terms.
3. ``state_pass_backward`` (reverse scan over token chunks): inside each token chunk it rebuilds
   the ``n_h`` interleaved chunk-start states from ``h[J]`` and ``v_new``, then walks them
   backwards: completes ``dv_new``, gives ``dW``, the state update's part of ``dk``, its gate
   terms, and ``dh0``.
4. ``wy_backward`` (chunk-parallel over interleaved chunks): ``dk, dv, dbeta`` and gate terms
   through ``W = A X_w``, ``U = A X_u``, ``A = (I + M)^-1``.
5. ``gate_grad`` + ``reverse_local_cumsum``: gate terms -> ``dG`` -> ``dg`` (token level).

Gate terms are carried as products ``p_x = dx ⊙ x`` for each ``Decay`` factor ``x``; since every
factor is an exponential of a difference of cumsums, ``gate_grad`` turns them into ``dG``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpjax.ops.chunked_forward import (
    Decay,
    chunk_decay,
    einsum,
    group_by_token_chunk,
    kkt,
    segments,
    state_pass,
    strictly_lower,
    token_slices,
    ungroup,
    wy_apply,
    wy_inputs,
)


class Residuals(NamedTuple):
    """What the forward keeps for the backward (chunk layout, compute dtype).

    q: ``[B, H, NT, C, K]``; k: ``[B, H, NI, C, K]``; v: ``[B, H, NI, C, V]``;
    beta: ``[B, H, NI, C]``; G_il: ``[B, H, NI, C]``; G_tok: ``[B, H, NT, C]``;
    resets: ``[B, H, NT, C]`` bool; a: ``[B, H, NI, C, C]``; h0: ``[B, H, K, V]``.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array
    G_il: jax.Array
    G_tok: jax.Array
    resets: jax.Array
    a: jax.Array
    h0: jax.Array


class Recomputed(NamedTuple):
    """Forward intermediates rebuilt in the backward: decays, ``w [B, H, NI, C, K]``,
    ``h [B, H, NT, K, V]`` and ``v_new [B, H, NI, C, V]``."""

    decay_il: Decay
    decay_tok: Decay
    w: jax.Array
    h: jax.Array
    v_new: jax.Array


def recompute(res: Residuals, n: int) -> Recomputed:
    """Stage 1: ``W, U`` from the saved ``A``; ``h`` and ``v_new`` by the forward state pass."""
    seg_il, seg_tok = segments(res.resets, n)
    decay_il = chunk_decay(res.G_il, seg_il)
    decay_tok = chunk_decay(res.G_tok, seg_tok)
    w, u = wy_apply(res.a, res.k, res.v, res.beta, decay_il)
    h, v_new, _ = state_pass(res.k, w, u, decay_il, res.h0, n)
    return Recomputed(decay_il, decay_tok, w, h, v_new)


def reverse_local_cumsum(x: jax.Array) -> jax.Array:
    """Suffix sums along the last (chunk-row) axis: the adjoint of the local inclusive cumsum."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)


def gate_grad(
    p_pair: jax.Array, p_from_start: jax.Array, p_to_end: jax.Array, p_carry: jax.Array
) -> jax.Array:
    """``dG [B, H, N, C]`` (gradient w.r.t. the local gate cumsum) from the products ``dx ⊙ x`` of
    the ``Decay`` factors: ``pair_rs = e^{G_r - G_s}``, ``from_start_r = e^{G_r}``,
    ``to_end_r = e^{G_last - G_r}``, ``carry = e^{G_last}``.

    Shapes: p_pair ``[.., C, C]``; p_from_start, p_to_end ``[.., C]``; p_carry ``[..]``.
    """
    dG = p_pair.sum(-1) - p_pair.sum(-2) + p_from_start - p_to_end
    return dG.at[..., -1].add(p_to_end.sum(-1) + p_carry)


def output_backward(
    q: jax.Array,
    k: jax.Array,
    v_new: jax.Array,
    h: jax.Array,
    do: jax.Array,
    decay: Decay,
    scale: float,
    n: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Stage 2 (chunk-parallel over token chunks): the adjoint of ``chunked_forward.output``.

    Args:
      q: ``[B, H, NT, C, K]``; k: ``[B, H, NI, C, K]``; v_new: ``[B, H, NI, C, V]``;
        h: ``[B, H, NT, K, V]``; do: ``[B, H, NT, C, V]``; decay: token-level ``Decay``.

    Returns:
      ``dq [B, H, NT, C, K]``, the output's ``dk [B, H, NI, C, K]`` and ``dv_new [B, H, NI, C, V]``
      (interleaved), and the gate terms ``p_pair [B, H, NT, C, C]``, ``p_from_start [B, H, NT, C]``.
    """
    qs = q * scale
    k_j, v_j = token_slices(k, n), token_slices(v_new, n)
    fs = decay.from_start
    do_h = einsum("bhnrv,bhnkv->bhnrk", do, h)
    dq = scale * fs[..., None] * do_h
    p_from_start = fs * jnp.sum(do_h * qs, axis=-1)
    p_pair = jnp.zeros_like(decay.pair)
    dk, dv_new = [], []
    for j in range(n):
        scores = einsum("bhnrk,bhnuk->bhnru", qs, k_j[..., j, :]) * decay.pair
        d_scores = einsum("bhnrv,bhnuv->bhnru", do, v_j[..., j, :])
        p_pair = p_pair + scores * d_scores
        d_qk = d_scores * decay.pair
        dq = dq + scale * einsum("bhnru,bhnuk->bhnrk", d_qk, k_j[..., j, :])
        dk.append(einsum("bhnru,bhnrk->bhnuk", d_qk, qs))
        dv_new.append(einsum("bhnru,bhnrv->bhnuv", scores, do))
    to_il = lambda xs: jnp.stack(xs, axis=-2).reshape(k.shape[:3] + (k.shape[3], -1))
    return dq, to_il(dk), to_il(dv_new), p_pair, p_from_start


class StateGrads(NamedTuple):
    """Outputs of ``state_pass_backward`` (interleaved layout unless noted).

    dv_new: ``[B, H, NI, C, V]`` complete; dw: ``[B, H, NI, C, K]``; dk: ``[B, H, NI, C, K]``
    (the state update's part); p_to_end: ``[B, H, NI, C]``; p_carry: ``[B, H, NI]``;
    dh0: ``[B, H, K, V]``.
    """

    dv_new: jax.Array
    dw: jax.Array
    dk: jax.Array
    p_to_end: jax.Array
    p_carry: jax.Array
    dh0: jax.Array


def rebuild_chunk_states(
    h: jax.Array, k: jax.Array, v_new: jax.Array, to_end: jax.Array, carry: jax.Array
) -> list[jax.Array]:
    """The ``n`` interleaved chunk-start states of one token chunk from its start state.

    Args:
      h: ``[B, H, K, V]``; k: ``[B, H, n, C, K]``; v_new: ``[B, H, n, C, V]``;
        to_end: ``[B, H, n, C]``; carry: ``[B, H, n]``.

    Returns:
      ``n`` states ``[B, H, K, V]`` (the first is ``h``).
    """
    states = [h]
    for i in range(k.shape[2] - 1):
        write = einsum("bhck,bhcv->bhkv", k[:, :, i], to_end[:, :, i, :, None] * v_new[:, :, i])
        states.append(carry[:, :, i, None, None] * states[-1] + write)
    return states


def chunk_state_step_backward(
    ds_end: jax.Array,
    s: jax.Array,
    k: jax.Array,
    w: jax.Array,
    v_new: jax.Array,
    dv_new_out: jax.Array,
    to_end: jax.Array,
    carry: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Adjoint of ``chunked_forward.chunk_state_step`` for one interleaved chunk.

    Args:
      ds_end: ``[B, H, K, V]`` gradient w.r.t. the chunk-end state; s: the chunk-start state;
        k, w: ``[B, H, C, K]``; v_new, dv_new_out (the output stage's part): ``[B, H, C, V]``;
        to_end: ``[B, H, C]``; carry: ``[B, H]``.

    Returns:
      ``ds_start [B, H, K, V]`` (without the output stage's direct term) and
      ``(dv_new, dw, dk, p_to_end, p_carry)``.
    """
    k_ds = einsum("bhck,bhkv->bhcv", k, ds_end)
    dv_new = dv_new_out + to_end[..., None] * k_ds
    dw = -einsum("bhcv,bhkv->bhck", dv_new, s)
    dk = to_end[..., None] * einsum("bhcv,bhkv->bhck", v_new, ds_end)
    p_to_end = to_end * jnp.sum(k_ds * v_new, axis=-1)
    p_carry = carry * jnp.sum(s * ds_end, axis=(-2, -1))
    ds_start = carry[..., None, None] * ds_end - einsum("bhck,bhcv->bhkv", w, dv_new)
    return ds_start, (dv_new, dw, dk, p_to_end, p_carry)


def state_pass_backward(
    q: jax.Array,
    do: jax.Array,
    k: jax.Array,
    w: jax.Array,
    v_new: jax.Array,
    h: jax.Array,
    dv_new_out: jax.Array,
    dht: jax.Array,
    decay_il: Decay,
    decay_tok: Decay,
    scale: float,
    n: int,
) -> StateGrads:
    """Stage 3 (sequential, reverse over token chunks).

    Args:
      q, do: ``[B, H, NT, C, K|V]`` token level; k, w: ``[B, H, NI, C, K]``;
        v_new, dv_new_out: ``[B, H, NI, C, V]``; h: ``[B, H, NT, K, V]``; dht: ``[B, H, K, V]``
        cotangent of the final state; decays of both chunkings.

    Returns:
      ``StateGrads``; ``dh0`` is the gradient w.r.t. the state before the first token.
    """

    def body(ds, x):
        states = rebuild_chunk_states(x["h"], x["k"], x["vn"], x["te"], x["cy"])
        grads = [None] * n
        for i in reversed(range(n)):
            ds, grads[i] = chunk_state_step_backward(
                ds,
                states[i],
                x["k"][:, :, i],
                x["w"][:, :, i],
                x["vn"][:, :, i],
                x["dvn"][:, :, i],
                x["te"][:, :, i],
                x["cy"][:, :, i],
            )
        q_read = scale * x["fs"][..., None] * x["q"]
        ds = ds + einsum("bhck,bhcv->bhkv", q_read, x["do"])
        return ds, tuple(jnp.stack(parts, axis=2) for parts in zip(*grads, strict=True))

    per_il = {"k": k, "w": w, "vn": v_new, "dvn": dv_new_out}
    per_il |= {"te": decay_il.to_end, "cy": decay_il.carry}
    xs = {name: group_by_token_chunk(x, n) for name, x in per_il.items()}
    per_tok = {"h": h, "q": q, "do": do, "fs": decay_tok.from_start}
    xs |= {name: jnp.moveaxis(x, 2, 0) for name, x in per_tok.items()}
    dh0, ys = jax.lax.scan(body, dht, xs, reverse=True)
    return StateGrads(*(ungroup(y) for y in ys), dh0)


class WYGrads(NamedTuple):
    """Outputs of ``wy_backward``: dk ``[B, H, NI, C, K]``, dv ``[B, H, NI, C, V]``,
    dbeta ``[B, H, NI, C]``, gate terms p_pair ``[B, H, NI, C, C]`` and
    p_from_start ``[B, H, NI, C]``."""

    dk: jax.Array
    dv: jax.Array
    dbeta: jax.Array
    p_pair: jax.Array
    p_from_start: jax.Array


def wy_backward(
    a: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    decay: Decay,
    dw: jax.Array,
    du: jax.Array,
) -> WYGrads:
    """Stage 4 (chunk-parallel over interleaved chunks): adjoint of ``W = A X_w``, ``U = A X_u``,
    ``A = (I + M)^-1``, ``M = StrictLower(diag(beta) K K^T ⊙ pair)``.

    Args:
      a: ``[B, H, NI, C, C]``; k: ``[.., C, K]``; v: ``[.., C, V]``; beta: ``[.., C]``;
        decay: interleaved ``Decay``; dw: ``[.., C, K]``; du (= complete dv_new): ``[.., C, V]``.
    """
    x_w, x_u = wy_inputs(k, v, beta, decay)
    d_a = einsum("...ik,...jk->...ij", dw, x_w) + einsum("...iv,...jv->...ij", du, x_u)
    dx_w = einsum("...ji,...jk->...ik", a, dw)
    dx_u = einsum("...ji,...jv->...iv", a, du)
    d_m = strictly_lower(-einsum("...ji,...jl,...ml->...im", a, d_a, a))
    d_kk = d_m * decay.pair
    kk = einsum("...ik,...jk->...ij", k, k)
    bk = beta[..., None] * k
    dk = (
        (beta * decay.from_start)[..., None] * dx_w
        + beta[..., None] * einsum("...ij,...jk->...ik", d_kk, k)
        + einsum("...ji,...jk->...ik", d_kk, bk)
    )
    dbeta = (
        decay.from_start * jnp.sum(dx_w * k, axis=-1)
        + jnp.sum(dx_u * v, axis=-1)
        + jnp.sum(d_kk * kk, axis=-1)
    )
    p_pair = d_m * kkt(k, beta, decay)
    p_from_start = jnp.sum(dx_w * x_w, axis=-1)
    return WYGrads(dk, beta[..., None] * dx_u, dbeta, p_pair, p_from_start)


def token_gate_grad(dG_il: jax.Array, dG_tok: jax.Array, n: int) -> jax.Array:
    """``dg [B, H, NT, C]`` for the token-level gate from the gradients w.r.t. both local cumsums;
    the interleaved gate of token ``t`` sits at its sub-step 0 (other slots are constants)."""
    B, H, NT, C = dG_tok.shape
    dg_il = reverse_local_cumsum(dG_il).reshape(B, H, NT * C, n)[..., 0]
    return reverse_local_cumsum(dG_tok) + dg_il.reshape(B, H, NT, C)


def backward(
    res: Residuals, do: jax.Array, dht: jax.Array, *, n: int, scale: float
) -> tuple[jax.Array, ...]:
    """Gradients ``(dq, dk, dv, dbeta, dg, dh0)`` in the chunk layout for cotangents
    ``do [B, H, NT, C, V]`` and ``dht [B, H, K, V]``."""
    rc = recompute(res, n)
    dq, dk_out, dv_new_out, p_pair_tok, p_fs_tok = output_backward(
        res.q, res.k, rc.v_new, rc.h, do, rc.decay_tok, scale, n
    )
    st = state_pass_backward(
        res.q, do, res.k, rc.w, rc.v_new, rc.h, dv_new_out, dht, rc.decay_il, rc.decay_tok, scale, n
    )
    wy = wy_backward(res.a, res.k, res.v, res.beta, rc.decay_il, st.dw, st.dv_new)
    dG_il = gate_grad(wy.p_pair, wy.p_from_start, st.p_to_end, st.p_carry)
    no_tail = jnp.zeros_like(p_fs_tok)
    dG_tok = gate_grad(p_pair_tok, p_fs_tok, no_tail, no_tail[..., 0])
    dg = token_gate_grad(dG_il, dG_tok, n)
    return dq, dk_out + st.dk + wy.dk, wy.dv, wy.dbeta, dg, st.dh0
