"""Run the DeltaProduct op once per implementation: forward + gradient, with timings.

python experiments/op_demo.py --batch 2 --tokens 512 --heads 4 --dim 64 --householder 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import dpjax


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2, help="batch size B")
    p.add_argument("--tokens", type=int, default=512, help="sequence length T in tokens")
    p.add_argument("--heads", type=int, default=4, help="number of heads H")
    p.add_argument("--dim", type=int, default=64, help="key and value head dim K = V")
    p.add_argument("--householder", type=int, default=2, help="Householder steps per token n_h")
    p.add_argument("--gated", action="store_true", help="use a forget gate g")
    p.add_argument(
        "--impls", default="reference,chunked", help="comma-separated implementations to run"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="q/k/v/beta dtype"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the first (median)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    B, T, H, D, n = a.batch, a.tokens, a.heads, a.dim, a.householder
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = dpjax.ops.l2norm(jax.random.normal(ks[1], (B, T * n, H, D)))
    v = jax.random.normal(ks[2], (B, T * n, H, D))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T * n, H)))
    q, k, v, beta = (x.astype(a.dtype) for x in (q, k, v, beta))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H))) if a.gated else None
    print(
        f"backend={jax.default_backend()} B={B} T={T} H={H} K=V={D} n_h={n} gated={a.gated} "
        f"dtype={a.dtype}"
    )
    outputs = {}
    for impl in a.impls.split(","):

        def loss(q, k, v, beta, impl=impl):
            o, _ = dpjax.delta_product(q, k, v, beta, g, impl=impl)
            return jnp.sum(jnp.square(o.astype(jnp.float32))), o

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v, beta))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            (_, o), grads = jax.block_until_ready(step(q, k, v, beta))
            times.append(time.perf_counter() - t0)
        outputs[impl] = o.astype(jnp.float32)
        print(
            f"{impl:>10}: forward+gradient {1e3 * statistics.median(times):8.1f} ms median of "
            f"{a.repeats} (first call incl. compile {compile_s:.1f} s)"
        )
    names = list(outputs)
    for other in names[1:]:
        err = jnp.linalg.norm(outputs[other] - outputs[names[0]]) / jnp.linalg.norm(
            outputs[names[0]]
        )
        print(f"relative difference {other} vs {names[0]}: {float(err):.2e}")


if __name__ == "__main__":
    main()
