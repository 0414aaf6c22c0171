"""The reference scan: exact gradients (float64 finite differences) and the decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_problem
from jax.test_util import check_grads
from oracle import rel_rmse

import dpjax


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("n_h", [1, 3])
def test_reference_gradients_float64(x64, n_h):
    rng = np.random.default_rng(21 + n_h)
    p = random_problem(rng, B=1, T=6, H=2, K=3, V=2, n_h=n_h, gated=True, initial_state=True)
    args = tuple(jnp.asarray(p[k]) for k in ("q", "k", "v", "beta", "g", "initial_state"))

    def f(q, k, v, beta, g, h0):
        o, s = dpjax.delta_product(
            q, k, v, beta, g, initial_state=h0, output_final_state=True, impl="reference"
        )
        return o, s

    check_grads(f, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_h", [1, 2, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_decode_steps_match_full_sequence(n_h, gated):
    rng = np.random.default_rng(30 + n_h + 10 * gated)
    B, T, H, K, V = 2, 9, 3, 5, 7
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n_h, gated=gated, initial_state=True)
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    o_full, s_full = dpjax.delta_product(
        f32(p["q"]),
        f32(p["k"]),
        f32(p["v"]),
        f32(p["beta"]),
        f32(p["g"]),
        initial_state=f32(p["initial_state"]),
        output_final_state=True,
        impl="reference",
    )
    state = f32(p["initial_state"])
    step = jax.jit(dpjax.decode)
    for t in range(T):
        sl = slice(t * n_h, (t + 1) * n_h)
        o_t, state = step(
            state,
            f32(p["q"][:, t]),
            f32(p["k"][:, sl]),
            f32(p["v"][:, sl]),
            f32(p["beta"][:, sl]),
            None if p["g"] is None else f32(p["g"][:, t]),
        )
        assert rel_rmse(o_full[:, t], o_t) < 1e-6
    assert rel_rmse(s_full, state) < 1e-6


def test_decode_rejects_bad_shapes():
    state = jnp.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 2, 3, 4\)"):
        dpjax.decode(
            state,
            jnp.zeros((2, 3, 4)),
            jnp.zeros((2, 2, 3, 5)),
            jnp.zeros((2, 2, 3, 5)),
            jnp.zeros((2, 2, 3)),
        )
