"""DeltaProduct through the Pallas (Triton backend) kernels of ``pallas_kernels``, differentiable.

Forward: ``pallas_kernels.forward`` (prepare -> state pass -> output kernels; interpret mode when
the default backend is not a GPU). Backward: ``pallas_kernels.backward`` (recompute -> reverse
state pass -> output adjoint -> WY adjoint kernels, then the reverse gate cumsum in JAX), a
dedicated DeltaProduct backward on token-level q/do. Residuals: the inputs, ``A`` (fp32, 64 per
sub-step row), the log-gates and what the forward's state pass writes anyway or can write at the
cost of a store: the token-chunk start states ``h`` (input dtype; the other interleaved
chunk-start states ``h_mid`` only for backward configurations that read them,
``BackwardConfig.reads_mid_states``: not the default's up to K, V = 128) and ``v_new``
(``[B, H, L, V]``, input dtype), so that the backward never re-runs the recurrence. No per-token
``K x V`` state is saved. The plain-JAX twin of every
backward stage is ``dpjax.ops.chunked_backward`` (the tests compare the kernels against it).

Dtypes: the kernels compute in ``q.dtype`` (bf16/fp16: 16-bit tensor-core products with fp32
accumulation and fp32 states; fp32: exact fp32 products); k and v are cast to ``q.dtype``.
Head dims up to 256, forward and backward (the backward tiles its state-sized values for heads
above 128, ``pallas_kernels.backward.config_for``; ``kernel_backward_unsupported`` says where the
``jax.vjp``-of-``chunked`` fallback still runs).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dpjax.ops import chunked
from dpjax.ops.validation import CallShape
from pallas_kernels import backward as kernel_backward
from pallas_kernels import forward as kernels

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
MAX_HEAD_DIM = 256


def supports(*, shape: CallShape, dtype) -> str | None:
    """``None`` when the kernels serve this call, else the reason they do not."""
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        return f"pallas kernels take bf16/fp16/fp32 inputs, got {dtype}"
    if shape.key_dim > MAX_HEAD_DIM:
        return (
            f"pallas kernels need K <= {MAX_HEAD_DIM} (state tile in registers), "
            f"got K={shape.key_dim}"
        )
    if shape.value_dim > MAX_HEAD_DIM:
        return f"pallas kernels need V <= {MAX_HEAD_DIM}, got V={shape.value_dim}"
    return None


def backward_config_for(key_dim: int, value_dim: int) -> kernel_backward.BackwardConfig:
    """Backward tiles and launch parameters for the head dims: the H100-tuned defaults up to 128,
    wide-head tiles and warps above (``pallas_kernels.backward.config_for``)."""
    return kernel_backward.config_for(key_dim, value_dim)


MAX_BACKWARD_DIM = kernel_backward.MAX_DIM  # padded K, V (as the forward's MAX_HEAD_DIM)


def kernel_backward_unsupported(key_dim: int, value_dim: int) -> str | None:
    """``None`` when the backward kernels serve these head dims, else why not (the custom_vjp
    then falls back to ``jax.vjp`` of ``chunked``, ``_fallback_bwd``)."""
    config = backward_config_for(key_dim, value_dim)
    return kernel_backward.unsupported(key_dim, value_dim, config)


def kernel_backward_supports(key_dim: int, value_dim: int) -> bool:
    """Whether the backward kernels serve these head dims (else: ``jax.vjp`` of ``chunked``)."""
    return kernel_backward_unsupported(key_dim, value_dim) is None


def config_for(key_dim: int, value_dim: int) -> kernels.KernelConfig:
    """Launch parameters for the head dims: more warps where a 4-warp program would spill
    registers (checked offline with ptxas for sm_90: K = 256 state pass, wide prepare/output)."""
    kp, vp = kernels.padded_dims(key_dim, value_dim)
    wide = kp + vp > 256
    return kernels.KernelConfig(
        state_warps=8 if kp >= 256 else 4,
        prep_warps=8 if wide else 4,
        out_warps=8 if wide else 4,
    )


def _kernel_forward(q, k, v, beta, g, h0, resets, n: int, scale: float, **residuals):
    """``kernels.forward``; ``residuals``: its ``save_states``, ``save_mid_states``, ``save_w``."""
    return kernels.forward(
        q,
        k,
        v,
        beta,
        g,
        h0,
        resets,
        num_householder=n,
        scale=scale,
        config=config_for(q.shape[-1], v.shape[-1]),
        **residuals,
    )


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _pallas(q, k, v, beta, g, h0, resets, n: int, scale: float):
    o, final, _ = _kernel_forward(q, k, v, beta, g, h0, resets, n, scale)
    return o, final


def _pallas_fwd(q, k, v, beta, g, h0, resets, n: int, scale: float):
    # the states are kept only where the kernel backward will use them
    save = kernel_backward_supports(q.shape[-1], v.shape[-1])
    config = backward_config_for(q.shape[-1], v.shape[-1])
    save_w = save and config.state_stored_w
    save = save and config.save_states
    residuals = dict(
        save_states=save,
        save_mid_states=config.reads_mid_states(q.shape[-1], v.shape[-1], n),
        save_w=save_w,
    )
    o, final, res = _kernel_forward(q, k, v, beta, g, h0, resets, n, scale, **residuals)
    # residuals: the inputs, A, the log-gates, the chunk-start states and v_new
    return (o, final), (q, k, v, beta, g, h0, resets, res)


def _pallas_bwd(n: int, scale: float, saved, cotangents):
    q, k, v, beta, g, h0, resets, res = saved
    if not kernel_backward_supports(q.shape[-1], v.shape[-1]):
        return _fallback_bwd(n, scale, saved, cotangents)
    do, dht = cotangents
    dq, dk, dv, dbeta, dg, dh0 = kernel_backward.backward(
        q,
        k,
        v,
        beta,
        res,
        do,
        dht,
        num_householder=n,
        scale=scale,
        config=backward_config_for(q.shape[-1], v.shape[-1]),
    )
    return (
        dq,
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        dbeta.astype(beta.dtype),
        None if g is None else dg,
        None if h0 is None else dh0,
        None,
    )


def _fallback_bwd(n: int, scale: float, saved, cotangents):
    """``jax.vjp`` of the chunked JAX path: the mirror of the kernel backward, and its fallback
    where ``kernel_backward_unsupported`` gives a reason (e.g. a configuration with the fused
    stage 3 + 4 kernel and head dims above 128)."""
    q, k, v, beta, g, h0, resets, _ = saved

    def primal(q, k, v, beta, g, h0):
        return chunked.forward(q, k, v, beta, g, h0, resets, num_householder=n, scale=scale)

    _, vjp = jax.vjp(primal, q, k, v, beta, g, h0)
    return (*vjp(cotangents), None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


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
) -> tuple[jax.Array, jax.Array]:
    """Pallas forward on validated inputs (see ``dpjax.ops`` for the public API).

    Args:
      q: ``[B, T, H, K]`` bf16/fp16/fp32; k: ``[B, T*n_h, H, K]``; v: ``[B, T*n_h, H, V]``;
        beta: ``[B, T*n_h, H]``; g: ``[B, T, H]`` fp32 log gate or None; h0: ``[B, H, K, V]`` fp32
        or None; resets: ``[B, T]`` bool or None (True where a document starts: the state is
        zeroed before that token).

    Returns:
      ``o [B, T, H, V]`` in ``q.dtype`` and the final state ``[B, H, K, V]`` fp32.
    """
    if resets is not None:
        resets = jnp.asarray(resets, bool)
    if g is not None:
        g = jnp.asarray(g, jnp.float32)
        # a gate with exp(g) == 0 zeroes the state like a document start: make it one (-inf is
        # the kernels' reset), so that huge finite gates never enter the local cumsums; its
        # gradient is 0, as in the recurrence
        dead = jax.lax.stop_gradient(jnp.exp(g)) == 0
        g = jnp.where(dead, -jnp.inf, g)
    if h0 is not None:
        h0 = jnp.asarray(h0, jnp.float32)
    return _pallas(q, k, v, beta, g, h0, resets, num_householder, float(scale))
