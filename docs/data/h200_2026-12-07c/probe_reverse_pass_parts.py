"""One-off probe (2026-12-07): the reverse state pass with parts switched off, timing only.

How it ran: ``pallas_kernels/`` copied next to this file and patched with
``probe_reverse_pass_parts.patch`` (environment switches ``DP_NO_DHIL``, ``DP_NO_DVNEW``,
``DP_NO_READ`` that skip the ``dh_il`` store, the ``dv_new`` store and the read term; the
gradients are then wrong, only the time means something), then ``python3 probe.py`` from that
directory on the GPU. B=4, T=4096, H=8, K=V=128, bf16, ungated, ``split=1``; the forward pass
alone with and without ``mid_states`` for comparison. Medians of interleaved timings
(``experiments/bench_op.time_round_robin``), written to ``$OUT/probe.json``.
"""

import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "../../experiments"), os.path.join(here, "../..")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_op import time_round_robin  # noqa: E402

from pallas_kernels.backward_state_pass import state_pass_backward  # noqa: E402
from pallas_kernels.state_pass import state_pass  # noqa: E402

SWITCHES = ("DP_NO_DHIL", "DP_NO_DVNEW", "DP_NO_READ")
VARIANTS = [
    ("base", {}, {}),
    ("no_dhil", {"DP_NO_DHIL": "1"}, {}),
    ("no_dvnew", {"DP_NO_DVNEW": "1"}, {}),
    ("no_read", {"DP_NO_READ": "1"}, {}),
    ("no_all", dict.fromkeys(SWITCHES, "1"), {}),
    ("dots_input", {}, {"dots": "input"}),
    ("sub", {}, {"loop": "sub"}),
]


def main() -> None:
    results = []
    B, T, H, K, V = 4, 4096, 8, 128, 128
    for n in (1, 2):
        L = T * n
        keys = jax.random.split(jax.random.key(0), 8)
        bf = jnp.bfloat16
        a = jax.random.normal(keys[0], (B, H, L, 64), jnp.float32) * 0.1
        k = (jax.random.normal(keys[1], (B, L, H, K)) / 11).astype(bf)
        beta = jax.random.uniform(keys[2], (B, L, H)).astype(bf)
        dv_out = jax.random.normal(keys[3], (B, H, L, V)).astype(bf)
        q = jax.random.normal(keys[4], (B, T, H, K)).astype(bf)
        do = jax.random.normal(keys[5], (B, T, H, V)).astype(bf)
        dht = jnp.zeros((B, H, K, V), jnp.float32)
        v = jax.random.normal(keys[6], (B, L, H, V)).astype(bf)
        bwd_args = (a, k, beta, dv_out, q, do, dht)
        fns = {}
        for label, env, kwargs in VARIANTS:
            for name in SWITCHES:  # read when the kernel is traced
                os.environ.pop(name, None)
            os.environ.update(env)
            f = jax.jit(
                lambda *x, kw=kwargs, n=n: state_pass_backward(
                    *x, None, None, None, num_householder=n, scale=0.1, split=1, **kw
                )
            )
            f = f.lower(*bwd_args).compile()
            fns["bwd_" + label] = lambda f=f, args=bwd_args: f(*args)
        for mid in (False, True):
            f = jax.jit(
                lambda *x, mid=mid, n=n: state_pass(
                    *x, None, None, None, num_householder=n, split=1, mid_states=mid
                )
            )
            f = f.lower(a, k, v, beta).compile()
            fns[f"fwd_mid{int(mid)}"] = lambda f=f, args=(a, k, v, beta): f(*args)
        for name, ms in time_round_robin(fns, [()], 7, 20).items():
            record = dict(n=n, variant=name, ms=round(ms, 4))
            results.append(record)
            print(json.dumps(record), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
