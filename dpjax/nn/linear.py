"""Bias-optional dense layer and token embedding with logical sharding names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
        y = jnp.dot(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype if out_dtype is None else out_dtype)


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
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum(
            "...d,vd->...v", x.astype(self.dtype), table, preferred_element_type=jnp.float32
        )


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
