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
        return jnp.take(self.embedding[...], ids, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., vocab]`` fp32 logits against the table (tied head)."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum(
            "...d,vd->...v", x.astype(self.dtype), table, preferred_element_type=jnp.float32
        )
