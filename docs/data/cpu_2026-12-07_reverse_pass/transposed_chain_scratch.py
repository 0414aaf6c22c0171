"""Scratch kernel: the reverse pass's three chain products alone, in today's orientation (``n``:
state ``[Kp, BV]``) or transposed (``t``: ``[BV, Kp]``), lowered for an H100 without a GPU; its
TTIR goes to /tmp/<orientation><BV>.ttir for ``experiments/offline_compile.py --compile-one``
under a pip-Triton Python (docs/BENCHMARKS.md, "eighth session"). Usage, from the repository
root: ``.venv/bin/python docs/data/cpu_2026-12-07_reverse_pass/transposed_chain_scratch.py t 32``
then ``/tmp/tri/bin/python experiments/offline_compile.py --compile-one /tmp/t32.ttir 4 3``."""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import offline_compile  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from pallas_kernels.common import DotMode, mm, pallas_call, through_product  # noqa: E402

ORIENTATION = sys.argv[1]  # "n" or "t"
BV = int(sys.argv[2]) if len(sys.argv) > 2 else 32
L, Kp, H = 4096 * 3, 128, 8
DOTS = dict(dtype=jnp.bfloat16, interpret=False)


def kernel(a_ref, k_ref, dvo_ref, dht_ref, dvnew_ref, dh0_ref):
    transposed = ORIENTATION == "t"

    def step(s, d):
        rows = pl.ds(pl.multiple_of((L // 64 - 1 - s) * 64, 64), 64)
        k, a = k_ref[rows, :], a_ref[rows, :]
        dv_out = through_product(dvo_ref[rows, :], DotMode.INPUT, **DOTS)
        if transposed:  # d: [BV, Kp]
            dvn = dv_out.T + mm(d, k, DotMode.INPUT, trans_b=True, **DOTS)  # [BV, 64]
            dvnew_ref[rows, :] = dvn.T.astype(jnp.bfloat16)
            y = mm(dvn, a, DotMode.TF32, **DOTS)
            return d - mm(y, k, DotMode.TF32, **DOTS)
        dvn = dv_out + mm(k, d, DotMode.INPUT, **DOTS)  # [64, BV]
        dvnew_ref[rows, :] = dvn.astype(jnp.bfloat16)
        y = mm(a, dvn, DotMode.TF32, trans_a=True, **DOTS)
        return d - mm(k, y, DotMode.TF32, trans_a=True, **DOTS)

    d0 = dht_ref[...].T if transposed else dht_ref[...]
    out = lax.fori_loop(0, L // 64, step, d0)
    dh0_ref[...] = out.T if transposed else out


def run(a, k, dvo, dht):
    return pallas_call(
        kernel,
        inputs=[a, k, dvo, dht],
        in_specs=[
            pl.BlockSpec((None, L, 64), lambda i, h: (h, 0, 0)),
            pl.BlockSpec((None, L, Kp), lambda i, h: (h, 0, 0)),
            pl.BlockSpec((None, L, BV), lambda i, h: (h, 0, i)),
            pl.BlockSpec((None, Kp, BV), lambda i, h: (h, 0, i)),
        ],
        out_shapes=[
            jax.ShapeDtypeStruct((H, L, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((H, Kp, 128), jnp.float32),
        ],
        out_specs=[
            pl.BlockSpec((None, L, BV), lambda i, h: (h, 0, i)),
            pl.BlockSpec((None, Kp, BV), lambda i, h: (h, 0, i)),
        ],
        grid=(128 // BV, H),
        num_warps=4,
        num_stages=3,
        interpret=False,
        name="dp_chain",
    )


sds = jax.ShapeDtypeStruct
args = (
    sds((H, L, 64), jnp.float32),
    sds((H, L, Kp), jnp.bfloat16),
    sds((H, L, 128), jnp.bfloat16),
    sds((H, Kp, 128), jnp.float32),
)
with offline_compile.lowered_for_the_gpu():
    text = jax.jit(run).trace(*args).lower().as_text()
(chain,) = offline_compile.extract_kernels(text)
path = f"/tmp/{ORIENTATION}{BV}.ttir"
with open(path, "w") as f:
    f.write(offline_compile.bytecode_to_text(chain["bytecode"]))
print(path, chain["num_warps"], chain["num_stages"])
