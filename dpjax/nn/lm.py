"""Causal language model: embedding -> L pre-norm blocks -> final RMSNorm -> (tied) head.

Also the decoding entry points used by ``dpjax.generate``: ``prefill`` (full forward that also
returns the recurrent cache) and ``decode_step`` (one token with the cache).

Cache (a pytree of plain dicts/lists of arrays)::

    {"layers": [per layer: {"state": [B,H,d_k,d_v] fp32, "conv_q"/"conv_k"/"conv_v":
                            [B,W-1,C] fp32}  (DeltaProduct; convs only with short conv)
                        or {"k", "v": [B,S,H_kv,hd]}  (attention layers)],
     "position": [B] int32      RoPE position of the next token (real tokens seen so far),
     "index": [] int32          next KV slot,
     "kv_positions": [B,S] int32 position of the token in each KV slot, -1 = empty/padding}

``S`` (cache_size) only matters for attention layers; pure DeltaProduct models keep ``S = 0``
by default and their cache does not grow with the sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.block import Block
from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.init import initializer
from dpjax.nn.linear import Embedding, Linear
from dpjax.nn.norms import RMSNorm
from dpjax.nn.sequence import SequenceInfo
from dpjax.nn.sharding_names import EMBEDDING, LM_HEAD

Cache = dict[str, Any]


class DeltaProductLM(nnx.Module):
    """(Gated) DeltaProduct / DeltaNet causal LM (optionally hybrid with softmax attention).

    Example::

        cfg = dpjax.nn.presets.get_preset("tiny")
        model = DeltaProductLM(cfg, rngs=nnx.Rngs(0))
        logits = model(input_ids)                     # [B, T, vocab] fp32

    Args:
      config: ``DeltaProductConfig``.
      rngs: ``nnx.Rngs`` (stream ``params`` or default).
    """

    def __init__(self, config: DeltaProductConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        kw = dict(dtype=c.compute_dtype, param_dtype=c.parameter_dtype, rngs=rngs)
        self.embeddings = Embedding(
            c.vocab_size, c.hidden_size, names=EMBEDDING, init=initializer(c, "embedding"), **kw
        )
        self.layers = nnx.List(
            [Block(c, layer_idx=i, rngs=rngs) for i in range(c.num_hidden_layers)]
        )
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, impl=c.norm_impl, **kw)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else Linear(
                c.hidden_size, c.vocab_size, names=LM_HEAD, init=initializer(c, "lm_head"), **kw
            )
        )

    # --- training / scoring ------------------------------------------------------------------
    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states ``[..., D]`` -> fp32 logits ``[..., vocab]``."""
        if self.lm_head is None:
            return self.embeddings.attend(hidden)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``input_ids [B, T]`` -> final-normed hidden states ``[B, T, D]`` (compute dtype)."""
        seq = self._sequence(input_ids, segment_ids, attention_mask)
        x = self.embeddings(input_ids)
        for block in self.layers:
            x = block(x, seq)
        return self.norm(x)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: ``[B, T]`` int token ids.
          segment_ids: optional ``[B, T]`` int document ids of packed sequences (documents are
            contiguous runs of one id; nothing flows between documents).
          attention_mask: optional ``[B, T]`` (1 = token, 0 = padding); left or right padding.
            Outputs at real tokens equal those of running each sequence alone; outputs at
            padding are unspecified.

        Returns:
          ``[B, T, vocab]`` fp32 logits.
        """
        hidden = self.hidden_states(
            input_ids, segment_ids=segment_ids, attention_mask=attention_mask
        )
        return self.logits_from_hidden(hidden)

    @staticmethod
    def _sequence(input_ids, segment_ids, attention_mask) -> SequenceInfo | None:
        if segment_ids is None and attention_mask is None:
            B, T = input_ids.shape
            return SequenceInfo(
                None, None, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            )
        return SequenceInfo.build(input_ids, segment_ids, attention_mask)

    # --- decoding ----------------------------------------------------------------------------
    def _default_cache_size(self, cache_size: int | None, minimum: int) -> int:
        if not self.config.attention_layers:
            return 0  # no KV cache: the recurrent state has a fixed size
        size = minimum if cache_size is None else cache_size
        if size < minimum:
            raise ValueError(f"cache_size={size} is smaller than the prompt length {minimum}")
        return size

    def init_cache(self, batch_size: int, cache_size: int | None = None) -> Cache:
        """Empty cache (no tokens seen) for ``batch_size`` rows and ``cache_size`` KV slots."""
        S = self._default_cache_size(cache_size, 0)
        layers = [
            block.mixer.init_cache(batch_size, S)
            if block.is_attention
            else block.mixer.init_cache(batch_size)
            for block in self.layers
        ]
        return {
            "layers": layers,
            "position": jnp.zeros((batch_size,), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
            "kv_positions": jnp.full((batch_size, S), -1, jnp.int32),
        }

    def prefill(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache_size: int | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Full forward over a prompt, returning its logits and the decoding cache.

        The cache continues the LAST token of each row (and its document, with
        ``segment_ids``): prompts of different lengths must be LEFT-padded
        (``attention_mask`` 0 on the left) so that every row ends with a real token.

        Args:
          input_ids: ``[B, T]``; attention_mask, segment_ids: as in ``__call__``.
          cache_size: KV slots for attention layers (>= T; generation uses T + new tokens).

        Returns:
          ``(logits [B, T, vocab] fp32, cache)``.
        """
        B, T = input_ids.shape
        S = self._default_cache_size(cache_size, T)
        seq = SequenceInfo.build(input_ids, segment_ids, attention_mask)
        x = self.embeddings(input_ids)
        layers = []
        for block in self.layers:
            x, layer_cache = block(x, seq, return_cache=True, cache_size=S)
            layers.append(layer_cache)
        logits = self.logits_from_hidden(self.norm(x))
        keep = seq.last_document()
        kv_positions = jnp.where(keep, seq.positions, -1)[:, :S]
        kv_positions = jnp.pad(
            kv_positions, ((0, 0), (0, S - kv_positions.shape[1])), constant_values=-1
        )
        cache = {
            "layers": layers,
            "position": jnp.sum(keep, axis=1, dtype=jnp.int32),
            "index": jnp.asarray(T, jnp.int32),
            "kv_positions": kv_positions,
        }
        return logits, cache

    def decode_step(self, token_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feed one token per row.

        Args:
          token_ids: ``[B]`` int.
          cache: from ``prefill``/``init_cache``/a previous ``decode_step``. Attention layers
            need a free KV slot (``index < S``).

        Returns:
          ``(logits [B, vocab] fp32, new cache)``.
        """
        position, index = cache["position"], cache["index"]
        kv_positions = cache["kv_positions"]
        if kv_positions.shape[1] > 0:
            kv_positions = jax.lax.dynamic_update_slice_in_dim(
                kv_positions, position[:, None], index, 1
            )
        x = self.embeddings(token_ids)
        layers = []
        for block, layer_cache in zip(self.layers, cache["layers"], strict=True):
            x, layer_cache = block.step(
                x, layer_cache, position=position, index=index, kv_positions=kv_positions
            )
            layers.append(layer_cache)
        logits = self.logits_from_hidden(self.norm(x))
        new_cache = {
            "layers": layers,
            "position": position + 1,
            "index": index + 1,
            "kv_positions": kv_positions,
        }
        return logits, new_cache
