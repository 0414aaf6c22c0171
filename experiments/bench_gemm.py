"""Time the language models' dense-layer GEMMs at chosen hidden sizes (is an odd size slow?).

Each case ``N,D,F`` times ``y = x @ w`` with ``x [N, D]`` bf16 and ``w [D, F]`` fp32 master
weights through ``dpjax.nn.linear.mixed_matmul`` (the models' dense layer: bf16 operands, fp32
accumulation), forward alone and forward + backward (``y`` and, from a bf16 cotangent, the
gradients of ``x`` and ``w``: three GEMMs), and the transposed layer ``x [N, F] @ w [F, D]``
(an MLP's down projection), each compiled with XLA's default GEMM emitter (its Triton GEMM
fusions) and with cuBLAS (``dpjax.train.gemm``'s compiler options), as interleaved medians.
Prints a table with ms and achieved TFLOP/s and writes ``bench_gemm.json`` to ``--out``.

Example (GPU; the DP2-805M preset's hidden size 1468 against 1472 and 1536, 32,768 tokens)::

    python experiments/bench_gemm.py --case 32768,1468,4096 --case 32768,1472,4096 \\
        --case 32768,1536,4096 --out /tmp/gemm
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_op import time_round_robin  # noqa: E402

from dpjax.nn.linear import mixed_matmul  # noqa: E402
from dpjax.train.gemm import gemm_compiler_options  # noqa: E402

EMITTERS = ("xla", "cublas")


def parse_case(text: str) -> tuple[int, int, int]:
    """``"N,D,F"`` -> ``(N, D, F)``, all positive."""
    try:
        n, d, f = (int(v) for v in text.split(","))
    except ValueError:
        msg = f"--case: expected N,D,F (three integers), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if min(n, d, f) < 1:
        raise argparse.ArgumentTypeError(f"--case: sizes must be positive, got {text!r}")
    return n, d, f


def layer_fns(compiler_options: dict) -> dict:
    """Forward and forward + backward of one dense layer, jitted with ``compiler_options``."""

    def fwd(x, w):
        return mixed_matmul(x, w, jnp.bfloat16, jnp.bfloat16)

    def fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(fwd, x, w)
        return y, vjp(dy)

    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    return {"fwd": jit(fwd), "fwd+bwd": jit(fwd_bwd)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--case",
        type=parse_case,
        action="append",
        help="N,D,F: N tokens, hidden size D, other side F (repeatable; default: the DP2-805M "
        "MLP at D = 1468, 1472, 1536 with 32,768 tokens)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--iters", type=int, default=10, help="calls per timed round")
    parser.add_argument("--out", default=None, help="folder for bench_gemm.json")
    args = parser.parse_args(argv)
    cases = args.case or [(32768, d, 4096) for d in (1468, 1472, 1536)]
    key = jax.random.PRNGKey(0)
    records = []
    print(f"device: {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| N | in | out | pass | emitter | ms | TFLOP/s |\n|---|---|---|---|---|---|---|")
    for n, d, f in cases:
        fns, args_of = {}, {}
        for in_dim, out_dim in ((d, f), (f, d)):
            kx, kw, kg = jax.random.split(jax.random.fold_in(key, in_dim * 7919 + out_dim), 3)
            x = jax.random.normal(kx, (n, in_dim), jnp.bfloat16)
            w = jax.random.normal(kw, (in_dim, out_dim), jnp.float32) / in_dim**0.5
            dy = jax.random.normal(kg, (n, out_dim), jnp.bfloat16)
            for emitter in EMITTERS:
                options = gemm_compiler_options(emitter, None)
                for name, fn in layer_fns(options).items():
                    label = (in_dim, out_dim, name, emitter)
                    fns[label] = fn
                    args_of[label] = (x, w) if name == "fwd" else (x, w, dy)
        wrapped = {k: (lambda fn=fn, a=args_of[k]: fn(*a)) for k, fn in fns.items()}
        for (in_dim, out_dim, name, emitter), ms in time_round_robin(
            wrapped, [()], args.repeats, args.iters
        ).items():
            flops = 2 * n * in_dim * out_dim * (1 if name == "fwd" else 3)
            rec = dict(n=n, in_dim=in_dim, out_dim=out_dim, pass_=name, emitter=emitter, ms=ms)
            rec["tflops"] = flops / ms / 1e9
            records.append(rec)
            print(
                f"| {n} | {in_dim} | {out_dim} | {name} | {emitter} | {ms:.3f} | "
                f"{rec['tflops']:.0f} |"
            )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=jax.devices()[0].device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""))
        with open(os.path.join(args.out, "bench_gemm.json"), "w") as fh:
            json.dump(dict(meta, records=records), fh, indent=1)
    return records


if __name__ == "__main__":
    main()
