"""Per-position loss on long sequences: length extrapolation (SPEC §6.2).

Protocol of the paper's ``length_extrapolation.py``: documents (BOS each) are concatenated and
cut into non-overlapping chunks of ``length + 1`` tokens; the model reads ``chunk[:-1]`` as ONE
sequence (no state reset at document starts unless ``segment_resets``) and is scored on
``chunk[1:]``. For every position ``t`` we report the mean token cross-entropy over chunks
(``token_loss``, the plotted "token loss vs sequence length") and the perplexity of the running
average up to ``t`` (``running_perplexity``).

Our packed shards already hold the concatenated document stream (rows are consecutive slices of
it, ``dpjax.data.shards``), so ``long_sequences`` just glues the rows of a split back together.

Example::

    seqs = long_sequences("data/stdlib-bytes-512", "validation", length=2048, max_sequences=16)
    res = per_position_loss(model, seqs, batch_size=4, train_length=512)
    res.save_json("per_position.json"); plot_per_position({"DP2": res}, "per_position.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax.data.shards import PackedRows
from dpjax.eval._mesh import batch_sharding, op_sharding

__all__ = [
    "PerPositionLoss",
    "long_sequences",
    "per_position_loss",
    "plot_per_position",
    "segment_ids_from_bos",
    "token_losses",
]


def long_sequences(
    shard_dir: str | os.PathLike,
    split: str = "validation",
    *,
    length: int,
    max_sequences: int | None = None,
) -> np.ndarray:
    """Non-overlapping chunks of the split's token stream.

    Args:
      shard_dir: a directory written by ``prepare_text_shards``.
      split: ``"validation"`` (default) or ``"train"``.
      length: model input length ``L``; each chunk holds ``L + 1`` tokens.
      max_sequences: stop after this many chunks (None: all whole chunks).

    Returns:
      ``int32 [N, L + 1]`` (the trailing partial chunk is dropped).

    Raises:
      ValueError: bad arguments, or the split holds fewer than ``L + 1`` tokens.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences: expected None or >= 1, got {max_sequences!r}")
    rows = PackedRows(shard_dir, split)
    need = None if max_sequences is None else max_sequences * (length + 1)
    parts, have = [], 0
    for i in range(len(rows)):
        row = rows[i]
        tokens = row["tokens"][row["segment_ids"] != 0]  # drop the final row's padding
        parts.append(tokens)
        have += tokens.size
        if need is not None and have >= need:
            break
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = stream.size // (length + 1)
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(
            f"split {split!r} of {str(shard_dir)!r} holds {stream.size} tokens: fewer than one "
            f"sequence of length + 1 = {length + 1}; use a smaller length or more data"
        )
    return stream[: n * (length + 1)].reshape(n, length + 1).astype(np.int32)


def segment_ids_from_bos(input_ids: np.ndarray, bos_id: int) -> np.ndarray:
    """``int32 [B, L]`` document ids that start a new document at every ``bos_id`` (and at 0)."""
    ids = np.asarray(input_ids)
    starts = ids == bos_id
    starts[:, 0] = True
    return np.cumsum(starts, axis=1).astype(np.int32)


def token_losses(
    model: nnx.Module,
    input_ids: jax.Array,
    labels: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block: int = 1024,
) -> jax.Array:
    """Per-token cross-entropy ``fp32 [B, L]`` of a ``DeltaProductLM``.

    Logits are made ``block`` positions at a time from the hidden states, so a long sequence
    with a large vocabulary never materialises ``[B, L, vocab]``.
    """
    hidden = model.hidden_states(input_ids, segment_ids=segment_ids)  # [B, L, D]
    B, L, D = hidden.shape
    blk = min(block, L)
    pad = (-L) % blk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, blk, D)
    y = jnp.pad(labels, ((0, 0), (0, pad))).reshape(B, -1, blk)

    def one(args):
        hb, yb = args  # [B, blk, D], [B, blk]
        logits = model.logits_from_hidden(hb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb)

    ce = jax.lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))  # [nb, B, blk]
    return jnp.moveaxis(ce, 0, 1).reshape(B, -1)[:, :L].astype(jnp.float32)


