"""The op's contract, for every implementation, against the numpy float64 oracle.

Each test draws fresh random inputs (seeded per case so failures reproduce). Implementations are
parametrised; the chunked and Pallas paths have deeper tests of their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_problem, random_segments, starts_from_segments
from oracle import delta_product_np, rel_rmse

import dpjax

IMPLS = ["reference", "chunked", "pallas"]
F32_TOL = 2e-5


def _run(p, impl, **kw):
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    return dpjax.delta_product(
        f32(p["q"]),
        f32(p["k"]),
        f32(p["v"]),
        f32(p["beta"]),
        f32(p["g"]),
        initial_state=f32(p["initial_state"]),
        impl=impl,
        **kw,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_h", [1, 2, 3, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_oracle(impl, n_h, gated):
    rng = np.random.default_rng(100 * n_h + gated)
    T = int(rng.choice([1, 63, 65]))
    p = random_problem(
        rng, T=T, n_h=n_h, gated=gated, initial_state=bool(rng.integers(2)), K=8, V=12
    )
    o, s = _run(p, impl, output_final_state=True)
    o_ref, s_ref = delta_product_np(
        p["q"], p["k"], p["v"], p["beta"], p["g"], initial_state=p["initial_state"]
    )
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == jnp.float32
    assert rel_rmse(o_ref, o) < F32_TOL
    assert rel_rmse(s_ref, s) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(impl, dtype):
    """bf16/fp16 inputs, fp32 accumulation: SPEC §9 tolerance against the exact recurrence."""
    rng = np.random.default_rng(7)
    p = random_problem(rng, T=70, n_h=2, gated=True, K=16, V=16)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    o, s = dpjax.delta_product(
        cast(p["q"]),
        cast(p["k"]),
        cast(p["v"]),
        cast(p["beta"]),
        jnp.asarray(p["g"]),
        output_final_state=True,
        impl=impl,
    )
    up = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
    o_ref, s_ref = delta_product_np(up(p["q"]), up(p["k"]), up(p["v"]), up(p["beta"]), p["g"])
    assert o.dtype == dtype
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert rel_rmse(o_ref, o) < 0.005
    assert rel_rmse(s_ref, s) < 0.005


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_ids_reset_state(impl):
    rng = np.random.default_rng(11)
    p = random_problem(rng, B=3, T=90, n_h=2, gated=True, initial_state=True)
    seg = random_segments(rng, 3, 90)
    o, s = _run(p, impl, segment_ids=jnp.asarray(seg), output_final_state=True)
    o_ref, s_ref = delta_product_np(
        p["q"],
        p["k"],
        p["v"],
        p["beta"],
        p["g"],
        initial_state=p["initial_state"],
        doc_starts=starts_from_segments(seg),
    )
    assert rel_rmse(o_ref, o) < F32_TOL
    assert rel_rmse(s_ref, s) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_states", [False, True])
def test_cu_seqlens_per_document_states(impl, with_states):
    rng = np.random.default_rng(12 + with_states)
    n_h, T = 3, 100
    cu = np.array([0, 7, 40, 41, 100], np.int32)
    N = len(cu) - 1
    p = random_problem(rng, B=1, T=T, n_h=n_h, gated=True)
    h0 = rng.normal(size=(N, 2, 8, 6)) if with_states else None
    p["initial_state"] = h0
    o, s = _run(p, impl, cu_seqlens=jnp.asarray(cu), output_final_state=with_states)
    for d in range(N):
        a, b = cu[d], cu[d + 1]
        o_d, s_d = delta_product_np(
            p["q"][:, a:b],
            p["k"][:, a * n_h : b * n_h],
            p["v"][:, a * n_h : b * n_h],
            p["beta"][:, a * n_h : b * n_h],
            p["g"][:, a:b],
            initial_state=None if h0 is None else h0[d : d + 1],
        )
        assert rel_rmse(o_d, o[:, a:b]) < F32_TOL
        if with_states:
            assert rel_rmse(s_d[0], s[d]) < F32_TOL
    if not with_states:
        assert s is None


@pytest.mark.parametrize("impl", IMPLS)
def test_cu_seqlens_under_jit(impl):
    """Traced cu_seqlens: per-document states still exact (rows padded to T)."""
    rng = np.random.default_rng(13)
    p = random_problem(rng, B=1, T=40, n_h=2, initial_state=False)
    cu = np.array([0, 15, 40], np.int32)
    h0 = rng.normal(size=(2, 2, 8, 6)).astype(np.float32)
    f = jax.jit(
        lambda q, k, v, b, cu, h0: dpjax.delta_product(
            q, k, v, b, cu_seqlens=cu, initial_state=h0, output_final_state=True, impl=impl
        )
    )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    o, s = f(f32(p["q"]), f32(p["k"]), f32(p["v"]), f32(p["beta"]), jnp.asarray(cu), h0)
    o0, s0 = _run({**p, "initial_state": h0}, impl, cu_seqlens=cu, output_final_state=True)
    assert rel_rmse(o0, o) < 1e-6 and rel_rmse(s0, s) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_interleaved_deltanet_equivalence(impl):
    """n_h = n equals DeltaNet on the interleaved sequence with zero-padded queries (SPEC §1.5a)."""
    rng = np.random.default_rng(14)
    n, B, T, H, K, V = 3, 2, 21, 2, 8, 6
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    o, s = _run(p, impl, output_final_state=True)
    q_il = np.zeros((B, T, n, H, K))
    q_il[:, :, -1] = p["q"]
    g_il = np.zeros((B, T, n, H))
    g_il[:, :, 0] = p["g"]
    il = {
        **p,
        "q": q_il.reshape(B, T * n, H, K),
        "g": g_il.reshape(B, T * n, H),
    }
    o_il, s_il = _run(il, impl, output_final_state=True, num_householder=1)
    o_il = np.asarray(o_il).reshape(B, T, n, H, V)[:, :, -1]
    assert rel_rmse(o_il, o) < F32_TOL and rel_rmse(s_il, s) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_keys_in_extra_slots_equal_single_step(impl):
    rng = np.random.default_rng(15)
    p1 = random_problem(rng, T=30, n_h=1, gated=True, initial_state=True)
    n = 3
    expand = lambda x: np.concatenate(
        [x[:, :, None], np.zeros_like(x[:, :, None]).repeat(n - 1, 2)], 2
    )
    pn = {
        **p1,
        "k": expand(p1["k"]).reshape(2, 30 * n, 2, 8),
        "v": np.repeat(p1["v"][:, :, None], n, 2).reshape(2, 30 * n, 2, 6),
        "beta": np.repeat(p1["beta"][:, :, None], n, 2).reshape(2, 30 * n, 2),
    }
    o1, s1 = _run(p1, impl, output_final_state=True)
    on, sn = _run(pn, impl, output_final_state=True)
    assert rel_rmse(o1, on) < F32_TOL and rel_rmse(s1, sn) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_documents_split_equal_separate_runs(impl):
    rng = np.random.default_rng(16)
    p = random_problem(rng, B=1, T=50, n_h=2, gated=True)
    seg = np.zeros((1, 50), np.int32)
    seg[:, 20:] = 1
    o, _ = _run(p, impl, segment_ids=seg)
    cut = lambda lo, hi: {
        "q": p["q"][:, lo:hi],
        "g": p["g"][:, lo:hi],
        "k": p["k"][:, 2 * lo : 2 * hi],
        "v": p["v"][:, 2 * lo : 2 * hi],
        "beta": p["beta"][:, 2 * lo : 2 * hi],
        "initial_state": None,
    }
    first, second = cut(0, 20), cut(20, 50)
    o1, _ = _run(first, impl)
    o2, _ = _run(second, impl)
    assert rel_rmse(np.concatenate([o1, o2], 1), o) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_use_qk_l2norm_and_scale(impl):
    rng = np.random.default_rng(17)
    p = random_problem(rng, T=20, n_h=2)
    p["k"] = p["k"] * rng.uniform(0.5, 3.0, size=p["k"].shape[:-1] + (1,))
    o, _ = _run(p, impl, use_qk_l2norm=True, scale=0.3)
    nrm = lambda x: x / np.sqrt(np.sum(x**2, -1, keepdims=True) + 1e-6)
    o_ref, _ = delta_product_np(nrm(p["q"]), nrm(p["k"]), p["v"], p["beta"], scale=0.3)
    assert rel_rmse(o_ref, o) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference(impl):
    """All inputs incl. the initial state, cotangents on o and on the final state."""
    if impl == "reference":
        pytest.skip("the reference is the baseline of this comparison")
    rng = np.random.default_rng(18)
    p = random_problem(rng, T=70, n_h=2, gated=True, initial_state=True)
    args = tuple(
        jnp.asarray(p[name], jnp.float32) for name in ("q", "k", "v", "beta", "g", "initial_state")
    )
    do = jnp.asarray(rng.normal(size=(2, 70, 2, 6)), jnp.float32)
    ds = jnp.asarray(rng.normal(size=(2, 2, 8, 6)), jnp.float32)

    def loss(which, q, k, v, beta, g, h0):
        o, s = dpjax.delta_product(
            q, k, v, beta, g, initial_state=h0, output_final_state=True, impl=which
        )
        return jnp.sum(o * do) + jnp.sum(s * ds)

    g_ref = jax.grad(loss, argnums=range(1, 7))("reference", *args)
    g_imp = jax.grad(loss, argnums=range(1, 7))(impl, *args)
    for name, a, b in zip(("q", "k", "v", "beta", "g", "h0"), g_ref, g_imp, strict=True):
        assert np.isfinite(np.asarray(b)).all(), name
        assert rel_rmse(a, b) < 1e-4, name
