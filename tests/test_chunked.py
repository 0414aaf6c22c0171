"""The chunked (WY/UT) implementation against the numpy oracle, the reference scan, JAX autodiff
of its own forward, and finite differences (float64)."""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import starts_from_segments
from jax.test_util import check_grads
from oracle import delta_product_np, rel_rmse

import dpjax
from dpjax.ops import chunked, reference

ARG_NAMES = ("q", "k", "v", "beta", "g", "h0")


def draw(rng, *, B=2, T=65, H=2, K=16, V=24, n_h=2, gated=True, h0=True):
    """Fresh float64 inputs: unit keys, beta ~ U(0, 2), g = log(sigmoid(normal)) <= 0."""
    k = rng.normal(size=(B, T * n_h, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": rng.normal(size=(B, T, H, K)),
        "k": k,
        "v": rng.normal(size=(B, T * n_h, H, V)),
        "beta": rng.uniform(0.0, 2.0, size=(B, T * n_h, H)),
        "g": -np.logaddexp(0.0, -rng.normal(size=(B, T, H))) if gated else None,
        "h0": rng.normal(size=(B, H, K, V)) if h0 else None,
    }


def as_jax(p, dtype=jnp.float32):
    """Inputs as JAX arrays: q/k/v/beta in ``dtype``, g and h0 in fp32 (as the dispatcher does)."""
    out = {name: jnp.asarray(p[name], dtype) for name in ("q", "k", "v", "beta")}
    for name in ("g", "h0"):
        out[name] = None if p[name] is None else jnp.asarray(p[name], jnp.float32)
    return out


def oracle(p, scale=None, doc_starts=None):
    K = p["q"].shape[-1]
    return delta_product_np(
        p["q"],
        p["k"],
        p["v"],
        p["beta"],
        p["g"],
        scale=K**-0.5 if scale is None else scale,
        initial_state=p["h0"],
        doc_starts=doc_starts,
    )


def assert_close(name, ref, x, tol):
    x = np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x)
    assert np.all(np.isfinite(x)), f"{name}: non-finite values"
    err = rel_rmse(ref, x)
    assert err < tol, f"{name}: rel RMSE {err:.2e} >= {tol:.0e}"


def run_op(x, impl="chunked", **kwargs):
    return dpjax.delta_product(
        x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["h0"],
        output_final_state=True, impl=impl, **kwargs,
    )  # fmt: skip


def random_cut_points(rng, T, forced=()):
    """``[1, T]`` segment ids with random document starts plus the ``forced`` ones."""
    starts = set(int(t) for t in rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False))
    starts = sorted((starts | set(forced)) & set(range(1, T)))
    seg = np.zeros(T, np.int32)
    for t in starts:
        seg[t:] += 1
    return seg


def grads(forward, x, resets, do, dht, n_h):
    """Gradients w.r.t. q, k, v, beta, g, h0 of ``<o, do> + <final, dht>`` (jitted)."""
    K = x["q"].shape[-1]

    def loss(q, k, v, beta, g, h0):
        o, s = forward(q, k, v, beta, g, h0, resets, num_householder=n_h, scale=K**-0.5)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * dht)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*(x[name] for name in ARG_NAMES))


def test_supports_every_call():
    assert chunked.supports(shape=None, dtype=jnp.bfloat16) is None


@pytest.mark.parametrize(
    "n_h, T, gated, h0, K, V",
    [
        (1, 63, False, False, 16, 24),
        (1, 200, True, True, 20, 24),
        (2, 65, True, True, 16, 24),
        (2, 200, False, True, 16, 24),
        (3, 63, True, True, 16, 24),
        (3, 200, True, False, 20, 12),
        (4, 1, True, True, 16, 24),
        (4, 65, False, True, 20, 24),
    ],
)
def test_forward_fp32_matches_oracle(n_h, T, gated, h0, K, V):
    rng = np.random.default_rng(100 + 7 * n_h + T + 3 * gated + h0)
    p = draw(rng, T=T, K=K, V=V, n_h=n_h, gated=gated, h0=h0)
    o, s = run_op(as_jax(p))
    o_ref, s_ref = oracle(p)
    assert o.shape == o_ref.shape and o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close("o", o_ref, o, 2e-5)
    assert_close("state", s_ref, s, 2e-5)


