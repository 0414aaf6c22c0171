"""Time the short convolution: XLA against the one-pass Pallas kernels, backward and forward.

For each shape (default: the 392M language models' convolutions, B=8, T=4096, C=1024 and 2048,
bf16, packed documents), times side by side (interleaved medians) the gradients of
``<conv_silu(x), dy>`` w.r.t. ``x`` and the kernel (XLA's autodiff; the backward kernel; both
kernels; each also with the L2 norm over heads of 128 channels that the mixer's q and k get),
the backward kernel alone at a few tile shapes, and the forward ``SiLU(conv(x))`` by XLA and by
the forward kernel at a few tile shapes (and with the L2 norm). Writes ``bench_conv.json`` and
``bench_conv.md``.

Example (GPU)::

    python experiments/bench_conv.py --out /tmp/bench_conv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_op import time_round_robin  # noqa: E402

from dpjax.nn.conv import conv_silu, conv_silu_kernels  # noqa: E402
from pallas_kernels.common import default_interpret  # noqa: E402
from pallas_kernels.short_conv import short_conv_backward, short_conv_forward  # noqa: E402

# the kernel alone at these tile choices (``short_conv_backward`` keywords)
TILES = [
    dict(rows=8, seg_len=64),
    dict(rows=16, seg_len=64),
    dict(rows=8, seg_len=64, ahead=3),
    dict(rows=16, seg_len=64, num_warps=8, ahead=2),
    dict(rows=16, seg_len=128, ahead=2),
    dict(rows=8, seg_len=64, block_c=128, num_warps=8, ahead=2),
]
# the mixer's q and k: SiLU(conv) then an L2 norm over each head of this many channels
NORM_GROUP = 128
FORWARD_TILES = [dict(), dict(rows=16), dict(rows=16, ahead=2), dict(rows=32, num_warps=8)]


def variants(interpret: bool, norm_group: int = NORM_GROUP) -> dict:
    """name -> jitted ``f(x, dy, kernel, segment_ids)``: forward + backward by XLA, with the
    backward kernel and with both kernels, each without and with the L2 norm over groups of
    ``norm_group`` channels; the backward kernel alone at each of ``TILES``; and the forward
    (bf16 output) by XLA and by the kernel, with the norm and at each of ``FORWARD_TILES``."""

    def grads(conv):
        def f(x, dy, w, seg):
            y = conv(x, w, None, seg, jnp.bfloat16).astype(jnp.float32)
            return jnp.sum(y * dy.astype(jnp.float32))

        return jax.jit(jax.grad(f, argnums=(0, 2)))

    fns = {}
    for norm in (None, norm_group):
        tag = "" if norm is None else f" l2norm/{norm}"
        fns[f"xla autodiff (fwd+bwd){tag}"] = grads(lambda *a, n=norm: conv_silu(*a, n))
        fns[f"pallas backward (fwd+bwd){tag}"] = grads(
            lambda *a, n=norm: conv_silu_kernels(*a, n, False, True, interpret)
        )
        fns[f"pallas forward and backward (fwd+bwd){tag}"] = grads(
            lambda *a, n=norm: conv_silu_kernels(*a, n, True, True, interpret)
        )
    label = lambda tiles: " ".join(f"{k}={v}" for k, v in tiles.items())  # noqa: E731
    for tiles in TILES:
        fns[f"kernel alone {label(tiles)}"] = jax.jit(
            lambda x, dy, w, seg, tiles=tiles: short_conv_backward(
                x, dy, w, None, seg, interpret=interpret, **tiles
            )
        )
    fns["xla forward"] = jax.jit(lambda x, dy, w, seg: conv_silu(x, w, None, seg, jnp.bfloat16))
    fns[f"xla forward l2norm/{norm_group}"] = jax.jit(
        lambda x, dy, w, seg: conv_silu(x, w, None, seg, jnp.bfloat16, norm_group)
    )
    fns[f"pallas forward l2norm/{norm_group}"] = jax.jit(
        lambda x, dy, w, seg: short_conv_forward(
            x, w, None, seg, jnp.bfloat16, norm_group=norm_group, interpret=interpret
        )
    )
    for tiles in FORWARD_TILES:
        fns[f"pallas forward {label(tiles)}".strip()] = jax.jit(
            lambda x, dy, w, seg, tiles=tiles: short_conv_forward(
                x, w, None, seg, jnp.bfloat16, interpret=interpret, **tiles
            )
        )
    return fns


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--case",
        action="append",
        default=None,
        help="B,T,C shape (repeatable; default: 8,4096,1024 and 8,4096,2048)",
    )
    p.add_argument("--width", type=int, default=4, help="kernel width W")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    p.add_argument("--iters", type=int, default=10, help="calls per round")
    p.add_argument("--out", default="bench_conv", help="output directory")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cases = [
        tuple(int(v) for v in c.split(",")) for c in (args.case or ["8,4096,1024", "8,4096,2048"])
    ]
    interpret = default_interpret()
    records = []
    for B, T, C in cases:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(B, T, C)), jnp.bfloat16)
        dy = jnp.asarray(rng.normal(size=(B, T, C)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=(args.width, C)) * 0.3, jnp.float32)
        seg = jnp.asarray(np.sort(rng.integers(0, 8, size=(B, T)), axis=1), jnp.int32)

        fns = variants(interpret, math.gcd(NORM_GROUP, C))
        times = time_round_robin(fns, [(x, dy, w, seg)], args.repeats, args.iters)
        bytes_min = 3 * B * T * C * 2  # read x, dy; write dx (bf16)
        for name, ms in times.items():
            rec = dict(B=B, T=T, C=C, W=args.width, variant=name, ms=ms, min_mb=bytes_min / 1e6)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    device = jax.devices()[0].device_kind
    with open(os.path.join(args.out, "bench_conv.json"), "w") as fh:
        json.dump(dict(device=device, records=records), fh, indent=1)
    lines = [f"Device: {device}", "", "| B, T, C | variant | ms |", "|---|---|---|"]
    lines += [f"| {r['B']}, {r['T']}, {r['C']} | {r['variant']} | {r['ms']:.3f} |" for r in records]
    with open(os.path.join(args.out, "bench_conv.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return records


if __name__ == "__main__":
    main()
