"""Run the op's forward + backward (impl="pallas") twice at B=4, T=4096, H=8, K=V=128, n_h=2,
bf16, ungated, for ncu (--launch-skip 8 --launch-count 8 over the dp_ kernels: the second)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dpjax  # noqa: E402

B, T, H, K, V, n = 4, int(os.environ.get("NCU_T", 4096)), 8, 128, 128, 2
keys = jax.random.split(jax.random.key(0), 6)
bf = jnp.bfloat16
q = jax.random.normal(keys[0], (B, T, H, K), bf)
k = jax.random.normal(keys[1], (B, T * n, H, K), bf)
k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(bf)
v = jax.random.normal(keys[2], (B, T * n, H, V), bf)
beta = jax.random.uniform(keys[3], (B, T * n, H), jnp.float32).astype(bf)
do = jax.random.normal(keys[4], (B, T, H, V), bf)


def loss(q, k, v, beta):
    o, _ = dpjax.delta_product(q, k, v, beta, num_householder=n, impl="pallas")
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))


step = jax.jit(jax.grad(loss, (0, 1, 2, 3)))
for _ in range(2):
    jax.block_until_ready(step(q, k, v, beta))
