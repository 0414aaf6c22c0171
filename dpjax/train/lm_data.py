"""Language-model batches from packed text shards, the same global batches for any number of
processes.

``dpjax.data.text_pipeline`` slices rows per process *before* shuffling, so the global batch of a
run depends on the process count. Here the row order is one seeded global shuffle (re-shuffled
every epoch by Grain), global batch ``b`` is rows ``[b*G, (b+1)*G)`` of it, and process ``p`` of
``P`` reads rows ``[b*G + p*G/P, b*G + (p+1)*G/P)`` — so a run on 1 process and on ``P``
processes trains on exactly the same global batches (the tests compare their losses), and the
iterator position (one count, the same in every process) means the same thing for any ``P``.

A batch (per process) is ``{"input_ids", "labels", "loss_mask"[, "segment_ids"]}``, int32
``[G/P, T]`` (``dpjax.data.text_pipeline.row_to_example``); ``segment_ids`` only with
``segment_resets`` (the model then resets its state at document starts inside a row).
"""

from __future__ import annotations

import os

import numpy as np

from dpjax.data.shards import PackedRows
from dpjax.data.text_pipeline import _import_grain, row_to_example

__all__ = ["eval_arrays", "lm_dataset"]

_KEYS = ("input_ids", "labels", "loss_mask")


class _ProcessRows:
    """Random-access rows of this process: element ``i`` is global row
    ``(i // local) * global + process * local + i % local`` of ``rows``."""

    def __init__(self, rows, global_batch: int, process_index: int, process_count: int):
        self.rows = rows
        self.global_batch = global_batch
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self._len = (len(rows) // global_batch) * self.local

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        b, j = divmod(int(i), self.local)
        return self.rows[b * self.global_batch + self.offset + j]


def _keep(segment_resets: bool):
    keys = _KEYS + (("segment_ids",) if segment_resets else ())

    def fn(row):
        ex = row_to_example(row)
        return {k: ex[k] for k in keys}

    return fn


def lm_dataset(
    shard_dir: str | os.PathLike,
    split: str = "train",
    *,
    global_batch: int,
    seed: int = 0,
    segment_resets: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """A ``grain.IterDataset`` of this process's share of each global batch (endless, shuffled).

    Args:
      shard_dir: a directory written by ``prepare_text_shards``.
      split: usually ``"train"``.
      global_batch: rows per optimizer micro-step over all processes (``G``); must divide by
        the process count.
      seed: shuffle seed (epochs are reshuffled from it).
      segment_resets: include ``segment_ids`` (state reset at document starts).
      process_index, process_count: default ``jax.process_index()/process_count()``.

    Raises:
      ValueError: ``G`` not divisible by the process count, or fewer than ``G`` rows.
    """
    grain = _import_grain()
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} must be a positive multiple of the process count "
            f"{process_count}"
        )
    source = PackedRows(shard_dir, split)
    if len(source) < global_batch:
        raise ValueError(
            f"{str(shard_dir)!r} split {split!r} has {len(source)} rows, fewer than one global "
            f"batch of {global_batch}: prepare more data or use a smaller batch"
        )
    rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    local = global_batch // process_count
    ds = grain.MapDataset.source(_ProcessRows(rows, global_batch, process_index, process_count))
    return ds.map(_keep(segment_resets)).batch(local, drop_remainder=True).to_iter_dataset()


def eval_arrays(
    shard_dir: str | os.PathLike,
    split: str = "validation",
    *,
    max_rows: int | None = None,
    segment_resets: bool = False,
) -> dict[str, np.ndarray]:
    """The first ``max_rows`` rows of a split as numpy arrays ``[N, T]`` (the loop's eval set)."""
    source = PackedRows(shard_dir, split)
    n = len(source) if max_rows is None else min(len(source), max_rows)
    if n == 0:
        raise ValueError(f"{str(shard_dir)!r} split {split!r} has no rows")
    keep = _keep(segment_resets)
    examples = [keep(source[i]) for i in range(n)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
