"""Causal softmax attention for hybrid layers (FLA's ``Attention``): RoPE, GQA, optional sliding
window, padding/document masks, and a KV cache for decoding.

``head_dim = hidden_size // num_heads``; ``q_proj [D, H*hd]``, ``k_proj``/``v_proj
[D, H_kv*hd]`` (optional biases), ``o_proj [H*hd, D]``. Query ``i`` sees key ``j`` iff ``j``
is a real token of the same document, ``j <= i``, and (with ``window_size = w``) at most
``w - 1`` real tokens back (FLA's flash-attn ``window_size=(w-1, 0)``). Softmax in fp32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.init import initializer
from dpjax.nn.linear import Linear
from dpjax.nn.rope import apply_rope
from dpjax.nn.sequence import SequenceInfo
from dpjax.nn.sharding_names import IN_PROJ, OUT_PROJ

AttentionCache = dict[str, Any]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped softmax attention.

    Args:
      q: ``[B, Tq, H, hd]``; k, v: ``[B, Tk, H_kv, hd]``; allowed: ``[B, Tq, Tk]`` bool.

    Returns:
      ``[B, Tq, H, hd]`` in ``q.dtype``. Rows with no allowed key give finite garbage.
    """
    B, Tq, H, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Tq, Hkv, H // Hkv, hd)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(B, Tq, H, hd).astype(q.dtype)


class Attention(nnx.Module):
    """Softmax attention mixer ``[B, T, D] -> [B, T, D]`` configured by ``config.attn``."""

    def __init__(self, config: DeltaProductConfig, *, layer_idx: int = 0, rngs: nnx.Rngs):
        if config.attn is None:
            raise ValueError("Attention: config.attn is None")
        a = config.attn
        self.config = config
        self.layer_idx = layer_idx
        D = config.hidden_size
        self.num_heads = a["num_heads"]
        self.num_kv_heads = a["num_kv_heads"]
        self.head_dim = D // self.num_heads
        self.window_size = a["window_size"]
        self.rope_theta = a["rope_theta"]
        kw = dict(dtype=config.compute_dtype, param_dtype=config.parameter_dtype, rngs=rngs)
        init_in = initializer(config, "attn_in")
        hd = self.head_dim

        def proj(heads):
            return Linear(D, heads * hd, names=IN_PROJ, init=init_in, use_bias=a["qkv_bias"], **kw)

        self.q_proj = proj(self.num_heads)
        self.k_proj = proj(self.num_kv_heads)
        self.v_proj = proj(self.num_kv_heads)
        self.o_proj = Linear(
            self.num_heads * hd, D, names=OUT_PROJ, init=initializer(config, "attn_out"), **kw
        )

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        lead = x.shape[:-1]
        hd = self.head_dim
        q = self.q_proj(x).reshape(*lead, self.num_heads, hd)
        k = self.k_proj(x).reshape(*lead, self.num_kv_heads, hd)
        v = self.v_proj(x).reshape(*lead, self.num_kv_heads, hd)
        return (
            apply_rope(q, positions, self.rope_theta),
            apply_rope(k, positions, self.rope_theta),
            v,
        )

    def _in_window(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | bool:
        if self.window_size is None:
            return True
        return q_pos - k_pos < self.window_size

    def __call__(
        self,
        x: jax.Array,
        seq: SequenceInfo | None = None,
        *,
        return_cache: bool = False,
        cache_size: int | None = None,
    ) -> jax.Array | tuple[jax.Array, AttentionCache]:
        """Attend over a sequence.

        Args:
          x: ``[B, T, D]``.
          seq: padding mask / documents / positions; None = one unpadded document per row.
          return_cache: also return ``{"k", "v": [B, cache_size, H_kv, hd]}`` holding this
            sequence's (rotated) keys and values in slots ``0..T-1``, zeros after.
          cache_size: number of cache slots (default ``T``).
        """
        B, T, _ = x.shape
        if seq is None:
            seq = SequenceInfo.build(jnp.zeros((B, T), jnp.int32))
        pos = seq.positions
        q, k, v = self._qkv(x, pos)
        idx = jnp.arange(T)
        allowed = (idx[None, :, None] >= idx[None, None, :]) & self._in_window(
            pos[:, :, None], pos[:, None, :]
        )
        if seq.mask is not None:
            allowed = allowed & seq.mask[:, None, :]
        if seq.segment_ids is not None:
            allowed = allowed & (seq.segment_ids[:, :, None] == seq.segment_ids[:, None, :])
        o = _attend(q, k, v, allowed)
        out = self.o_proj(o.reshape(B, T, -1))
        if not return_cache:
            return out
        size = T if cache_size is None else cache_size
        if size < T:
            raise ValueError(f"cache_size={size} is smaller than the sequence length {T}")
        pad = ((0, 0), (0, size - T), (0, 0), (0, 0))
        return out, {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}

    def init_cache(self, batch_size: int, cache_size: int) -> AttentionCache:
        """Empty KV cache ``[B, cache_size, H_kv, hd]`` (compute dtype)."""
        shape = (batch_size, cache_size, self.num_kv_heads, self.head_dim)
        dtype = self.config.compute_dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def step(
        self,
        x: jax.Array,
        cache: AttentionCache,
        *,
        position: jax.Array,
        index: jax.Array,
        kv_positions: jax.Array,
    ) -> tuple[jax.Array, AttentionCache]:
        """Decode one token.

        Args:
          x: ``[B, D]``.
          cache: ``{"k", "v": [B, S, H_kv, hd]}``.
          position: ``[B]`` int RoPE position of this token.
          index: scalar int slot to write this token's key/value to.
          kv_positions: ``[B, S]`` int position of the token in each slot (this token's slot
            included), ``-1`` for empty slots and padding.

        Returns:
          ``(y [B, D], new cache)``.
        """
        q, k, v = self._qkv(x[:, None], position[:, None])  # [B, 1, ., hd]
        k_cache = jax.lax.dynamic_update_slice_in_dim(
            cache["k"], k.astype(cache["k"].dtype), index, 1
        )
        v_cache = jax.lax.dynamic_update_slice_in_dim(
            cache["v"], v.astype(cache["v"].dtype), index, 1
        )
        allowed = (kv_positions >= 0) & self._in_window(position[:, None], kv_positions)
        o = _attend(q, k_cache, v_cache, allowed[:, None, :])
        return self.o_proj(o.reshape(x.shape[0], -1)), {"k": k_cache, "v": v_cache}
