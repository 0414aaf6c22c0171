"""Bias-optional dense layer and token embedding with logical sharding names."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dpjax.nn.init import Initializer, zeros
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import Names


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel [in, out]``.

    Args:
      in_features, out_features: sizes.
      names: logical sharding names of the kernel (bias uses ``(names[1],)``).
      init: kernel initialiser.
      use_bias: add a zero-initialised bias.
      dtype: computation dtype (inputs and kernel are cast to it); param_dtype: storage dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: Names,
        init: Initializer,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = make_param(rngs, init, (in_features, out_features), names, param_dtype)
        self.bias = (
            make_param(rngs, zeros, (out_features,), (names[1],), param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """``x [..., in] -> [..., out]`` in ``out_dtype`` (default ``dtype``); fp32 accumulation."""
        out_dtype = self.dtype if out_dtype is None else out_dtype
        if self.bias is None:
            return mixed_matmul(x, self.kernel[...], self.dtype, out_dtype)
        y = mixed_matmul(x, self.kernel[...], self.dtype, jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(out_dtype)


class Embedding(nnx.Module):
    """Token embedding table ``[vocab, D]``; ``attend`` gives tied output logits."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        names: Names,
        init: Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = make_param(rngs, init, (num_embeddings, features), names, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids [...] int -> [..., D]`` in ``dtype`` (out-of-range ids are clipped, so that pad
        ids such as -100 under an attention mask cannot produce NaNs)."""
        return embedding_lookup(self.embedding[...], ids).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., vocab]`` fp32 logits against the table (tied head)."""
        return mixed_matmul(x, self.embedding[...].T, self.dtype, jnp.float32)


def mixed_matmul(
    x: jax.Array, w: jax.Array, compute_dtype: jnp.dtype, out_dtype: jnp.dtype
) -> jax.Array:
    """``x [..., in] @ w [in, out] -> [..., out]`` in ``out_dtype``: both operands cast to
    ``compute_dtype``, fp32 accumulation, and a backward that stays in ``compute_dtype``.

    Autodiff of ``dot(x.astype(c), w.astype(c), preferred_element_type=f32).astype(out)`` gives
    the backward matmuls an fp32 cotangent against a ``c`` operand, which XLA runs as fp32 (TF32)
    GEMMs — 33 % of the DP2-392M train step on an H200 (docs/LM.md) — and rounds the weight
    gradient to ``c`` before it reaches the fp32 master weights. Here the cotangent is cast to
    ``compute_dtype`` once, both backward matmuls run in it with fp32 accumulation, and the
    gradients come back in the dtypes of ``x`` and ``w`` (an fp32 master ``w`` gets an
    unrounded fp32 gradient). The output carries the remat name ``"dense"``.
    """
    y = _mixed_matmul(x, w, jnp.dtype(compute_dtype), jnp.dtype(out_dtype), x.dtype)
    return checkpoint_name(y, "dense")


def _dot(a: jax.Array, b: jax.Array, contract: tuple) -> jax.Array:
    """fp32-accumulated ``dot_general`` contracting ``a``'s axes ``contract[0]`` with ``b``'s
    ``contract[1]``. XLA:CPU cannot run some bf16 x bf16 -> f32 dots ("Unsupported element type
    for DotThunk"), so on CPU the (exactly representable) operands are upcast to fp32 first."""
    dims = ((contract[0], contract[1]), ((), ()))

    def native(a, b):
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    def upcast(a, b):
        return native(a.astype(jnp.float32), b.astype(jnp.float32))

    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_matmul(x, w, compute_dtype, out_dtype, x_dtype):
    return _mixed_matmul_fwd(x, w, compute_dtype, out_dtype, x_dtype)[0]


def _mixed_matmul_fwd(x, w, compute_dtype, out_dtype, x_dtype):
    xc = x.astype(compute_dtype)
    y = _dot(xc, w.astype(compute_dtype), ((x.ndim - 1,), (0,)))
    return y.astype(out_dtype), (xc, w)


def _mixed_matmul_bwd(compute_dtype, out_dtype, x_dtype, res, dy):
    xc, w = res
    dyc = dy.astype(compute_dtype)
    dx = _dot(dyc, w.astype(compute_dtype), ((dy.ndim - 1,), (1,))).astype(x_dtype)
    lead = tuple(range(dy.ndim - 1))
    return dx, _dot(xc, dyc, (lead, lead)).astype(w.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


ONE_HOT_GRAD_MAX_VOCAB = 4096


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[clip(ids)]``: ``table [V, D]``, ``ids [...] int`` -> ``[..., D]`` in table.dtype.

    The gradient of a gather is a scatter-add of every token's row gradient into its table row.
    With a small vocabulary nearly all of a batch's tokens hit the same few rows, and the GPU
    scatter serialises on them: 207 ms of a 228 ms train step at the state-tracking shape
    (13 tokens, 2048 x 129 ids per batch, H100; docs/BENCHMARKS.md). Up to
    ``ONE_HOT_GRAD_MAX_VOCAB`` rows the table gradient is computed instead as the matmul
    ``one_hot(ids)^T @ dy`` (exact one-hot, fp32 accumulation; the scatter accumulated in the
    table's dtype); larger vocabularies keep XLA's scatter, whose collisions are rare.
    """
    if table.shape[0] > ONE_HOT_GRAD_MAX_VOCAB:
        return jnp.take(table, ids, axis=0, mode="clip")
    return _small_vocab_lookup(table, ids)


@jax.custom_vjp
def _small_vocab_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0, mode="clip")


def _small_vocab_lookup_fwd(table, ids):
    return _small_vocab_lookup(table, ids), (table, ids)


def _small_vocab_lookup_bwd(res, dy):
    table, ids = res
    vocab = table.shape[0]
    one_hot = jax.nn.one_hot(jnp.clip(ids, 0, vocab - 1), vocab, dtype=dy.dtype)
    dtable = jnp.einsum(
        "...v,...d->vd",
        one_hot,
        dy,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    return dtable.astype(table.dtype), None


_small_vocab_lookup.defvjp(_small_vocab_lookup_fwd, _small_vocab_lookup_bwd)