@dataclass
class PerPositionLoss:
    """Mean token loss at every position of long sequences.

    Attributes:
      token_loss: ``fp32 [L]``, mean cross-entropy at position ``t`` (predicting token ``t+1``).
      num_sequences: sequences averaged.
      train_length: the model's training length (marked on plots), or None.
      segment_resets: whether the state was reset at document starts.
    """

    token_loss: np.ndarray
    num_sequences: int
    train_length: int | None = None
    segment_resets: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.token_loss.shape[0])

    @property
    def running_perplexity(self) -> np.ndarray:
        """``exp`` of the mean loss over positions ``0..t``, ``[L]``."""
        csum = np.cumsum(self.token_loss.astype(np.float64))
        return np.exp(csum / np.arange(1, self.length + 1)).astype(np.float32)

    def mean_between(self, start: int, stop: int) -> float:
        """Mean token loss over positions ``[start, stop)`` (clipped to the curve)."""
        seg = self.token_loss[max(0, start) : min(stop, self.length)]
        return float(np.mean(seg)) if seg.size else float("nan")

    def bucketed(self, num_buckets: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(bucket end positions, mean loss per bucket)`` for plotting/tables."""
        edges = np.unique(np.linspace(0, self.length, num_buckets + 1).astype(int))
        means = np.array(
            [self.token_loss[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)]
        )
        return edges[1:], means

    def to_dict(self) -> dict:
        return {
            "token_loss": [float(x) for x in self.token_loss],
            "running_perplexity": [float(x) for x in self.running_perplexity],
            "num_sequences": self.num_sequences,
            "length": self.length,
            "train_length": self.train_length,
            "segment_resets": self.segment_resets,
            **self.extra,
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> PerPositionLoss:
        with open(path) as f:
            d = json.load(f)
        known = {"token_loss", "running_perplexity", "num_sequences", "length", "train_length",
                 "segment_resets"}  # fmt: skip
        return cls(
            np.asarray(d["token_loss"], np.float32),
            int(d["num_sequences"]),
            d.get("train_length"),
            bool(d.get("segment_resets", False)),
            {k: v for k, v in d.items() if k not in known},
        )


def per_position_loss(
    model: nnx.Module,
    sequences: np.ndarray,
    *,
    batch_size: int = 4,
    train_length: int | None = None,
    segment_resets: bool = False,
    bos_id: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> PerPositionLoss:
    """Mean per-position loss of ``model`` over ``sequences``.

    Args:
      model: a ``DeltaProductLM`` (any implementation; runs in its compute dtype, fp32 loss).
      sequences: ``int [N, L + 1]`` (from ``long_sequences``).
      batch_size: sequences per forward pass (a trailing partial batch is padded with
        zero-weight repeats, so one compiled shape serves every batch).
      train_length: stored and plotted as the training length.
      segment_resets: reset the state at every ``bos_id`` (document start); default False =
        the paper's protocol (one stream per chunk).
      bos_id: needed with ``segment_resets``.
      mesh: optional; splits each batch over all its devices (``batch_size`` rounded up to a
        multiple of the device count). Single process only.

    Returns:
      ``PerPositionLoss`` with ``token_loss [L]``.
    """
    seqs = np.asarray(sequences)
    if seqs.ndim != 2 or seqs.shape[1] < 2 or seqs.shape[0] < 1:
        raise ValueError(f"sequences: expected int [N >= 1, L + 1 >= 2], got shape {seqs.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if segment_resets and bos_id is None:
        raise ValueError("segment_resets=True needs bos_id (the tokenizer's BOS id)")
    n = seqs.shape[0]
    batch_size, sharding = batch_sharding(mesh, batch_size, n)
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, ids, labels, seg, weights):
        m = nnx.merge(graphdef, state)
        ce = token_losses(m, ids, labels, segment_ids=seg)
        return jnp.sum(ce * weights[:, None], axis=0)  # [L]

    total = np.zeros(seqs.shape[1] - 1, np.float64)
    for start in range(0, n, batch_size):
        rows = seqs[start : start + batch_size]
        m = rows.shape[0]
        weights = np.zeros(batch_size, np.float32)
        weights[:m] = 1.0
        if m < batch_size:
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - m, axis=0)])
        ids, labels = rows[:, :-1], rows[:, 1:]
        seg = segment_ids_from_bos(ids, bos_id) if segment_resets else None
        args = (ids, labels, seg, weights)
        if sharding is not None:
            args = tuple(None if a is None else jax.device_put(a, sharding) for a in args)
        with op_sharding(mesh):
            total += np.asarray(jax.device_get(losses(state, *args)), np.float64)
    return PerPositionLoss((total / n).astype(np.float32), n, train_length, bool(segment_resets))


def plot_per_position(
    results: Mapping[str, PerPositionLoss],
    path: str | os.PathLike,
    *,
    title: str = "Token loss vs position",
    num_buckets: int = 64,
) -> None:
    """Line plot (PNG) of bucketed per-position loss, one line per entry, training length
    marked with a dashed vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = set()
    for name, res in results.items():
        x, y = res.bucketed(num_buckets)
        ax.plot(x, y, marker=".", ms=3, label=name)
        if res.train_length:
            lengths.add(res.train_length)
    for L in sorted(lengths):
        ax.axvline(L, color="gray", ls="--", lw=1)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if results:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