@pytest.mark.parametrize("n_h, gated", [(1, True), (2, False), (3, True), (4, True)])
def test_documents_via_segment_ids(n_h, gated):
    """1-4 documents per row, plus starts on the first row of token and interleaved chunks."""
    rng = np.random.default_rng(200 + 5 * n_h + gated)
    T = 200
    p = draw(rng, T=T, n_h=n_h, gated=gated, h0=True)
    forced = (64, 64 // n_h, 128 + 1) if n_h > 1 else (64, 65)
    seg = np.stack([random_cut_points(rng, T, forced), np.zeros(T, np.int32)])
    seg[1, T // 3 :] = 1
    o, s = run_op(as_jax(p), segment_ids=jnp.asarray(seg))
    o_ref, s_ref = oracle(p, doc_starts=starts_from_segments(seg))
    assert_close("o", o_ref, o, 2e-5)
    assert_close("state", s_ref, s, 2e-5)


@pytest.mark.parametrize("with_states", [False, True])
def test_documents_via_cu_seqlens(with_states):
    rng = np.random.default_rng(300 + with_states)
    n_h, T = 2, 200
    cu = np.array([0, 64, 101, 200])
    p = draw(rng, B=1, T=T, n_h=n_h, gated=True, h0=False)
    x = as_jax(p)
    h0 = rng.normal(size=(3, 2, 16, 24)) if with_states else None
    o, s = dpjax.delta_product(
        x["q"], x["k"], x["v"], x["beta"], x["g"], cu_seqlens=jnp.asarray(cu),
        initial_state=None if h0 is None else jnp.asarray(h0, jnp.float32),
        output_final_state=with_states, impl="chunked",
    )  # fmt: skip
    for d in range(3):
        tok, sub = slice(cu[d], cu[d + 1]), slice(cu[d] * n_h, cu[d + 1] * n_h)
        doc = {"q": p["q"][:, tok], "k": p["k"][:, sub], "v": p["v"][:, sub]}
        doc |= {"beta": p["beta"][:, sub], "g": p["g"][:, tok]}
        doc["h0"] = None if h0 is None else h0[d : d + 1]
        o_ref, s_ref = oracle(doc)
        assert_close(f"o[doc {d}]", o_ref, o[:, tok], 2e-5)
        if with_states:
            assert_close(f"state[doc {d}]", s_ref[0], s[d], 2e-5)


def test_split_row_equals_separate_documents():
    rng = np.random.default_rng(400)
    n_h, T, cuts = 3, 150, (0, 50, 100, 150)
    p = draw(rng, B=1, T=T, n_h=n_h, gated=True, h0=True)
    seg = np.zeros((1, T), np.int32)
    for c in cuts[1:-1]:
        seg[:, c:] += 1
    o_row, s_row = run_op(as_jax(p), segment_ids=jnp.asarray(seg))
    for d in range(3):
        tok, sub = slice(cuts[d], cuts[d + 1]), slice(cuts[d] * n_h, cuts[d + 1] * n_h)
        doc = {name: p[name][:, sub] for name in ("k", "v", "beta")}
        h0 = p["h0"] if d == 0 else np.zeros_like(p["h0"])
        doc |= {"q": p["q"][:, tok], "g": p["g"][:, tok], "h0": h0}
        o_doc, s_doc = run_op(as_jax(doc))
        np.testing.assert_allclose(o_row[:, tok], o_doc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s_row, s_doc, rtol=1e-4, atol=1e-5)


def test_zero_key_slots_equal_single_householder():
    rng = np.random.default_rng(500)
    n_h, T = 3, 65
    p1 = draw(rng, T=T, n_h=1, gated=True, h0=True)
    pn = draw(rng, T=T, n_h=n_h, gated=True, h0=True)  # random v/beta in the extra slots
    for name in ("k", "v", "beta"):
        x = pn[name].reshape(2, T, n_h, *pn[name].shape[2:]).copy()
        x[:, :, 1] = p1[name]
        if name == "k":
            x[:, :, 0] = 0.0
            x[:, :, 2:] = 0.0
        pn[name] = x.reshape(pn[name].shape)
    pn |= {"q": p1["q"], "g": p1["g"], "h0": p1["h0"]}
    o1, s1 = run_op(as_jax(p1))
    on, sn = run_op(as_jax(pn))
    np.testing.assert_allclose(on, o1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sn, s1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n_h, T, gated, docs, vs_autodiff",
    [
        (1, 63, False, False, False),
        (2, 200, True, True, True),
        (3, 65, True, False, False),
        (4, 130, False, True, True),
    ],
)
def test_gradients_match_reference_and_autodiff(n_h, T, gated, docs, vs_autodiff):
    """All six gradients, random cotangents on o and on the final state, fp32; against the
    reference scan and (some cases, to save compile time) JAX autodiff of the chunked forward."""
    rng = np.random.default_rng(600 + 11 * n_h + T)
    p = draw(rng, T=T, n_h=n_h, gated=gated, h0=True)
    resets = jnp.asarray(starts_from_segments(np.stack([random_cut_points(rng, T, (64,))] * 2)))
    resets = resets if docs else None
    do = jnp.asarray(rng.normal(size=(2, T, 2, 24)), jnp.float32)
    dht = jnp.asarray(rng.normal(size=(2, 2, 16, 24)), jnp.float32)
    x = as_jax(p)
    got = grads(chunked.forward, x, resets, do, dht, n_h)
    want = grads(reference.forward, x, resets, do, dht, n_h)
    assert (got[4] is None) == (not gated)
    for name, w, c in zip(ARG_NAMES, want, got, strict=True):
        if c is not None:
            assert_close(f"d{name} vs reference", w, c, 1e-4)
    if vs_autodiff:
        auto = grads(chunked.forward_autodiff, x, resets, do, dht, n_h)
        for name, a, c in zip(ARG_NAMES, auto, got, strict=True):
            if c is not None:
                assert_close(f"d{name} vs autodiff", a, c, 1e-4)


def test_gradients_without_gate_or_initial_state():
    """g=None and h0=None: the remaining gradients still match the reference."""
    rng = np.random.default_rng(650)
    n_h, T = 2, 70
    p = draw(rng, T=T, n_h=n_h, gated=False, h0=False)
    x = as_jax(p)
    do = jnp.asarray(rng.normal(size=(2, T, 2, 24)), jnp.float32)

    def loss(forward):
        def f(q, k, v, beta):
            o, _ = forward(q, k, v, beta, None, None, None, num_householder=n_h, scale=0.3)
            return jnp.sum(o * do)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x["q"], x["k"], x["v"], x["beta"])

    for name, w, c in zip(ARG_NAMES, loss(reference.forward), loss(chunked.forward), strict=False):
        assert_close(f"d{name}", w, c, 1e-4)


def test_bf16_inputs_match_fp32_reference():
    """SPEC §9 tolerances: o, state < 0.005; dq, dk, dv, dh0 < 0.008; dbeta, dg < 0.02."""
    rng = np.random.default_rng(700)
    n_h, T = 3, 200
    p = draw(rng, T=T, K=20, V=24, n_h=n_h, gated=True, h0=True)
    resets = jnp.asarray(starts_from_segments(np.stack([random_cut_points(rng, T)] * 2)))
    x_bf = as_jax(p, jnp.bfloat16)
    x_32 = {n: None if a is None else jnp.asarray(a, jnp.float32) for n, a in x_bf.items()}
    p_rounded = {n: None if a is None else np.asarray(a, np.float64) for n, a in x_32.items()}
    o, s = chunked.forward(
        *(x_bf[n] for n in ARG_NAMES), resets, num_householder=n_h, scale=20**-0.5
    )
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, s_ref = oracle(p_rounded, doc_starts=np.asarray(resets))
    assert_close("o", o_ref, o, 0.005)
    assert_close("state", s_ref, s, 0.005)
    do = jnp.asarray(rng.normal(size=(2, T, 2, 24)), jnp.float32)
    dht = jnp.asarray(rng.normal(size=(2, 2, 20, 24)), jnp.float32)
    want = grads(reference.forward, x_32, resets, do, dht, n_h)
    got = grads(chunked.forward, x_bf, resets, do, dht, n_h)
    tols = {"q": 0.008, "k": 0.008, "v": 0.008, "h0": 0.008, "beta": 0.02, "g": 0.02}
    for name, w, c in zip(ARG_NAMES, want, got, strict=True):
        assert c.dtype == x_bf[name].dtype
        assert_close(f"d{name}", w, c, tols[name])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("n_h", [3])
def test_check_grads_float64(x64, n_h):
    """Finite differences in float64 through chunk boundaries, documents, gates and h0."""
    rng = np.random.default_rng(800 + n_h)
    T = 70
    p = draw(rng, B=1, T=T, H=1, K=5, V=3, n_h=n_h, gated=True, h0=True)
    resets = jnp.asarray(np.isin(np.arange(T), (20, 64))[None])

    def f(q, k, v, beta, g, h0):
        return chunked.forward(q, k, v, beta, g, h0, resets, num_householder=n_h, scale=0.7)

    args = tuple(jnp.asarray(p[name], jnp.float64) for name in ARG_NAMES)
    assert f(*args)[0].dtype == jnp.float64
    check_grads(jax.jit(f), args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_extreme_gates_and_resets_stay_finite():
    """Gates of -40, -1e4 and -inf, document starts on chunk edges: exact, no NaN/inf in any output
    or gradient (resets are masks, never -inf gates; gates with exp(g) == 0 act as resets)."""
    rng = np.random.default_rng(900)
    n_h, T = 2, 200
    p = draw(rng, T=T, n_h=n_h, gated=True, h0=True)
    p["g"][:, ::7] = -1e4
    p["g"][:, 3::11] = -np.inf
    p["g"][:, 1::5] = -40.0
    starts = np.zeros((2, T), bool)
    starts[:, [0, 31, 32, 63, 64, 65, 127, 128, 199]] = True
    resets = jnp.asarray(starts)
    x = as_jax(p)
    o, s = chunked.forward(*(x[n] for n in ARG_NAMES), resets, num_householder=n_h, scale=0.25)
    o_ref, s_ref = oracle(p, scale=0.25, doc_starts=starts)
    assert_close("o", o_ref, o, 2e-5)
    assert_close("state", s_ref, s, 2e-5)
    do = jnp.asarray(rng.normal(size=(2, T, 2, 24)), jnp.float32)
    dht = jnp.asarray(rng.normal(size=(2, 2, 16, 24)), jnp.float32)
    want = grads(reference.forward, x, resets, do, dht, n_h)
    got = grads(chunked.forward, x, resets, do, dht, n_h)
    for name, w, c in zip(ARG_NAMES, want, got, strict=True):
        assert_close(f"d{name}", w, c, 1e-4)


def intermediate_sizes(jaxpr):
    """Element counts of every value a jaxpr (and its sub-jaxprs: scan bodies...) creates."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield int(np.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    yield from intermediate_sizes(sub.jaxpr)
                elif isinstance(sub, jex.core.Jaxpr):
                    yield from intermediate_sizes(sub)


def test_gradient_keeps_no_state_per_token():
    """Memory contract: no value in forward + backward is as large as a ``K x V`` state per
    token (the reference, which stores one per token, is the positive control)."""
    B, T, H, K, V, n_h = 1, 256, 1, 32, 32, 4
    shapes = [(B, T, H, K), (B, T * n_h, H, K), (B, T * n_h, H, V), (B, T * n_h, H)]
    shapes += [(B, T, H), (B, H, K, V)]
    args = [jnp.zeros(shape) for shape in shapes]
    resets = jnp.zeros((B, T), bool)

    def largest(forward):
        def loss(*xs):
            o, s = forward(*xs, resets, num_householder=n_h, scale=0.1)
            return jnp.sum(o) + jnp.sum(s)

        closed = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*args)
        return max(intermediate_sizes(closed.jaxpr))

    per_token_states = T * K * V
    assert largest(reference.forward) >= per_token_states
    assert largest(chunked.forward) < per_token_states // 2
    assert largest(chunked.forward_autodiff) < per_token_states // 2
