"""Accuracy-vs-length curves (the paper's "sequence_accuracies", SPEC §5.5).

For every prefix length ``t`` the curve holds the fraction of sequences whose predictions are
correct at **all** positions ``0..t``. With the state-tracking tokenisation (BOS at position 0,
element ``x_t`` at position ``t``) position ``t`` is "after ``t`` group elements", so the curve's
index is the sequence length; ``curve.accuracy[-1]`` is the sequence accuracy.

Counting works on device (``prefix_correct_counts`` is jit-friendly and sums over the batch, so
batches and hosts reduce by addition); ``AccuracyCurve`` turns counts into a curve that can be
saved as JSON, plotted to PNG (matplotlib, Agg backend) and printed as a table.

Example::

    counts = prefix_correct_counts(jnp.argmax(logits, -1), labels)   # [T], summed over batch
    curve = AccuracyCurve.from_counts(np.asarray(counts), num_sequences=labels.shape[0])
    curve.save_json("curve.json"); plot_curves({"n_h=2": curve}, "curve.png")
    print(format_table({"n_h=2": curve}, lengths=[32, 64, 128]))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = [
    "AccuracyCurve",
    "default_table_lengths",
    "format_table",
    "prefix_correct",
    "prefix_correct_counts",
    "plot_curves",
]


def prefix_correct(predictions, labels, mask=None):
    """Per-sequence prefix correctness.

    Args:
      predictions, labels: int ``[B, T]``.
      mask: optional bool/float ``[B, T]``; positions with mask 0 count as correct (ignored).
    Returns:
      bool ``[B, T]``: entry ``[b, t]`` is True iff positions ``0..t`` of sequence ``b`` are all
      correct. Works on numpy and JAX arrays (returns the same kind).
    """
    xp = jnp if not isinstance(predictions, np.ndarray) else np
    correct = predictions == labels
    if mask is not None:
        correct = correct | (mask == 0)
    return xp.cumprod(correct.astype(xp.int32), axis=-1).astype(bool)


def prefix_correct_counts(predictions, labels, weights=None, mask=None):
    """Weighted count of sequences correct at all positions ``<= t``, for every ``t``.

    Args:
      predictions, labels: int ``[B, T]``.
      weights: optional float ``[B]`` per-sequence weights (0 for padding rows).
      mask: optional ``[B, T]`` positions to ignore (see ``prefix_correct``).
    Returns:
      float32 ``[T]`` (sum over the batch; divide by the weight total for accuracies).
    """
    ok = prefix_correct(predictions, labels, mask)
    xp = np if isinstance(ok, np.ndarray) else jnp
    w = xp.ones(ok.shape[0], xp.float32) if weights is None else weights.astype(xp.float32)
    return (ok.astype(xp.float32) * w[:, None]).sum(axis=0)


@dataclass
class AccuracyCurve:
    """Accuracy vs prefix length.

    Attributes:
      accuracy: float64 ``[T]``; ``accuracy[t]`` = fraction of sequences correct at all
        positions ``0..t``.
      num_sequences: how many sequences the curve averages over.
      train_length: optional training length ``k`` (drawn as a marker in plots).
    """

    accuracy: np.ndarray
    num_sequences: int
    train_length: int | None = None

    @classmethod
    def from_counts(
        cls, counts, num_sequences: float, train_length: int | None = None
    ) -> AccuracyCurve:
        """Curve from ``prefix_correct_counts`` summed over all batches."""
        if num_sequences <= 0:
            raise ValueError(f"num_sequences must be > 0, got {num_sequences}")
        acc = np.asarray(counts, dtype=np.float64) / float(num_sequences)
        return cls(acc, int(round(num_sequences)), train_length)

    @classmethod
    def from_predictions(
        cls, predictions, labels, mask=None, train_length: int | None = None
    ) -> AccuracyCurve:
        """Curve from int ``[B, T]`` predictions and labels (numpy)."""
        predictions, labels = np.asarray(predictions), np.asarray(labels)
        if predictions.shape != labels.shape or predictions.ndim != 2:
            raise ValueError(
                f"predictions and labels must both be [B, T], got {predictions.shape} and "
                f"{labels.shape}"
            )
        counts = prefix_correct_counts(predictions, labels, None, mask)
        return cls.from_counts(counts, predictions.shape[0], train_length)

    @property
    def lengths(self) -> np.ndarray:
        """int ``[T]``: the prefix length of each entry (= position index)."""
        return np.arange(len(self.accuracy))

    @property
    def sequence_accuracy(self) -> float:
        """Accuracy of whole sequences (the curve's last value)."""
        return float(self.accuracy[-1])

    def at(self, length: int) -> float:
        """Accuracy at prefix length ``length`` (clipped to the curve's range)."""
        return float(self.accuracy[min(max(int(length), 0), len(self.accuracy) - 1)])

    def longest_length_above(self, threshold: float = 0.99) -> int:
        """Largest ``t`` such that the accuracy at every length ``<= t`` is ``>= threshold``.

        Returns -1 when even position 0 is below the threshold.
        """
        below = np.nonzero(self.accuracy < threshold)[0]
        return len(self.accuracy) - 1 if len(below) == 0 else int(below[0]) - 1

    def to_dict(self) -> dict:
        return {
            "lengths": self.lengths.tolist(),
            "accuracy": [float(a) for a in self.accuracy],
            "num_sequences": self.num_sequences,
            "train_length": self.train_length,
            "sequence_accuracy": self.sequence_accuracy,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AccuracyCurve:
        return cls(
            np.asarray(d["accuracy"], np.float64), int(d["num_sequences"]), d.get("train_length")
        )

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> AccuracyCurve:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def default_table_lengths(max_length: int, train_length: int | None = None) -> list[int]:
    """A handful of lengths for tables: powers of two up to ``max_length``, plus ``k``."""
    lengths = {max_length}
    p = 8
    while p < max_length:
        lengths.add(p)
        p *= 2
    if train_length is not None and train_length <= max_length:
        lengths.add(train_length)
    return sorted(lengths)


def format_table(
    curves: Mapping[str, AccuracyCurve],
    lengths: Sequence[int] | None = None,
    *,
    markdown: bool = True,
    threshold: float = 0.99,
) -> str:
    """A table with one row per curve: accuracy at the chosen lengths and the longest length
    with accuracy ``>= threshold``.

    Args:
      curves: label -> curve.
      lengths: columns (default: powers of two up to the longest curve, plus the train length).
      markdown: a markdown table (else aligned plain text).
    """
    if not curves:
        raise ValueError("format_table: need at least one curve")
    if lengths is None:
        max_len = max(len(c.accuracy) - 1 for c in curves.values())
        train = next((c.train_length for c in curves.values() if c.train_length), None)
        lengths = default_table_lengths(max_len, train)
    header = ["model"] + [f"acc@{n}" for n in lengths] + [f"len(acc≥{threshold:g})"]
    rows = [
        [label]
        + [f"{c.at(n):.3f}" if n < len(c.accuracy) else "-" for n in lengths]
        + [str(c.longest_length_above(threshold))]
        for label, c in curves.items()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def plot_curves(
    curves: Mapping[str, AccuracyCurve],
    path: str | os.PathLike,
    *,
    title: str = "Accuracy vs sequence length",
    train_length: int | None = None,
) -> None:
    """Plot curves (accuracy of all positions ``<= t`` vs ``t``) to a PNG with matplotlib/Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if train_length is None:
        train_length = next((c.train_length for c in curves.values() if c.train_length), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, c in curves.items():
        ax.plot(c.lengths[1:], c.accuracy[1:], label=label, linewidth=1.6)
    if train_length:
        ax.axvline(train_length, color="gray", linestyle="--", linewidth=1, label="train length")
    ax.set_xlabel("sequence length t")
    ax.set_ylabel("accuracy (all positions ≤ t correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
