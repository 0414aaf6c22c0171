"""Pre-norm residual block (SPEC §4.4): ``h = x + Mixer(RMSNorm(x)); out = h + MLP(RMSNorm(h))``.

The mixer is a ``DeltaProductMixer``, or softmax ``Attention`` for layers listed in
``config.attn["layers"]``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from dpjax.nn.attention import Attention
from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.init import initializer
from dpjax.nn.mixer import DeltaProductMixer
from dpjax.nn.mlp import GatedMLP
from dpjax.nn.norms import RMSNorm
from dpjax.nn.sequence import SequenceInfo


class Block(nnx.Module):
    """One layer ``[B, T, D] -> [B, T, D]``: ``attn_norm``, ``mixer``, ``mlp_norm``, ``mlp``."""

    def __init__(self, config: DeltaProductConfig, *, layer_idx: int, rngs: nnx.Rngs):
        c = config
        self.layer_idx = layer_idx
        self.is_attention = layer_idx in c.attention_layers
        kw = dict(dtype=c.compute_dtype, param_dtype=c.parameter_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, impl=c.norm_impl, **kw)
        mixer_cls = Attention if self.is_attention else DeltaProductMixer
        self.mixer = mixer_cls(c, layer_idx=layer_idx, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, impl=c.norm_impl, **kw)
        self.mlp = GatedMLP(
            c.hidden_size,
            c.mlp_intermediate_size,
            in_init=initializer(c, "mlp_in"),
            out_init=initializer(c, "mlp_out"),
            **kw,
        )

    def __call__(
        self,
        x: jax.Array,
        seq: SequenceInfo | None = None,
        *,
        return_cache: bool = False,
        cache_size: int | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """``x [B, T, D] -> [B, T, D]`` (and the mixer's decoding cache with ``return_cache``;
        ``cache_size`` = KV slots of attention layers)."""
        kwargs: dict[str, Any] = {"return_cache": return_cache}
        if self.is_attention:
            kwargs["cache_size"] = cache_size
        mixed = self.mixer(self.attn_norm(x), seq, **kwargs)
        cache = None
        if return_cache:
            mixed, cache = mixed
        h = x + mixed
        out = h + self.mlp(self.mlp_norm(h))
        return (out, cache) if return_cache else out

    def step(
        self, x: jax.Array, cache: dict[str, Any], **attention_kwargs: Any
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Decode one token ``x [B, D]`` -> ``(y [B, D], new cache)``. ``attention_kwargs``
        (``position``, ``index``, ``kv_positions``) are used by attention layers only."""
        if self.is_attention:
            mixed, cache = self.mixer.step(self.attn_norm(x), cache, **attention_kwargs)
        else:
            mixed, cache = self.mixer.step(self.attn_norm(x), cache)
        h = x + mixed
        return h + self.mlp(self.mlp_norm(h)), cache
