"""State-tracking Grain pipeline: tokens, determinism, distinct sets, exact iterator resume."""

import numpy as np
import pytest

from dpjax.data.groups import get_group, prefix_products
from dpjax.data.state_tracking import (
    StateTrackingDataConfig,
    Tokens,
    build,
    make_fixed_splits,
    train_dataset,
)

CFG = StateTrackingDataConfig(
    group="S3",
    k=12,
    k_test=40,
    train_samples=2000,
    test_samples=100,
    batch_size=64,
    epochs=3,
    seed=5,
)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_tokens_and_shapes():
    data = build(CFG)
    tok = data.tokens
    assert (tok.pad, tok.bos, tok.vocab_size) == (6, 7, 13)
    assert Tokens(60).vocab_size == 67 and Tokens(120).vocab_size == 127
    b = next(iter(data.train))
    assert set(b) == {"input_ids", "labels"}
    assert b["input_ids"].shape == (64, 13) and b["input_ids"].dtype == np.int32
    assert data.val["labels"].shape == (20, 13) and data.test["labels"].shape == (100, 41)
    for arrays in (b, data.val, data.test):
        x, y = arrays["input_ids"], arrays["labels"]
        assert (x[:, 0] == 7).all() and (y[:, 0] == 7).all()  # BOS on inputs and labels
        assert x[:, 1:].max() < 6
        np.testing.assert_array_equal(y[:, 1:], prefix_products(get_group("S3").table, x[:, 1:]))


def test_fixed_sets_deterministic_distinct_and_disjoint():
    tr, va, te = make_fixed_splits(CFG)
    tr2, va2, te2 = make_fixed_splits(CFG)
    for a, b in ((tr, tr2), (va, va2), (te, te2)):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    rows = [tuple(r) for r in np.concatenate([tr["input_ids"], va["input_ids"]])]
    assert len(rows) == CFG.train_samples == len(set(rows))  # distinct, train ∩ val = ∅
    assert len({tuple(r) for r in te["input_ids"]}) == CFG.test_samples
    other, _, _ = make_fixed_splits(StateTrackingDataConfig(**dict(CFG.to_dict(), seed=6)))
    assert not np.array_equal(other["input_ids"], tr["input_ids"])


def test_epochs_reshuffle_and_cover_the_split():
    data = build(CFG)
    batches = list(iter(data.train))
    assert len(batches) == CFG.total_steps() == (3 * 1980) // 64
    n = CFG.num_train
    seen = np.concatenate([b["input_ids"] for b in batches])
    first, second = seen[:n], seen[n : 2 * n]
    # every epoch is a permutation of the same training rows, in a different order
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))
    assert not np.array_equal(first, second)
    again = list(iter(build(CFG).train))
    np.testing.assert_array_equal(again[7]["labels"], batches[7]["labels"])


def test_iterator_state_resumes_exactly():
    ds = build(CFG).train
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = iter(build(CFG).train)
    fresh.set_state(state)
    for a, b in zip(_take(fresh, 4), expected, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_stream_is_deterministic_and_resumable():
    cfg = StateTrackingDataConfig(**dict(CFG.to_dict(), stream=True, epochs=None))
    data = build(cfg)
    assert data.val["labels"].shape == (20, 13)
    it = iter(data.train)
    a = _take(it, 3)
    state = it.get_state()
    b = _take(it, 2)
    it2 = iter(build(cfg).train)
    np.testing.assert_array_equal(_take(it2, 1)[0]["input_ids"], a[0]["input_ids"])
    it2.set_state(state)
    np.testing.assert_array_equal(_take(it2, 2)[1]["input_ids"], b[1]["input_ids"])
    assert not np.array_equal(a[0]["input_ids"], a[1]["input_ids"])


def test_process_shards_partition_the_global_batch():
    tr, _, _ = make_fixed_splits(CFG)
    full = next(iter(train_dataset(CFG, tr)))
    parts = [next(iter(train_dataset(CFG, tr, shard_index=i, shard_count=2))) for i in (0, 1)]
    assert parts[0]["input_ids"].shape == (32, 13)
    merged = np.empty_like(full["input_ids"])
    merged[0::2], merged[1::2] = parts[0]["input_ids"], parts[1]["input_ids"]
    np.testing.assert_array_equal(merged, full["input_ids"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=0),
        dict(batch_size=5000),
        dict(val_fraction=1.0),
        dict(epochs=0),
        dict(train_samples=-1),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        StateTrackingDataConfig(**dict(CFG.to_dict(), **kwargs))


def test_unknown_group_raises():
    with pytest.raises(ValueError, match="unknown group"):
        build(StateTrackingDataConfig(**dict(CFG.to_dict(), group="Q8")))
