"""Packed documents: turn ``segment_ids`` / ``cu_seqlens`` into per-token resets, and move
``cu_seqlens`` documents into rows of their own when per-document states are needed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.ops.validation import is_concrete


def resets_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int segment ids -> ``[B, T]`` bool, True where a token starts a new document
    (a change of id from the previous token; the first token of a row is not a reset)."""
    seg = jnp.asarray(segment_ids)
    first = jnp.zeros((seg.shape[0], 1), bool)
    return jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)


def resets_from_cu_seqlens(cu_seqlens: jax.Array, tokens: int) -> jax.Array:
    """``[N+1]`` offsets -> ``[1, T]`` bool resets at every document start but the first."""
    starts = jnp.asarray(cu_seqlens)[1:-1]
    return jnp.zeros((tokens,), bool).at[starts].set(True, mode="drop")[None]


class DocumentRows:
    """Gather the ``N`` documents of a packed batch-1 sequence into ``[N, T_max]`` rows.

    ``T_max`` is the longest document when ``cu_seqlens`` is concrete, else ``T`` (every document
    fits, so this is correct under ``jit``, at the price of ``N x T`` work). Padding uses zero
    q/k/v/beta and zero gates, which leave the state unchanged: a row's final state is its
    document's.
    """

    def __init__(self, cu_seqlens, tokens: int):
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        self.num_docs = cu.shape[0] - 1
        if is_concrete(cu_seqlens):
            self.max_len = int(np.max(np.diff(np.asarray(cu_seqlens))))
        else:
            self.max_len = tokens
        t = jnp.arange(self.max_len)
        lengths = cu[1:] - cu[:-1]
        self.valid = t[None, :] < lengths[:, None]  # [N, T_max]
        self.index = jnp.where(self.valid, cu[:-1, None] + t[None, :], 0)  # [N, T_max]
        pos = jnp.arange(tokens)
        self.doc_of_token = jnp.searchsorted(cu, pos, side="right") - 1  # [T]
        self.offset_in_doc = pos - cu[self.doc_of_token]

    def rows(self, x: jax.Array, substeps: int = 1) -> jax.Array:
        """``[1, T*substeps, ...]`` -> ``[N, T_max*substeps, ...]`` with zeros past each end."""
        tail = x.shape[2:]
        x = x[0].reshape(-1, substeps, *tail)
        out = x[self.index]  # [N, T_max, substeps, ...]
        mask = self.valid.reshape(*self.valid.shape, *([1] * (out.ndim - 2)))
        out = jnp.where(mask, out, jnp.zeros((), out.dtype))
        return out.reshape(self.num_docs, self.max_len * substeps, *tail)

    def unrows(self, y: jax.Array) -> jax.Array:
        """``[N, T_max, ...]`` token-level rows -> ``[1, T, ...]`` packed."""
        return y[self.doc_of_token, self.offset_in_doc][None]
