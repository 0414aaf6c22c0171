"""DeltaProductLM end to end: cached decoding reproduces the full forward, padding and packing
give the outputs of running each sequence alone, and a small model overfits a fixed batch.

Tolerance (fp32 on CPU): ``max|a - b| / max|a| < 1e-4`` on logits. The decode path uses the
token-by-token recurrence (``dpjax.ops.decode``), the full forward the op's implementation, so
the two differ by fp32 rounding only (observed ~1e-6).
"""

from __future__ import annotations

import importlib.util
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpjax.nn import DeltaProductConfig, DeltaProductLM

TOL = 1e-4


def rel_err(ref, x) -> float:
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(np.max(np.abs(ref - x)) / np.max(np.abs(ref)))


def config(n_h=2, forget=False, conv=True, hybrid=False, **overrides) -> DeltaProductConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        expand_v=1,
        num_householder=n_h,
        allow_neg_eigval=True,
        use_forget_gate=forget,
        use_output_gate=forget,
        use_short_conv=conv,
        hidden_ratio=2,
        impl="reference",
        tie_word_embeddings=not hybrid,
        initializer_range=0.1,
        attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 4}
        if hybrid
        else None,
    )
    fields.update(overrides)
    return DeltaProductConfig(**fields)


def build(cfg: DeltaProductConfig, seed: int = 0) -> DeltaProductLM:
    return DeltaProductLM(cfg, rngs=nnx.Rngs(seed))


# --- cached decoding -------------------------------------------------------------------------
PROMPT, TOTAL = 5, 12


@partial(jax.jit, static_argnums=(0,))
def _full_and_decoded(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    full = model(ids)
    logits, cache = model.prefill(ids[:, :PROMPT], cache_size=TOTAL)

    def body(cache, token):
        step_logits, cache = model.decode_step(token, cache)
        return cache, step_logits

    _, steps = jax.lax.scan(body, cache, ids[:, PROMPT:-1].T)
    return full, jnp.concatenate([logits, steps.transpose(1, 0, 2)], axis=1)


@pytest.mark.parametrize(
    "n_h, forget, conv, hybrid",
    [
        (1, False, True, False),
        (2, True, True, True),
        (3, True, False, False),
        (2, False, False, False),
        (3, False, True, True),
        (1, True, False, True),
    ],
)
def test_cached_decoding_matches_full_forward(n_h, forget, conv, hybrid):
    model = build(config(n_h, forget, conv, hybrid))
    ids = jax.random.randint(jax.random.key(1), (2, TOTAL), 0, 64)
    full, decoded = _full_and_decoded(*nnx.split(model), ids)
    assert full.dtype == jnp.float32 and full.shape == (2, TOTAL, 64)
    assert rel_err(full[:, :-1], decoded) < TOL


def test_decoding_from_an_empty_cache():
    model = build(config(2, True, True, True))
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, 64)
    cache = model.init_cache(2, cache_size=6)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    outs = []
    for t in range(6):
        logits, cache = step(model, ids[:, t], cache)
        outs.append(logits)
    assert rel_err(model(ids), jnp.stack(outs, 1)) < TOL


# --- padding and packing ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def padding_case():
    model = build(config(2, True, True, True))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(
        lambda s, ids, seg, mask: nnx.merge(graphdef, s)(ids, segment_ids=seg, attention_mask=mask)
    )
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    T = 10
    base = rng.integers(0, 64, size=(3, T)).astype(np.int32)
    # running each sequence alone: a causal model's outputs on a prefix are those of the prefix
    alone_full = np.asarray(fwd(state, jnp.asarray(base), None, None))
    seqs = [base[i, :L] for i, L in enumerate(lengths)]
    alone = [alone_full[i, :L] for i, L in enumerate(lengths)]
    return fwd, state, seqs, alone, T


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_one_by_one(padding_case, side):
    fwd, state, seqs, alone, T = padding_case
    ids = np.full((3, T), 63, np.int32)  # pad id: arbitrary
    mask = np.zeros((3, T), np.int32)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    out = np.asarray(fwd(state, jnp.asarray(ids), None, jnp.asarray(mask)))
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        assert rel_err(alone[i], out[i, cols]) < TOL, (side, i)


def test_packed_documents_match_one_by_one(padding_case):
    fwd, state, seqs, alone, _ = padding_case
    packed = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(len(s), 7 + i) for i, s in enumerate(seqs)])[None]
    # and trailing padding, both as a mask and as its own segment id
    packed = np.pad(packed, ((0, 0), (0, 3)))
    seg = np.pad(seg, ((0, 0), (0, 3)), constant_values=99).astype(np.int32)
    mask = (seg != 99).astype(np.int32)
    out = np.asarray(fwd(state, jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(mask)))
    start = 0
    for i, s in enumerate(seqs):
        assert rel_err(alone[i], out[0, start : start + len(s)]) < TOL, i
        start += len(s)


# --- training --------------------------------------------------------------------------------
CHUNKED_MISSING = importlib.util.find_spec("dpjax.ops.chunked") is None


@pytest.mark.parametrize(
    "impl",
    [
        "reference",
        pytest.param(
            "chunked",
            marks=pytest.mark.skipif(
                CHUNKED_MISSING, reason="dpjax/ops/chunked.py does not exist yet"
            ),
        ),
    ],
)
def test_small_model_overfits_a_fixed_batch(impl):
    cfg = config(2, True, True, False, impl=impl, vocab_size=32, initializer_range=0.02)
    model = build(cfg)
    ids = jax.random.randint(jax.random.key(3), (4, 17), 0, 32)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(150):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_bfloat16_forward_is_finite():
    cfg = config(2, True, True, True, dtype="bfloat16", param_dtype="bfloat16")
    model = build(cfg)
    assert model.layers[0].mixer.q_proj.kernel[...].dtype == jnp.bfloat16
    assert model.layers[0].mixer.A_log[...].dtype == jnp.float32
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_conv_kernels_match_xla_in_the_model():
    """The whole model's gradients with the short convolutions' Pallas backward, and with both
    their Pallas forward and backward (interpret mode), equal those of XLA's forward and autodiff
    (packed documents: segment ids)."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, 64, size=(2, 12)), jnp.int32)
    seg = jnp.asarray(np.repeat([[0] * 5 + [1] * 7], 2, axis=0), jnp.int32)
    grads = {}
    for forward, backward in (("xla", "xla"), ("xla", "pallas"), ("pallas", "pallas")):
        model = build(config(conv_forward=forward, conv_backward=backward))

        def loss(model):
            logits = model(ids, segment_ids=seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(64)[ids])

        grads[forward, backward] = jax.tree.leaves(nnx.grad(loss)(model))
    want = grads["xla", "xla"]
    for kernels in (("xla", "pallas"), ("pallas", "pallas")):
        for w, got in zip(want, grads[kernels], strict=True):
            assert np.isfinite(np.asarray(got)).all()
            assert rel_err(w, got) < 1e-5
