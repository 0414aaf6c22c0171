"""Backward stages 1 + 3 + 4 as one kernel: every per-chunk gradient of one token chunk.

``backward_chunk_adjoint`` (stages 1 + 3) writes ``dW`` and ``dkp`` (``[L, Kp]`` each) that the WY
adjoint (stage 4, ``backward_wy``) reads back together with ``K`` and ``dV_new`` again. One
program per token chunk ``J`` (64 tokens ``s``; its ``n`` interleaved chunks ``c = J*n + i`` of 64
rows ``r``) does all three, so ``dW`` and ``dk`` never leave registers and each of ``K``,
``V_new``, ``dV_new`` is read once. Per interleaved chunk ``c`` (formulas of the two kernels)::

    dW_c    = -dV_new_c S_c^T                                       (S_c = h[J] or h_mid)
    dk_c    = beta gam (A_c^T dW_c) + bd K_c + bd^T K_c             the WY adjoint ...
              + fdec (V_new_c dE_c^T)                               ... the state update's ...
              + scale Ds^T Q                                         ... and the output's dk
    bd, dbeta_c, dG_c from R = dV_new_c V_c^T + dW_c K_c^T (backward_wy.inverse_adjoint)
    dv_c    = beta (A_c^T dV_new_c)
    Ds      = (dO V_new_c^T) * Gam[s, t(r)] ;  dq += Ds K_c
    dG_il_c = dG_c - p_end ; dG_il_c[63] += sum(p_end) + gam_end <S_c, dE_c>

and for the token chunk ``dq = scale (gam * (dO h[J]^T) + sum_c Ds K_c)`` with the token gate
terms ``dG_tok`` as ``backward_chunk_adjoint``. ``dW`` is rounded to the input dtype first where
``BackwardConfig.grad_dtype = "input"`` (as it is stored between the kernels there), so that
``P = dW K^T`` and ``A^T dW`` are the same 16-bit products; ``dk`` stays fp32 until it is written
(more accurate than the two kernels, which round ``dkp`` to 16 bits between them).

Grid ``(NT, H, B)``; whole head dims per program: padded ``K, V <= 128`` (``MAX_DIM``). Reads
those of ``backward_chunk_adjoint`` (without ``gam``, ``fdec``: they follow from the interleaved
log-gate here) plus ``A [B, H, L, 64]`` fp32, ``v [B, L, H, Vp]``, ``beta [B, L, H]`` and, with
decay, the interleaved log-gate ``[B, H, L]`` fp32. Writes ``dq [B, T, H, Kp]``,
``dk [B, L, H, Kp]``, ``dv [B, L, H, Vp]`` (input dtype), ``dbeta [B, L, H]`` fp32 and, with
decay, ``dG_tok [B, H, T]`` and ``dG_il [B, H, L]`` fp32. Products: the WY adjoint's as
``backward_wy`` (``wy_modes``), the others as ``backward_chunk_adjoint``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backward_chunk_adjoint import TokenChunkBlocks
from pallas_kernels.backward_recompute import onto_tokens, row_tokens, token_decay
from pallas_kernels.backward_wy import chunk_decay, inverse_adjoint, wy_modes
from pallas_kernels.common import CHUNK, DotMode, mm, pallas_call, state_gate_terms, state_inner

MAX_DIM = 128  # padded K and V one program holds whole


def _acc(total: jax.Array | None, term: jax.Array) -> jax.Array:
    return term if total is None else total + term


def _kernel(
    *refs, n: int, scale: float, decay: bool, low_grads: bool, block: int, mode: dict, dots: dict
):
    rest = list(refs)
    q_ref, do_ref, h_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    hmid_ref = rest.pop(0) if n > 1 else None
    dh_ref, k_ref, vnew_ref, dvnew_ref = (rest.pop(0) for _ in range(4))
    a_ref, v_ref, beta_ref = (rest.pop(0) for _ in range(3))
    gate_ref, gsub_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)
    dq_ref, dk_ref, dv_ref, dbeta_ref = (rest.pop(0) for _ in range(4))
    dgtok_ref, dgil_ref = (rest.pop(0), rest.pop(0)) if decay else (None, None)

    lower = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0) > lax.broadcasted_iota(
        jnp.int32, (CHUNK, CHUNK), 1
    )
    gate = gate_ref[...] if decay else None
    tiles = [pl.ds(j * block, block) for j in range(k_ref.shape[-1] // block)]
    p_tok = col_tok = None
    for i in range(n):  # every [64, .] fp32 value is one [64, block] key tile
        vnew, dvnew = vnew_ref[i], dvnew_ref[i]
        a = a_ref[i]
        if mode["tf"] is DotMode.INPUT:  # wy_dots="input": A held in 16 bits
            a = a.astype(dots["dtype"])
        beta = beta_ref[i].astype(jnp.float32)
        decays = chunk_decay(gsub_ref[i] if decay else None, beta, lower)
        state = (lambda t: h_ref[t, :]) if i == 0 else (lambda t, i=i: hmid_ref[i - 1, t, :])

        # the WY adjoint (backward_wy) with dW = -dV_new S^T formed here, by key tiles
        dws, p, kk = [], None, None
        for t in tiles:
            k = k_ref[i, :, t]
            dw = -mm(dvnew, state(t), mode["in"], trans_b=True, **dots)
            dws.append(dw.astype(dots["dtype"]) if low_grads else dw)
            p = _acc(p, mm(dws[-1], k, mode["p"], trans_b=True, **dots))
            kk = _acc(kk, mm(k, k, mode["in"], trans_b=True, **dots))
        r = mm(dvnew, v_ref[i], mode["fx_exact"], trans_b=True, **dots)
        if not decay:
            r, p = r + p, None
        bd, dbeta, d_g = inverse_adjoint(
            a, r, p, kk, beta, decays.gam, decays.pair, lower, mode=mode, dots=dots
        )
        dbeta_ref[i] = dbeta
        dv = beta[:, None] * mm(a, dvnew, mode["fx"], trans_a=True, **dots)
        dv_ref[i] = dv.astype(dv_ref.dtype)

        # dk per key tile: the WY adjoint's, the state update's and the output's terms
        t_row = row_tokens(i, n)  # [., r]: the token of row r
        weight, _ = token_decay(gate, col_token=t_row)  # Gam[s, t(r)]
        d_scores = mm(do_ref[...], vnew, mode["in"], trans_b=True, **dots) * weight  # [s, r]
        p_end = s_ds = qk = None
        for t, dw in zip(tiles, dws, strict=True):
            k, d_state = k_ref[i, :, t], dh_ref[i, t, :]
            dk = decays.coef[:, None] * mm(a, dw, mode["tf"], trans_a=True, **dots)
            dk = dk + mm(bd, k, mode["fx"], **dots) + mm(bd, k, mode["fx"], trans_a=True, **dots)
            dk_state = mm(vnew, d_state, mode["in"], trans_b=True, **dots)
            if decay:
                dk_state = dk_state * decays.fdec[:, None]
                p_end = _acc(p_end, jnp.sum(dk_state * k.astype(jnp.float32), axis=1))
                s_ds = _acc(s_ds, state_inner(state(t), d_state))
                qk = _acc(qk, mm(q_ref[:, t], k, mode["in"], trans_b=True, **dots))
            dk = dk + dk_state
            dk = dk + scale * mm(d_scores, q_ref[:, t], mode["split_a"], trans_a=True, **dots)
            dk_ref[i, :, t] = dk.astype(dk_ref.dtype)
        if decay:
            dgil_ref[i] = d_g + state_gate_terms(p_end, s_ds, decays.gam)
            qk_ds = qk * d_scores  # [s, r]: the token gate terms
            p_tok = _acc(p_tok, jnp.sum(qk_ds, axis=1))
            col_tok = _acc(col_tok, onto_tokens(jnp.sum(qk_ds, axis=0), t_row))

    # dq = scale (gam (dO h^T) + sum_c Ds_c K_c), per key tile, after the loop above: no
    # [64, Kp] accumulator lives across it
    _, gam_tok = token_decay(gate)
    do = do_ref[...]
    d_scores = [
        mm(do, vnew_ref[i], mode["in"], trans_b=True, **dots)
        * token_decay(gate, col_token=row_tokens(i, n))[0]
        for i in range(n)
    ]
    for t in tiles:
        dq = mm(do, h_ref[t, :], mode["in"], trans_b=True, **dots)  # [64, block]
        if decay:
            dq = dq * gam_tok[:, None]
            p_tok = p_tok + jnp.sum(dq * q_ref[:, t].astype(jnp.float32), axis=1)
        for i in range(n):
            dq = dq + mm(d_scores[i], k_ref[i, :, t], mode["split_a"], **dots)
        dq_ref[:, t] = (scale * dq).astype(dq_ref.dtype)
    if decay:
        dgtok_ref[...] = scale * (p_tok - col_tok)


def chunk_grads(
    q: jax.Array,
    do: jax.Array,
    h: jax.Array,
    h_mid: jax.Array | None,
    dh_il: jax.Array,
    k: jax.Array,
    vnew: jax.Array,
    dvnew: jax.Array,
    a: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gate_tok: jax.Array | None,
    gate_sub: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    wy_dots: str = "input",
    low_grads: bool = True,
    block: int = 64,
    num_warps: int = 8,
    num_stages: int = 1,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, ...]:
    """Run backward stages 1, 3 and 4 (without ``dv_out``) in one kernel.

    Args:
      q: ``[B, T, H, Kp]``; do: ``[B, T, H, Vp]``; h: ``[B, H, NT, Kp, Vp]`` token-chunk start
        states; h_mid: ``[B, H, NT*(n-1), Kp, Vp]`` the other interleaved chunk-start states
        (None when n == 1); dh_il: ``[B, H, NI, Kp, Vp]`` chunk-end state gradients;
        k: ``[B, L, H, Kp]``; vnew, dvnew: ``[B, H, L, Vp]``; a: ``[B, H, L, 64]`` fp32;
        v: ``[B, L, H, Vp]``; beta: ``[B, L, H]``; gate_tok: ``[B, H, T]`` fp32 token log-gate
        and gate_sub: ``[B, H, L]`` fp32 interleaved log-gate (both None: no decay). Padded
        ``Kp, Vp <= 128``.
      wy_dots: the WY adjoint's products with an fp32 value (``BackwardConfig.wy_dots``).
      low_grads: round ``dW`` to the 16-bit input dtype before its products
        (``BackwardConfig.grad_dtype = "input"``; ignored for fp32 inputs).
      block: key tile (power of two) of the ``[64, Kp]`` values (``dW``, ``dk``, ``dq``).

    Returns:
      ``dq [B, T, H, Kp]``, ``dk [B, L, H, Kp]``, ``dv [B, L, H, Vp]`` (q.dtype),
      ``dbeta [B, L, H]`` fp32, ``dG_tok [B, H, T]`` and ``dG_il [B, H, L]`` fp32 (None without
      decay).
    """
    B, T, H, Kp = q.shape
    Vp = do.shape[-1]
    n = num_householder
    L = T * n
    NT, NI = T // CHUNK, L // CHUNK
    if max(Kp, Vp) > MAX_DIM:
        raise ValueError(
            f"chunk_grads holds whole heads: padded K, V <= {MAX_DIM}, got Kp={Kp}, Vp={Vp}"
        )
    if (h_mid is None) != (n == 1):
        raise ValueError(
            f"chunk_grads reads the interleaved chunk-start states h_mid exactly when n_h > 1, "
            f"got n_h={n} and h_mid={'None' if h_mid is None else h_mid.shape}"
        )
    decay = gate_tok is not None
    dtype = q.dtype
    low_grads = low_grads and dtype != jnp.float32
    blocks = TokenChunkBlocks(n)
    inputs, in_specs = blocks.state_operands(q, do, h, h_mid, dh_il, k, vnew, dvnew)
    inputs += [a.reshape(B, H, NI, CHUNK, CHUNK), v.reshape(B, NI, CHUNK, H, Vp)]
    inputs.append(beta.reshape(B, NI, CHUNK, H))
    in_specs += [blocks.head_chunks(CHUNK), blocks.seq_chunks(Vp), blocks.seq_vec]
    if decay:
        inputs += [gate_tok, gate_sub.reshape(B, H, NI, CHUNK)]
        in_specs += [blocks.token_vec, blocks.chunk_vec]
    out_shapes = [
        jax.ShapeDtypeStruct((B, T, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, NI, CHUNK, H, Kp), dtype),
        jax.ShapeDtypeStruct((B, NI, CHUNK, H, Vp), dtype),
        jax.ShapeDtypeStruct((B, NI, CHUNK, H), jnp.float32),
    ]
    out_specs = [blocks.token_rows(Kp), blocks.seq_chunks(Kp), blocks.seq_chunks(Vp)]
    out_specs.append(blocks.seq_vec)
    if decay:
        out_shapes += [
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
            jax.ShapeDtypeStruct((B, H, NI, CHUNK), jnp.float32),
        ]
        out_specs += [blocks.token_vec, blocks.chunk_vec]
    kernel = functools.partial(
        _kernel,
        n=n,
        scale=float(scale),
        decay=decay,
        low_grads=low_grads,
        block=min(block, Kp),
        mode=wy_modes(dtype, wy_dots, low_grads=low_grads),
        dots=dict(dtype=dtype, interpret=interpret),
    )
    outs = pallas_call(
        kernel,
        inputs=inputs,
        in_specs=in_specs,
        out_shapes=out_shapes,
        out_specs=out_specs,
        grid=(NT, H, B),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="dp_bwd_chunk_grads",
        poison=poison,
    )
    dq = outs[0]
    dk, dv = outs[1].reshape(B, L, H, Kp), outs[2].reshape(B, L, H, Vp)
    dbeta = outs[3].reshape(B, L, H)
    if not decay:
        return dq, dk, dv, dbeta, None, None
    return dq, dk, dv, dbeta, outs[4], outs[5].reshape(B, H, L)
