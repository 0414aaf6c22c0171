"""Grain input pipelines for the group state-tracking tasks (SPEC §5.1–5.2).

Tokens: element ids ``0..|G|-1`` are their own token ids, then the specials of the paper's
word-level tokenizer ``[PAD],[BOS],[UNK],[EOS],[SEP],[CLS],[MASK]`` at ``|G|..|G|+6``, so
``BOS = |G|+1`` and ``vocab_size = |G|+7`` (S3: 13, A5: 67, S5: 127). ``[BOS]`` is prepended to
both inputs and labels and there is no shift: position ``i`` of the model's output is compared
with ``labels[i]`` (the prefix product up to and including ``x_i``; position 0 must say BOS).

Two kinds of training data, both deterministic functions of ``seed``:

* fixed (the paper): ``train_samples`` distinct length-``k`` sequences, split
  ``1-val_fraction`` / ``val_fraction`` into train and validation, plus ``test_samples`` distinct
  length-``k_test`` sequences for the extrapolation test. Training batches come from
  one gather per batch from a permutation drawn per epoch — reshuffled every epoch (batches may
  straddle an epoch boundary; ``steps_per_epoch`` is ``n_train / batch_size``).
* stream: fresh i.i.d. length-``k`` sequences forever; batch ``i`` is drawn from
  ``np.random.default_rng([seed, 2, i])`` (validation and test sets stay fixed).

The training dataset is a ``grain.IterDataset``; ``iter(ds)`` is a ``DatasetIterator`` with
``get_state()/set_state()`` (or Orbax ``grain.checkpoint.CheckpointSave``): a restored iterator
yields exactly the batches the original would have.

Example::

    cfg = StateTrackingDataConfig(group="S3", k=32, k_test=128, train_samples=10_000,
                                  test_samples=500, batch_size=256, epochs=5, seed=0)
    data = build(cfg)
    batch = next(iter(data.train))   # {"input_ids": int32 [256, 33], "labels": int32 [256, 33]}
    data.val["input_ids"].shape      # (100, 33); data.test["labels"].shape == (500, 129)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import grain
import numpy as np

from dpjax.data.groups import Group, get_group, prefix_products, sample_sequences

__all__ = [
    "NUM_SPECIAL_TOKENS",
    "StateTrackingData",
    "StateTrackingDataConfig",
    "Tokens",
    "absl_flags_workaround",
    "build",
    "make_fixed_splits",
    "stream_batch",
    "tokenize",
    "train_dataset",
]

NUM_SPECIAL_TOKENS = 7
_SPECIALS = ("[PAD]", "[BOS]", "[UNK]", "[EOS]", "[SEP]", "[CLS]", "[MASK]")

# Sub-seeds: one independent random stream per purpose, all derived from the user's seed.
_TRAIN_FILE, _TEST_FILE, _STREAM, _SPLIT, _SHUFFLE = 0, 1, 2, 3, 4


def absl_flags_workaround() -> None:
    """Mark absl flags as parsed (google/grain#1355: grain 0.2.18 + JAX read unparsed flags).

    Harmless when flags are already parsed (e.g. under ``absl.app``).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclass(frozen=True)
class Tokens:
    """Token ids of a group task: element ids ``0..order-1``, then the 7 specials."""

    order: int

    @property
    def pad(self) -> int:
        return self.order

    @property
    def bos(self) -> int:
        return self.order + 1

    @property
    def vocab_size(self) -> int:
        return self.order + NUM_SPECIAL_TOKENS

    def names(self) -> tuple[str, ...]:
        """Token strings by id (elements by their ids, then the specials)."""
        return tuple(str(i) for i in range(self.order)) + _SPECIALS


@dataclass(frozen=True)
class StateTrackingDataConfig:
    """What data to build. Defaults are the paper's (SPEC §5.1–5.4).

    Attributes:
      group: group name (``S3``, ``A5``, ``Z60``, ``S3_x_Z2``, ...).
      k: training sequence length (tokens per sequence = ``k + 1`` with BOS).
      k_test: length of the held-out extrapolation test sequences.
      train_samples: distinct length-``k`` sequences before the train/validation split.
      val_fraction: fraction of ``train_samples`` held out for validation (paper: 0.01).
      test_samples: distinct length-``k_test`` test sequences (paper: 1,000).
      batch_size: global training batch size (``drop_remainder``).
      epochs: passes over the training split; ``None`` repeats forever.
      seed: seeds everything (data sets, split, shuffling, stream).
      stream: train on an endless i.i.d. stream instead of the fixed training split.
      read_threads / prefetch: Grain ``ReadOptions`` for the training iterator.
    """

    group: str = "S3"
    k: int = 128
    k_test: int = 512
    train_samples: int = 100_000
    val_fraction: float = 0.01
    test_samples: int = 1_000
    batch_size: int = 2048
    epochs: int | None = 100
    seed: int = 666
    stream: bool = False
    read_threads: int = 2
    prefetch: int = 8

    def __post_init__(self):
        for name in ("k", "k_test", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples < 0 or self.test_samples < 0:
            raise ValueError(
                f"train_samples and test_samples must be >= 0, got {self.train_samples}, "
                f"{self.test_samples}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if not self.stream and self.num_train < self.batch_size:
            raise ValueError(
                f"the training split has {self.num_train} sequences (train_samples="
                f"{self.train_samples}, val_fraction={self.val_fraction}), fewer than "
                f"batch_size={self.batch_size}"
            )

    @property
    def num_val(self) -> int:
        return int(round(self.train_samples * self.val_fraction))

    @property
    def num_train(self) -> int:
        return self.train_samples - self.num_val

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps per pass over the training split (fractional: batches straddle)."""
        return self.num_train / self.batch_size

    def total_steps(self) -> int:
        """Training steps for ``epochs`` passes (fixed data only)."""
        if self.epochs is None:
            raise ValueError("total_steps: epochs is None (endless); give a step count instead")
        return (self.epochs * self.num_train) // self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StateTrackingData:
    """Built data: the Grain training dataset and the fixed evaluation arrays.

    Attributes:
      group: the group.
      tokens: token ids (``tokens.vocab_size`` for the model).
      train: ``grain.IterDataset`` of ``{"input_ids", "labels"}`` int32 ``[B, k+1]`` batches.
      val: ``{"input_ids", "labels"}`` int32 ``[num_val, k+1]``.
      test: ``{"input_ids", "labels"}`` int32 ``[test_samples, k_test+1]``.
    """

    config: StateTrackingDataConfig
    group: Group
    tokens: Tokens
    train: grain.IterDataset
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def tokenize(x: np.ndarray, y: np.ndarray, tokens: Tokens) -> dict[str, np.ndarray]:
    """Prepend BOS to inputs and labels.

    Args:
      x, y: int ``[N, T]`` element ids and their prefix products.
    Returns:
      ``{"input_ids": int32 [N, T+1], "labels": int32 [N, T+1]}``.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both be [N, T], got {x.shape} and {y.shape}")
    bos = np.full((x.shape[0], 1), tokens.bos, dtype=np.int32)
    return {
        "input_ids": np.concatenate([bos, x.astype(np.int32)], axis=1),
        "labels": np.concatenate([bos, y.astype(np.int32)], axis=1),
    }


def _labelled(group: Group, tokens: Tokens, x: np.ndarray) -> dict[str, np.ndarray]:
    return tokenize(x, prefix_products(group.table, x), tokens)


def make_fixed_splits(
    cfg: StateTrackingDataConfig, group: Group | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The fixed train / validation / test arrays (``{"input_ids", "labels"}`` each).

    Deterministic from ``cfg.seed``. With ``cfg.stream`` the training split is still built
    (it defines the validation set) but only ``num_val`` sequences are drawn.
    """
    group = group or get_group(cfg.group)
    tokens = Tokens(group.order)
    n_file = cfg.num_val if cfg.stream else cfg.train_samples
    x = sample_sequences(group, n_file, cfg.k, np.random.default_rng([cfg.seed, _TRAIN_FILE]))
    perm = np.random.default_rng([cfg.seed, _SPLIT]).permutation(n_file)
    val_idx, train_idx = perm[: cfg.num_val], perm[cfg.num_val :]
    x_test = sample_sequences(
        group, cfg.test_samples, cfg.k_test, np.random.default_rng([cfg.seed, _TEST_FILE])
    )
    train = _labelled(group, tokens, x[train_idx])
    val = _labelled(group, tokens, x[val_idx])
    test = _labelled(group, tokens, x_test)
    return train, val, test


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(n)


class _ShuffledBatch:
    """Grain map: global batch index -> this process's rows of it (picklable, random access).

    The training rows are read as one stream, reshuffled every epoch; global batch ``i`` is
    stream positions ``[i B, (i+1) B)`` (a batch may straddle two epochs) and process ``s`` of
    ``S`` takes every ``S``-th of them. Vectorised: one gather per batch, no per-row Python.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, shard: slice):
        self.arrays, self.batch_size, self.seed, self.shard = arrays, batch_size, seed, shard
        self.n = len(next(iter(arrays.values())))

    def __call__(self, i) -> dict[str, np.ndarray]:
        pos = np.arange(int(i) * self.batch_size, (int(i) + 1) * self.batch_size)[self.shard]
        epoch, offset = np.divmod(pos, self.n)
        rows = np.empty_like(pos)
        for e in np.unique(epoch):
            here = epoch == e
            rows[here] = _epoch_permutation(self.n, self.seed, int(e))[offset[here]]
        return {name: a[rows] for name, a in self.arrays.items()}


class _StreamBatch:
    """Grain map: batch index -> a fresh i.i.d. batch (picklable, random access)."""

    def __init__(self, group: Group, k: int, batch_size: int, seed: int, shard: slice):
        self.group, self.k, self.batch_size, self.seed = group, k, batch_size, seed
        self.shard = shard

    def __call__(self, i) -> dict[str, np.ndarray]:
        batch = stream_batch(self.group, self.k, self.batch_size, self.seed, int(i))
        return {name: a[self.shard] for name, a in batch.items()}


def stream_batch(group: Group, k: int, batch_size: int, seed: int, index: int) -> dict:
    """Batch ``index`` of the endless stream: int32 ``[batch_size, k+1]`` inputs and labels."""
    rng = np.random.default_rng([seed, _STREAM, index])
    x = rng.integers(0, group.order, size=(batch_size, k), dtype=np.int32)
    return _labelled(group, Tokens(group.order), x)


def train_dataset(
    cfg: StateTrackingDataConfig,
    train: dict[str, np.ndarray] | None = None,
    *,
    group: Group | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """The training ``grain.IterDataset`` of ``{"input_ids", "labels"}`` int32 batches.

    Args:
      cfg: data config.
      train: the fixed training split (required unless ``cfg.stream``).
      shard_index, shard_count: this process's slice of every global batch (multi-host); each
        process gets ``batch_size // shard_count`` rows.
    """
    absl_flags_workaround()
    if cfg.batch_size % shard_count:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by shard_count={shard_count}"
        )
    if cfg.stream:
        group = group or get_group(cfg.group)
        n = 2**62 if cfg.epochs is None else math.ceil(cfg.epochs * cfg.steps_per_epoch)
        shard = slice(shard_index, None, shard_count)
        ds = grain.MapDataset.range(n).map(
            _StreamBatch(group, cfg.k, cfg.batch_size, cfg.seed, shard)
        )
    else:
        if train is None:
            raise ValueError("train_dataset: the fixed training split is required (stream=False)")
        n = len(train["input_ids"])
        n_batches = 2**62 if cfg.epochs is None else (n * cfg.epochs) // cfg.batch_size
        shard = slice(shard_index, None, shard_count)
        ds = grain.MapDataset.range(n_batches).map(
            _ShuffledBatch(train, cfg.batch_size, cfg.seed, shard)
        )
    options = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    return ds.to_iter_dataset(read_options=options)


def build(
    cfg: StateTrackingDataConfig, *, shard_index: int = 0, shard_count: int = 1
) -> StateTrackingData:
    """Group, tokens, the training Grain dataset and the validation/test arrays."""
    group = get_group(cfg.group)
    train, val, test = make_fixed_splits(cfg, group)
    ds = train_dataset(
        cfg,
        None if cfg.stream else train,
        group=group,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return StateTrackingData(cfg, group, Tokens(group.order), ds, val, test)
