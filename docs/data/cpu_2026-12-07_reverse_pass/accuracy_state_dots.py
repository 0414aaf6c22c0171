"""bf16 gradients of the Pallas backward against the fp32 chunked path, on CPU (interpret mode,
TF32 rounding emulated), for the reverse pass's product choices (docs/BENCHMARKS.md, "eighth
session"). Run from the repository root: ``.venv/bin/python
docs/data/cpu_2026-12-07_reverse_pass/accuracy_state_dots.py``."""

import dataclasses
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import test_pallas_backward as t  # noqa: E402
from oracle import rel_rmse  # noqa: E402

from dpjax.ops import chunked  # noqa: E402
from dpjax.ops import pallas as dp_pallas  # noqa: E402
from pallas_kernels import backward as kernel_backward  # noqa: E402

VARIANTS = {
    "split (default)": {},
    "state_dots=tf32": {"state_dots": "tf32"},
    "state_dots=input": {"state_dots": "input"},
    "state_dv_out_dots=input": {"state_dv_out_dots": "input"},
    "tf32 + dv_out input": {"state_dots": "tf32", "state_dv_out_dots": "input"},
}
for n, T, gated in [(1, 1024, False), (3, 600, False), (2, 600, True)]:
    rng = np.random.default_rng(7)
    B, H, K, V = 1, 2, 64, 64
    p = t.random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=True)
    cot_o, cot_s = t.cotangents(rng, B, T, H, K, V)
    low = t.inputs(p, jnp.bfloat16)
    rounded = [None if a is None else a.astype(jnp.float32) for a in low]
    want = t.grads(chunked.forward, rounded, None, cot_o, cot_s, n, K**-0.5)
    for label, fields in VARIANTS.items():
        config = dataclasses.replace(kernel_backward.config_for(K, V), **fields)
        dp_pallas.backward_config_for = lambda key_dim, value_dim, c=config: c
        got = t.grads(dp_pallas.forward, low, None, cot_o, cot_s, n, K**-0.5)
        errs = " ".join(f"{k} {rel_rmse(want[k], got[k]):.4f}" for k in got)
        print(f"n_h={n} T={T} gated={gated} | {label}: {errs}", flush=True)
