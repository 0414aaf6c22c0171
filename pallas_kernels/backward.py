"""The DeltaProduct backward composed from the four backward kernel stages (plain arrays).

Mirror of ``dpjax.ops.chunked_backward.backward`` (same stage split; this module knows nothing of
``dpjax``). From the forward's residuals (``A``, the log-gates, the token-chunk start states
``h``) and the padded inputs::

    1. backward_recompute   v_new, interleaved chunk-start states h_il (n > 1), dv_out
    2. backward_state_pass  reverse scan: complete dv_new, chunk-end state gradients dh_il, dh0
    3. backward_output      dq (complete), the output's dk, token gate terms dG_tok
    4. backward_wy          dk, dv (complete), dbeta, interleaved gate terms dG_il
    5. (JAX) dg = reverse local cumsum of dG_tok + that of dG_il at sub-step 0 of each token

Memory: besides the residuals, the backward holds ``v_new``, ``dv_out``, ``dv_new``
(``[B, H, L, Vp]``, input dtype), the output's ``dk`` (``[B, L, H, Kp]`` fp32) and the
per-interleaved-chunk states and state gradients ``h_il``, ``dh_il`` (``[B, H, L/64, Kp, Vp]``,
input dtype; ``h_il`` is ``h`` itself when ``n_h = 1``). Nothing per token is ``K x V``.

The per-row gate vectors of the reverse scan (``gam``, ``fdec`` and the token ``gam``) are
computed here in JAX from the log-gates (``-inf`` = reset), exactly as the forward kernels do
inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.backward_output import output_backward
from pallas_kernels.backward_recompute import recompute
from pallas_kernels.backward_state_pass import state_pass_backward
from pallas_kernels.backward_wy import wy_backward
from pallas_kernels.common import CHUNK, default_interpret, pad_to, padded_length
from pallas_kernels.forward import Residuals, pad_inputs, pad_state, padded_dims


@dataclass(frozen=True)
class BackwardConfig:
    """Tile sizes and Triton launch parameters of the backward stages."""

    recompute_block_v: int = 64
    recompute_warps: int = 8
    recompute_stages: int = 2
    state_block_v: int = 32
    state_warps: int = 4
    state_stages: int = 3
    output_warps: int = 8
    output_stages: int = 1
    wy_warps: int = 8
    wy_stages: int = 1


def chunk_gate_vectors(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gam, fdec)`` ``[..., N*64]`` fp32 from a log-gate ``[..., N*64]`` (``-inf`` = reset):
    ``gam_r = [seg_r == 0] exp(G_r)``, ``fdec_r = [seg_r == seg_end] exp(G_end - G_r)`` per
    64-row chunk (as ``prepare.py`` computes them)."""
    shape = gate.shape
    x = gate.reshape(*shape[:-1], shape[-1] // CHUNK, CHUNK)
    reset = x == -jnp.inf
    g_cum = jnp.cumsum(jnp.where(reset, 0.0, x), axis=-1)
    seg = jnp.cumsum(reset.astype(jnp.int32), axis=-1)
    gam = jnp.where(seg == 0, jnp.exp(g_cum), 0.0)
    fdec = jnp.where(seg == seg[..., -1:], jnp.exp(g_cum[..., -1:] - g_cum), 0.0)
    return gam.reshape(shape), fdec.reshape(shape)


def reverse_local_cumsum(x: jax.Array) -> jax.Array:
    """Suffix sums inside each 64-row chunk of the last axis (``[..., N*64]``)."""
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // CHUNK, CHUNK)
    total = jnp.sum(x, axis=-1, keepdims=True)
    return (total - jnp.cumsum(x, axis=-1) + x).reshape(shape)


def stage_kernels(
    config: BackwardConfig,
    *,
    num_householder: int,
    scale: float,
    interpret: bool,
    poison: bool = False,
) -> dict[str, Callable]:
    """The four backward kernels with their launch parameters bound (one place for the mapping
    from ``config`` to each stage; ``stages`` and the benchmark both call through it)."""
    common = dict(interpret=interpret, poison=poison)
    op = dict(num_householder=num_householder, scale=scale)
    return {
        "recompute": partial(
            recompute,
            **op,
            block_v=config.recompute_block_v,
            num_warps=config.recompute_warps,
            num_stages=config.recompute_stages,
            **common,
        ),
        "state_pass": partial(
            state_pass_backward,
            **op,
            block_v=config.state_block_v,
            num_warps=config.state_warps,
            num_stages=config.state_stages,
            **common,
        ),
        "output": partial(
            output_backward,
            **op,
            num_warps=config.output_warps,
            num_stages=config.output_stages,
            **common,
        ),
        "wy": partial(
            wy_backward, num_warps=config.wy_warps, num_stages=config.wy_stages, **common
        ),
    }


def gate_vectors(res: Residuals) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """``(gam, fdec, gam_tok)`` per-chunk decay vectors of the saved log-gates (Nones ungated)."""
    if res.gate_substeps is None:
        return None, None, None
    gam, fdec = chunk_gate_vectors(res.gate_substeps)
    return gam, fdec, chunk_gate_vectors(res.gate_tokens)[0]


def stages(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    res: Residuals,
    do: jax.Array,
    dht: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    config: BackwardConfig = BackwardConfig(),
    interpret: bool | None = None,
    poison: bool = False,
) -> dict[str, jax.Array | None]:
    """Run the four backward kernels; returns every stage output (padded layouts, as each
    stage module documents): ``vnew, h_il, dv_out`` (1), ``dvnew, dh_il, dh0`` (2),
    ``dq, dk_out, dG_tok`` (3), ``dk, dv, dbeta, dG_il`` (4). Arguments as ``backward``."""
    if interpret is None:
        interpret = default_interpret()
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = num_householder
    Kp, Vp = padded_dims(K, V)
    qp, kp, vp, bp = pad_inputs(q, k, v, beta, n)
    dop = pad_to(pad_to(do.astype(q.dtype), 3, Vp), 1, padded_length(T))
    dhtp = jnp.zeros((B, H, Kp, Vp), jnp.float32) if dht is None else pad_state(dht, Kp, Vp)
    gate_tok, gate_sub = res.gate_tokens, res.gate_substeps
    gam, fdec, gam_tok = gate_vectors(res)
    kern = stage_kernels(config, num_householder=n, scale=scale, interpret=interpret, poison=poison)
    vnew, h_il, dv_out = kern["recompute"](res.a, kp, vp, bp, res.h, qp, dop, gam, fdec, gate_tok)
    dvnew, dh_il, dh0 = kern["state_pass"](res.a, kp, bp, dv_out, qp, dop, dhtp, gam, fdec, gam_tok)
    dq, dk_out, dG_tok = kern["output"](qp, dop, res.h, kp, vnew, gate_tok)
    dk, dv, dbeta, dG_il = kern["wy"](
        res.a, kp, vp, bp, res.h if h_il is None else h_il, dh_il, vnew, dvnew, dk_out, gate_sub
    )
    return dict(
        vnew=vnew,
        h_il=h_il,
        dv_out=dv_out,
        dvnew=dvnew,
        dh_il=dh_il,
        dh0=dh0,
        dq=dq,
        dk_out=dk_out,
        dG_tok=dG_tok,
        dk=dk,
        dv=dv,
        dbeta=dbeta,
        dG_il=dG_il,
    )


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    res: Residuals,
    do: jax.Array,
    dht: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    config: BackwardConfig = BackwardConfig(),
    interpret: bool | None = None,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Gradients of ``pallas_kernels.forward.forward`` from its residuals.

    Args:
      q, k, v, beta: the forward's (unpadded) inputs, shapes as in ``forward``.
      res: the forward's ``Residuals``.
      do: ``[B, T, H, V]`` output cotangent; dht: ``[B, H, K, V]`` final-state cotangent or None.

    Returns:
      ``(dq [B, T, H, K] q.dtype, dk [B, L, H, K], dv [B, L, H, V] (q.dtype),
      dbeta [B, L, H] fp32, dg [B, T, H] fp32 or None (no log-gates), dh0 [B, H, K, V] fp32)``.
      ``dg`` is 0 at resets (the state there does not depend on the gate).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = num_householder
    Tp = padded_length(T)
    out = stages(
        q,
        k,
        v,
        beta,
        res,
        do,
        dht,
        num_householder=n,
        scale=scale,
        config=config,
        interpret=interpret,
        poison=poison,
    )
    gate_tok = res.gate_tokens
    dg = None
    if res.gate_substeps is not None:
        dg_il = reverse_local_cumsum(out["dG_il"]).reshape(B, H, Tp, n)[..., 0]
        dg = reverse_local_cumsum(out["dG_tok"]) + dg_il
        dg = jnp.where(gate_tok == -jnp.inf, 0.0, dg)
        dg = jnp.moveaxis(dg, 1, 2)[:, :T]
    L = T * n
    return (
        out["dq"][:, :T, :, :K],
        out["dk"][:, :L, :, :K],
        out["dv"][:, :L, :, :V],
        out["dbeta"][:, :L],
        dg,
        out["dh0"][:, :, :K, :V],
    )
