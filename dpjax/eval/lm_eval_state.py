"""Effective state rank of a ``DeltaProductLM``, per layer and head, over token positions.

The paper's analysis (SPEC §6.2: ``collect_activations.py`` -> ``effective_state_rank.py``):
record the mixer's ``(k, v, beta, g)`` for one sequence at every layer, replay the recurrence in
fp32 and take the effective rank ``exp(H(sigma / sum sigma))`` of the ``d_k x d_v`` state after
each token (``dpjax.eval.state_rank``).

``mixer_inputs`` returns the op inputs of a ``DeltaProductMixer`` (``DeltaProductMixer.op_inputs``,
the same code its ``__call__`` feeds to ``delta_product``); the tests check that feeding them to
``delta_product`` + ``mixer._output`` reproduces ``mixer(x)``.

Example::

    ranks = state_rank_by_layer(model, ids[None], every=8)     # StateRanks
    ranks.save_json("state_rank.json"); ranks.plot("state_rank.png")
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpjax.eval.state_rank import state_rank_trace
from dpjax.nn.mixer import DeltaProductMixer
from dpjax.nn.sequence import SequenceInfo

__all__ = ["StateRanks", "capture_mixer_inputs", "mixer_inputs", "state_rank_by_layer"]


def mixer_inputs(
    mixer: DeltaProductMixer, x: jax.Array, seq: SequenceInfo | None = None
) -> dict[str, jax.Array | None]:
    """The ``delta_product`` inputs a ``DeltaProductMixer`` computes from ``x [B, T, D]``
    (``DeltaProductMixer.op_inputs``: ``q``, ``k``, ``v``, ``beta``, ``g``, ``segment_ids``)."""
    return mixer.op_inputs(x, seq)


def capture_mixer_inputs(
    model: nnx.Module,
    input_ids: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
) -> dict[int, dict[str, jax.Array | None]]:
    """Run ``model`` (a ``DeltaProductLM``) layer by layer and return, for every DeltaProduct
    layer index, its mixer's op inputs (``mixer_inputs``). Attention layers are skipped."""
    seq = model._sequence(input_ids, segment_ids, None)
    x = model.embeddings(input_ids)
    out: dict[int, dict[str, jax.Array | None]] = {}
    for i, block in enumerate(model.layers):
        if not block.is_attention:
            out[i] = mixer_inputs(block.mixer, block.attn_norm(x), seq)
        x = block(x, seq)
    return out


@dataclass
class StateRanks:
    """Effective state ranks.

    Attributes:
      ranks: ``fp32 [num_layers, P, H]`` for the DeltaProduct layers in ``layers``.
      layers: layer indices (attention layers excluded).
      positions: ``int [P]`` token positions (0-based) after which the rank was taken.
      bos_positions: positions of BOS tokens in the sequence (document starts).
      train_length: marked on plots.
    """

    ranks: np.ndarray
    layers: list[int]
    positions: np.ndarray
    bos_positions: list[int]
    train_length: int | None = None
    head_dim: int | None = None

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "positions": [int(p) for p in self.positions],
            "bos_positions": self.bos_positions,
            "train_length": self.train_length,
            "head_dim": self.head_dim,
            "ranks": {
                str(layer): np.round(self.ranks[i].T, 4).tolist()  # [H][P]
                for i, layer in enumerate(self.layers)
            },
            "mean_rank_per_layer": {
                str(layer): float(self.ranks[i].mean()) for i, layer in enumerate(self.layers)
            },
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    def plot(self, path: str | os.PathLike, *, title: str = "Effective state rank") -> None:
        """One panel per layer, one line per head; dashed line = training length, ticks at the
        bottom = document starts (BOS)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.layers)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for i, layer in enumerate(self.layers):
            ax = axes[i // cols][i % cols]
            for h in range(self.ranks.shape[2]):
                ax.plot(self.positions, self.ranks[i, :, h], lw=0.9)
            if self.train_length:
                ax.axvline(self.train_length, color="gray", ls="--", lw=1)
            if self.bos_positions:
                ax.plot(self.bos_positions, [0.0] * len(self.bos_positions), "|", color="k",
                        ms=6, alpha=0.6)  # fmt: skip
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel("position", fontsize=8)
            ax.set_ylabel("erank", fontsize=8)
            ax.grid(alpha=0.3)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def state_rank_by_layer(
    model: nnx.Module,
    input_ids: np.ndarray,
    *,
    every: int = 1,
    segment_resets: bool = False,
    bos_id: int | None = None,
    train_length: int | None = None,
) -> StateRanks:
    """Effective state rank per DeltaProduct layer and head over the positions of one sequence.

    Args:
      model: a ``DeltaProductLM``.
      input_ids: ``int [T]`` or ``[1, T]``: one sequence.
      every: record every ``every``-th position (SVDs dominate the cost).
      segment_resets: replay with a state reset at every ``bos_id`` (as a model trained with
        document resets runs); default False (one stream, the paper's analysis).
      bos_id: BOS id (marks document starts on the plot; required with ``segment_resets``).
      train_length: stored for plots.

    Returns:
      ``StateRanks`` with ``ranks [layers, ceil(T / every), H]``.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids: expected one sequence [T] or [1, T], got {ids.shape}")
    if every < 1:
        raise ValueError(f"every: expected >= 1, got {every}")
    if segment_resets and bos_id is None:
        raise ValueError("segment_resets=True needs bos_id")
    T = ids.shape[1]
    seg = None
    if segment_resets:
        from dpjax.eval.per_position import segment_ids_from_bos

        seg = jnp.asarray(segment_ids_from_bos(ids, bos_id))
    c = model.config
    n = c.num_householder
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, seg):
        m = nnx.merge(graphdef, state)
        captured = capture_mixer_inputs(m, ids, segment_ids=seg)
        if seg is not None:  # a document start acts as a gate of -inf (state -> 0)
            starts = jnp.concatenate([jnp.zeros((1, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        ranks = {}
        for layer, inp in captured.items():
            g = inp["g"]
            if seg is not None:
                g0 = jnp.zeros(starts.shape + (c.num_heads,), jnp.float32) if g is None else g
                g = jnp.where(starts[..., None], -jnp.inf, g0)
            ranks[layer] = state_rank_trace(
                inp["k"],
                inp["v"],
                inp["beta"],
                g,
                num_householder=n,
                every=every,
                normalize_keys=False,  # the mixer's keys are normalised
            )[0]  # [P, H]
        return ranks

    ranks = jax.device_get(run(state, jnp.asarray(ids, jnp.int32), seg))
    layers = sorted(ranks)
    if not layers:
        raise ValueError("the model has no DeltaProduct layers (all attention)")
    bos = [] if bos_id is None else np.flatnonzero(ids[0] == bos_id).tolist()
    return StateRanks(
        ranks=np.stack([np.asarray(ranks[i]) for i in layers]).astype(np.float32),
        layers=layers,
        positions=np.arange(every - 1, T, every),
        bos_positions=bos,
        train_length=train_length,
        head_dim=c.head_dim,
    )
