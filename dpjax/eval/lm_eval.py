"""Perplexity of a language model on a split of packed text shards.

Rows are scored exactly as in training (``input_ids = row[:-1]``, ``labels = row[1:]``, padding
excluded by ``loss_mask``), each row on its own; ``segment_resets`` chooses whether the state is
reset at document starts inside a row (match how the model was trained).

Example::

    res = perplexity(model, "data/stdlib-bytes-512", "validation", batch_size=16)
    res["loss"], res["perplexity"], res["tokens"]
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax.data.shards import PackedRows
from dpjax.data.text_pipeline import row_to_example
from dpjax.eval._mesh import batch_sharding, op_sharding

__all__ = ["perplexity"]


def perplexity(
    model: nnx.Module,
    shard_dir: str | os.PathLike,
    split: str = "validation",
    *,
    batch_size: int = 16,
    max_rows: int | None = None,
    segment_resets: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over the rows of a split.

    Args:
      model: a ``DeltaProductLM`` (or anything with its call signature returning fp32 logits).
      shard_dir, split: the shards to score (``"validation"`` by default).
      batch_size: rows per forward pass (partial last batch padded with zero-weight rows).
      max_rows: score only the first N rows (None: all).
      segment_resets: pass ``segment_ids`` (state reset at document starts) to the model.
      mesh: optional; splits each batch over all its devices (single process).

    Returns:
      ``{"loss", "perplexity", "bits_per_token", "tokens", "rows"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows: expected None or >= 1, got {max_rows}")
    rows = PackedRows(shard_dir, split)
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    if n == 0:
        raise ValueError(f"split {split!r} of {str(shard_dir)!r} has no rows")
    batch_size, sharding = batch_sharding(mesh, batch_size, n)
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, ids, labels, mask, seg, weights):
        m = nnx.merge(graphdef, state)
        logits = m(ids, segment_ids=seg)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        w = mask.astype(jnp.float32) * weights[:, None]
        return jnp.sum(ce * w), jnp.sum(w)

    loss_sum, tokens = 0.0, 0.0
    for start in range(0, n, batch_size):
        examples = [row_to_example(rows[i]) for i in range(start, min(start + batch_size, n))]
        weights = np.zeros(batch_size, np.float32)
        weights[: len(examples)] = 1.0
        examples += [examples[-1]] * (batch_size - len(examples))
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        args = [batch["input_ids"], batch["labels"], batch["loss_mask"],
                batch["segment_ids"] if segment_resets else None, weights]  # fmt: skip
        if sharding is not None:
            args = [None if a is None else jax.device_put(a, sharding) for a in args]
        with op_sharding(mesh):
            s, t = jax.device_get(sums(state, *args))
        loss_sum += float(s)
        tokens += float(t)
    loss = loss_sum / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2.0),
        "tokens": int(tokens),
        "rows": n,
    }
