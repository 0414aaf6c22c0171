"""Serve packed text shards through Grain: rows -> per-process slice -> seeded shuffle -> repeat
-> example dict -> batches, with a checkpointable iterator.

A batch (per process) is a dict of ``int32`` arrays of shape ``[B, T]`` (``B = batch_size``,
``T = seq_len``):

- ``input_ids``:  ``row[:-1]``;
- ``labels``:     ``row[1:]`` (next token);
- ``segment_ids``: document id of each input token inside its row (``1, 2, ...``; ``0`` = padding);
  the id changes exactly at a document's BOS, which is where a linear-RNN state must reset
  (``dpjax.delta_product(..., segment_ids=...)``);
- ``positions``:  offset of the token from the start of its document fragment in this row
  (``0`` at every BOS and at the row start);
- ``loss_mask``:  ``1`` where ``labels`` is a real token, ``0`` where it is padding (only the
  last row of a split has padding). Predicting the next document's BOS from the last token of a
  document stays in the loss (it teaches where documents end), as in the paper's HF pipeline.

The iterator is a ``grain.DatasetIterator``: ``it.get_state()`` returns a small JSON-able dict and
``it.set_state(state)`` on a fresh iterator of the same dataset resumes at exactly the next batch
(also checkpointable with Orbax via ``grain.checkpoint``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dpjax.data.shards import PackedRows


def _import_grain():
    try:
        import grain
    except ImportError as err:  # the GPU box has no grain by default (JAX_NOTES §0.4)
        raise ImportError(
            "the text pipeline needs Grain: `pip install grain==0.2.18` (shards can still be "
            "read directly with dpjax.data.shards.PackedRows)"
        ) from err
    return grain


def row_to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"tokens", "segment_ids"}`` of one row (``[T+1]``) -> the model's example (``[T]``
    int32 arrays ``input_ids``, ``labels``, ``segment_ids``, ``positions``, ``loss_mask``)."""
    tokens = np.asarray(row["tokens"], np.int32)
    seg = np.asarray(row["segment_ids"], np.int32)
    inputs_seg = seg[:-1]
    t = np.arange(inputs_seg.shape[0], dtype=np.int32)
    start = np.ones_like(inputs_seg, dtype=bool)
    start[1:] = inputs_seg[1:] != inputs_seg[:-1]
    positions = t - np.maximum.accumulate(np.where(start, t, 0))
    return {
        "input_ids": tokens[:-1],
        "labels": tokens[1:],
        "segment_ids": inputs_seg,
        "positions": positions.astype(np.int32),
        "loss_mask": (seg[1:] != 0).astype(np.int32),
    }


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def text_dataset(
    shard_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """A ``grain.MapDataset`` of batches (see the module docstring for the batch dict).

    Args:
      shard_dir: a directory written by ``prepare_text_shards`` / ``... text prepare``.
      split: ``"train"`` or ``"validation"``.
      batch_size: per-process batch size ``B``.
      seed: shuffle seed; each epoch is reshuffled (derived from it).
      shuffle: ``False`` for evaluation (rows in file order).
      num_epochs: ``None`` repeats forever (training); ``1`` for one pass (evaluation).
      drop_remainder: keep every batch ``[B, T]`` (static shapes under ``jit``).
      process_index, process_count: this process's slice of the rows; default
        ``jax.process_index()`` / ``jax.process_count()``. Every process gets the same number of
        rows (the remainder ``len % process_count`` is dropped), so all processes run the same
        number of steps.
    """
    grain = _import_grain()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pi, pc = _process_slice(process_index, process_count)
    source = PackedRows(shard_dir, split)
    per_process = len(source) // pc
    if per_process == 0 or (drop_remainder and per_process < batch_size):
        raise ValueError(
            f"{str(shard_dir)!r} split {split!r} has {len(source)} rows: too few for "
            f"{pc} process(es) x batch_size {batch_size} (prepare more data or a smaller "
            "seq_len/batch)"
        )
    ds = grain.MapDataset.source(source)[pi : per_process * pc : pc]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(row_to_example).batch(batch_size, drop_remainder=drop_remainder)


def text_iterator(
    shard_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    worker_count: int = 0,
    state: dict[str, Any] | None = None,
    **dataset_kw: Any,
):
    """A checkpointable ``grain.DatasetIterator`` over :func:`text_dataset` batches.

    ``worker_count > 0`` prefetches in that many worker processes (``mp_prefetch``; the entry
    script then needs an ``if __name__ == "__main__":`` guard; batches then live in shared
    memory, so consume them rather than keep thousands, and call ``it.close()`` when done).
    ``state`` (from ``it.get_state()``) resumes exactly where that iterator stood — with or
    without workers, the stream of batches is the same.
    """
    grain = _import_grain()
    ds = text_dataset(shard_dir, split, batch_size=batch_size, **dataset_kw).to_iter_dataset()
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # google/grain#1355 (grain 0.2.18 + jax)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it
