"""Per-token bookkeeping shared by all layers of one forward pass: padding mask, packed-document
ids and per-document positions."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SequenceInfo:
    """Which tokens are real, which document each belongs to, and its position in it.

    Attributes:
      segment_ids: ``[B, T]`` int32 document ids or None (one document per row). Documents are
        contiguous runs of equal ids; a change of id starts a new document.
      mask: ``[B, T]`` bool, False for padding, or None (no padding).
      positions: ``[B, T]`` int32: number of real tokens before this one in its document (the
        RoPE position it would have if its document ran alone). Padding gets the count so far.
    """

    segment_ids: jax.Array | None
    mask: jax.Array | None
    positions: jax.Array

    @classmethod
    def build(
        cls,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> SequenceInfo:
        """From ``input_ids [B, T]`` and optional ``segment_ids``/``attention_mask [B, T]``
        (attention_mask: 1 = token, 0 = pad; any int/bool/float dtype)."""
        B, T = np.shape(input_ids)
        for name, x in (("segment_ids", segment_ids), ("attention_mask", attention_mask)):
            if x is not None and np.shape(x) != (B, T):
                raise ValueError(
                    f"{name}: expected shape [B, T] = {(B, T)} like input_ids, got {np.shape(x)}"
                )
        seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask) != 0
        valid = jnp.ones((B, T), jnp.int32) if mask is None else mask.astype(jnp.int32)
        before = jnp.cumsum(valid, axis=1) - valid  # real tokens before t in the row
        if seg is None:
            positions = before
        else:
            starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
            base = jax.lax.cummax(jnp.where(starts, before, 0), axis=1)
            positions = before - base
        return cls(seg, mask, positions.astype(jnp.int32))

    def last_document(self) -> jax.Array:
        """``[B, T]`` bool: real tokens of the document that the row's last token belongs to
        (what a decoding cache built from this batch remembers)."""
        B, T = self.positions.shape
        keep = jnp.ones((B, T), bool)
        if self.segment_ids is not None:
            keep = self.segment_ids == self.segment_ids[:, -1:]
        if self.mask is not None:
            keep = keep & self.mask
        return keep
