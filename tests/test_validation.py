"""Every bad argument of ``delta_product`` raises ValueError naming it, what came and what was
expected — before any tracing of the algorithm."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dpjax

B, T, H, K, V, N_H = 2, 5, 3, 4, 6, 2


def _args(**over):
    base = {
        "q": jnp.zeros((B, T, H, K)),
        "k": jnp.zeros((B, T * N_H, H, K)),
        "v": jnp.zeros((B, T * N_H, H, V)),
        "beta": jnp.zeros((B, T * N_H, H)),
    }
    base.update(over)
    return base


CASES = [
    ("q rank", _args(q=jnp.zeros((B, T, H))), {}, r"q: expected rank 4"),
    ("k rank", _args(k=jnp.zeros((B, T * N_H, H))), {}, r"k: expected rank 4"),
    ("beta rank", _args(beta=jnp.zeros((B, T * N_H))), {}, r"beta: expected rank 3"),
    ("k batch", _args(k=jnp.zeros((B + 1, T * N_H, H, K))), {}, r"k: expected shape \[B=2"),
    ("k heads", _args(k=jnp.zeros((B, T * N_H, H + 1, K))), {}, r"k: expected shape.*H=3"),
    ("k key dim", _args(k=jnp.zeros((B, T * N_H, H, K + 1))), {}, r"k: expected shape.*K=4"),
    ("k not T*n_h", _args(k=jnp.zeros((B, T * N_H + 1, H, K))), {}, r"k: .*not a multiple of 5"),
    ("v length", _args(v=jnp.zeros((B, T, H, V))), {}, r"v: expected shape \[B=2, T\*n_h=10"),
    ("beta length", _args(beta=jnp.zeros((B, T, H))), {}, r"beta: expected shape \[B=2, T\*n_h=10"),
    (
        "n_h given vs inferred",
        _args(),
        {"num_householder": 3},
        r"num_householder: got 3.*n_h = 10/5 = 2",
    ),
    ("n_h zero", _args(), {"num_householder": 0}, r"num_householder: expected >= 1"),
    ("g shape", _args(), {"g": jnp.zeros((B, T * N_H, H))}, r"g: expected shape \[B=2, T=5, H=3\]"),
    ("int q", _args(q=jnp.zeros((B, T, H, K), jnp.int32)), {}, r"q: expected a floating dtype"),
    (
        "int beta",
        _args(beta=jnp.zeros((B, T * N_H, H), jnp.int32)),
        {},
        r"beta: expected a floating",
    ),
    ("impl", _args(), {"impl": "fast"}, r"impl: expected one of"),
    ("scale", _args(), {"scale": float("nan")}, r"scale: expected a finite number"),
    (
        "initial_state shape",
        _args(),
        {"initial_state": jnp.zeros((B, H, V, K))},
        r"initial_state: expected shape \[N=2 \(batch\), H=3, K=4, V=6\], got \(2, 3, 6, 4\)",
    ),
    (
        "segment_ids shape",
        _args(),
        {"segment_ids": jnp.zeros((B, T + 1), jnp.int32)},
        r"segment_ids: expected shape \[B=2, T=5\]",
    ),
    (
        "segment_ids float",
        _args(),
        {"segment_ids": jnp.zeros((B, T))},
        r"segment_ids: expected an integer dtype",
    ),
    (
        "both packings",
        _args(),
        {"segment_ids": jnp.zeros((B, T), jnp.int32), "cu_seqlens": np.array([0, T])},
        r"segment_ids and cu_seqlens",
    ),
    ("cu batch", _args(), {"cu_seqlens": np.array([0, T])}, r"cu_seqlens: requires batch size 1"),
]

ONE = dict(
    q=jnp.zeros((1, T, H, K)),
    k=jnp.zeros((1, T * N_H, H, K)),
    v=jnp.zeros((1, T * N_H, H, V)),
    beta=jnp.zeros((1, T * N_H, H)),
)
CASES += [
    ("cu start", ONE, {"cu_seqlens": np.array([1, T])}, r"cu_seqlens: expected to start at 0"),
    ("cu increasing", ONE, {"cu_seqlens": np.array([0, 3, 3, T])}, r"strictly increasing"),
    ("cu end", ONE, {"cu_seqlens": np.array([0, 3])}, r"cu_seqlens: expected to end at T=5"),
    ("cu dtype", ONE, {"cu_seqlens": np.array([0.0, 5.0])}, r"cu_seqlens: expected an integer"),
    (
        "cu initial_state",
        ONE,
        {"cu_seqlens": np.array([0, 2, T]), "initial_state": jnp.zeros((1, H, K, V))},
        r"initial_state: expected shape \[N=2 \(number of documents\)",
    ),
]


@pytest.mark.parametrize(("name", "arrays", "kwargs", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_argument_raises(name, arrays, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        dpjax.delta_product(**arrays, **kwargs)


def test_errors_raise_before_tracing(monkeypatch):
    """Validation happens before the implementation is even looked up."""
    import dpjax.ops as ops

    monkeypatch.setattr(ops, "_load", lambda name: pytest.fail("implementation was loaded"))
    with pytest.raises(ValueError, match="num_householder"):
        dpjax.delta_product(**_args(), num_householder=5)


def test_explain_impl_reports_choice():
    name, reasons = dpjax.explain_impl(**_args(), impl="reference")
    assert name == "reference" and reasons == {"reference": None}
