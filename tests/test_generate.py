"""dpjax.generate: greedy decoding with the cache equals re-running the full model, batched
left-padded prompts equal one-by-one generation, sampling filters, EOS handling, callbacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpjax.generate import Sampling, generate, sample_logits
from dpjax.nn import DeltaProductConfig, DeltaProductLM

NEW = 6


@pytest.fixture(scope="module")
def model():
    cfg = DeltaProductConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        expand_v=1,
        num_householder=2,
        allow_neg_eigval=True,
        use_forget_gate=True,
        use_short_conv=True,
        hidden_ratio=2,
        impl="reference",
        initializer_range=0.2,
        attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 5},
    )
    return DeltaProductLM(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 64, size=L).astype(np.int32) for L in (4, 7, 2)]
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    return seqs, ids, mask


def greedy_by_full_forward(model, seq, n):
    """Re-run the whole model on the growing sequence (no cache), padded to one length."""
    total = len(seq) + n
    fwd = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
    out = list(seq)
    for _ in range(n):
        ids = np.zeros((1, total), np.int32)
        mask = np.zeros((1, total), np.int32)
        ids[0, : len(out)], mask[0, : len(out)] = out, 1  # right padding
        logits = fwd(model, jnp.asarray(ids), jnp.asarray(mask))
        out.append(int(jnp.argmax(logits[0, len(out) - 1])))
    return out[len(seq) :]


def test_greedy_batched_left_padded_matches_uncached(model, prompts):
    seqs, ids, mask = prompts
    batched = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=NEW))
    assert batched.shape == (3, NEW) and batched.dtype == np.int32
    for i, s in enumerate(seqs):
        assert batched[i].tolist() == greedy_by_full_forward(model, s, NEW), i


def test_callback_streams_the_same_tokens(model, prompts):
    _, ids, mask = prompts
    kw = dict(
        attention_mask=mask,
        max_new_tokens=NEW,
        temperature=0.9,
        top_k=10,
        top_p=0.9,
        rng=jax.random.key(7),
    )
    seen = []
    streamed = generate(model, ids, callback=lambda i, tok: seen.append((i, tok)), **kw)
    scanned = generate(model, ids, **kw)
    np.testing.assert_array_equal(streamed, scanned)
    assert [i for i, _ in seen] == list(range(NEW))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], 1), scanned)
    other = generate(model, ids, **dict(kw, rng=jax.random.key(8)))
    assert not np.array_equal(other, scanned)  # sampling does depend on the key


def test_eos_stops_a_row(model, prompts):
    _, ids, mask = prompts
    greedy = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=NEW))
    eos = int(greedy[0, 1])
    out = np.asarray(
        generate(
            model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=63
        )
    )
    first = [int(np.argmax(row == eos)) if eos in row else None for row in greedy]
    for row, f, g in zip(out, first, greedy, strict=True):
        if f is None:
            np.testing.assert_array_equal(row, g)
        else:
            np.testing.assert_array_equal(row[: f + 1], g[: f + 1])
            assert np.all(row[f + 1 :] == 63)


def test_sample_logits_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]] * 64)
    keys = jax.random.split(jax.random.key(0), 4)
    np.testing.assert_array_equal(sample_logits(logits, keys[0], Sampling()), 1)
    np.testing.assert_array_equal(sample_logits(logits, keys[1], Sampling(1.0, top_k=1)), 1)
    np.testing.assert_array_equal(sample_logits(logits, keys[2], Sampling(1.0, top_p=1e-3)), 1)
    top2 = np.asarray(sample_logits(logits, keys[3], Sampling(5.0, top_k=2)))
    assert set(top2.tolist()) == {1, 3}
    # top_p = 0.7 keeps {1, 3} (p = 0.64, 0.24 before renormalisation: 0.64 < 0.7 <= 0.88)
    top_p = np.asarray(sample_logits(logits, keys[3], Sampling(1.0, top_p=0.7)))
    assert set(top_p.tolist()) <= {1, 3} and len(set(top_p.tolist())) == 2


def test_generate_rejects_bad_arguments(model, prompts):
    _, ids, mask = prompts
    right = mask[:, ::-1]
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, max_new_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, max_new_tokens=2, temperature=-1.0)
