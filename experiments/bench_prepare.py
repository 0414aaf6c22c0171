"""Stage 1 (``pallas_kernels.prepare``) variants on one GPU: accuracy of ``A`` and of the forward,
then timings of the kernel alone and of the whole forward (``kernels.forward``).

Accuracy: ``A`` of each variant against ``inv(I + M)`` in float64 (numpy, on the same bf16-rounded
inputs) over every chunk of a small problem, for random unit keys and for a stress case (strongly
correlated keys, beta near 2, gates and resets); the forward's ``o`` / final state of each variant
(bf16 kernels) against the fp32 kernels (IEEE products) on the same rounded inputs.
Timing: interleaved round-robin medians (``bench_op.time_round_robin``), B=4, T=4096, H=8,
K=V=128, bf16, ungated.

    PYTHONPATH=. python experiments/bench_prepare.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_op import Case, iters_for, make_inputs, time_round_robin
from pallas_kernels import forward as kernels
from pallas_kernels.common import CHUNK
from pallas_kernels.prepare import prepare

VARIANTS = {  # name -> prepare keyword arguments
    "dense4": dict(blocked=False, num_warps=4),  # the previous kernel
    "blk4": dict(num_warps=4),  # the new default
    "blk8": dict(num_warps=8),
    "blk4_u1": dict(num_warps=4, unroll=1),
    "blk4_tf32": dict(num_warps=4, precision="tf32"),
}
CONFIG_FIELDS = dict(
    blocked="prep_blocked",
    num_warps="prep_warps",
    unroll="prep_unroll",
    precision="prep_precision",
)


def config_of(kw: dict) -> kernels.KernelConfig:
    return dataclasses.replace(
        kernels.KernelConfig(), **{CONFIG_FIELDS[k]: v for k, v in kw.items()}
    )


def problem(rng, B, L, H, K, stress: bool):
    """bf16-rounded k, beta and an interleaved log-gate with resets (float64 copies too)."""
    if stress:
        base = rng.normal(size=(B, 1, H, K))
        k = base + 0.4 * rng.normal(size=(B, L, H, K))
        beta = rng.uniform(1.8, 2.0, size=(B, L, H))
    else:
        k = rng.normal(size=(B, L, H, K))
        beta = rng.uniform(0, 2, size=(B, L, H))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    gate = np.log(rng.uniform(0.7, 1.0, size=(B, H, L)))
    gate[rng.uniform(size=gate.shape) < 0.01] = -np.inf
    kb, bb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(beta, jnp.bfloat16)
    k64 = np.asarray(kb.astype(jnp.float32), np.float64)
    b64 = np.asarray(bb.astype(jnp.float32), np.float64)
    return kb, bb, jnp.asarray(gate, jnp.float32), k64, b64, gate


def reference_a(k64, b64, gate, decay: bool) -> np.ndarray:
    B, L, H, _ = k64.shape
    out = np.zeros((B, H, L, CHUNK))
    for b in range(B):
        for h in range(H):
            for c in range(L // CHUNK):
                rows = slice(c * CHUNK, (c + 1) * CHUNK)
                kc, bc = k64[b, rows, h], b64[b, rows, h]
                E = 1.0
                if decay:
                    gc = gate[b, h, rows]
                    reset = np.isneginf(gc)
                    G, seg = np.cumsum(np.where(reset, 0, gc)), np.cumsum(reset)
                    E = np.exp(G[:, None] - G[None, :]) * (seg[:, None] == seg[None, :])
                M = np.tril(bc[:, None] * (kc @ kc.T) * E, -1)
                out[b, h, rows] = np.linalg.inv(np.eye(CHUNK) + M)
    return out


QUICK = False  # --quick: tiny shapes (CPU smoke test of this script)


def accuracy(log) -> list[dict]:
    """A of each variant against float64 on random (ungated: the old and new default only) and
    stress inputs (gated, resets: every variant)."""
    rng = np.random.default_rng(0)
    recs = []
    B, L, H, K = (1, 128, 1, 32) if QUICK else (1, 1024, 4, 128)
    chunks = lambda x: x.reshape(B, H, L // CHUNK, CHUNK, CHUNK)
    cases = [(False, False, ["dense4", "blk4"]), (True, True, list(VARIANTS))]
    for stress, decay, names in cases:
        kb, bb, g, k64, b64, g64 = problem(rng, B, L, H, K, stress)
        ref = reference_a(k64, b64, g64, decay)
        ref_norm = np.sqrt((chunks(ref) ** 2).sum((-1, -2)))
        for name in names:
            fn = jax.jit(
                lambda k, b, g, kw=VARIANTS[name]: prepare(
                    k, b, g, poison=True, interpret=QUICK, **kw
                )["a"]
            )
            a = np.asarray(fn(kb, bb, g if decay else None), np.float64)
            err = a - ref
            per_chunk = np.sqrt((chunks(err) ** 2).sum((-1, -2))) / ref_norm
            rec = dict(
                kind="a_accuracy",
                variant=name,
                stress=stress,
                decay=decay,
                finite=bool(np.isfinite(a).all()),
                max_rel_fro=float(per_chunk.max()),
                max_abs=float(np.abs(err).max()),
                max_abs_ref=float(np.abs(ref).max()),
            )
            recs.append(rec)
            log(json.dumps(rec))
    return recs


def f32(x):
    return None if x is None else x.astype(jnp.float32)


def rel_rmse(x, ref) -> float:
    return float(jnp.sqrt(jnp.mean((f32(x) - ref) ** 2) / jnp.mean(ref**2)))


_FORWARDS: dict = {}


def run_forward(cfg, n, K, *args):
    key = (cfg, n, K)
    if key not in _FORWARDS:
        fn = lambda *a: kernels.forward(*a, num_householder=n, scale=K**-0.5, config=cfg)[:2]
        _FORWARDS[key] = jax.jit(fn)
    return _FORWARDS[key](*args)


def forward_accuracy(log) -> list[dict]:
    """o / final state of the bf16 kernels per variant against the fp32 kernels (same inputs)."""
    rng = np.random.default_rng(1)
    recs = []
    B, T, H, K, n = (1, 64, 2, 32, 2) if QUICK else (2, 1024, 8, 128, 2)
    for stress in (False, True):
        kb, bb, _, _, _, _ = problem(rng, B, T * n, H, K, stress)
        q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.bfloat16)
        v = jnp.asarray(rng.normal(size=(B, T * n, H, K)), jnp.bfloat16)
        g = jnp.asarray(np.log(rng.uniform(0.9, 1.0, size=(B, T, H))), jnp.float32)
        resets = jnp.asarray(rng.uniform(size=(B, T)) < 0.002)
        args = (q, kb, v, bb, g, None, resets)
        ref_o, ref_s = run_forward(
            kernels.KernelConfig(), n, K, *[f32(x) for x in args[:4]], *args[4:]
        )
        for name in ("dense4", "blk4", "blk4_tf32"):
            o, s = run_forward(config_of(VARIANTS[name]), n, K, *args)
            rec = dict(
                kind="fwd_accuracy",
                variant=name,
                stress=stress,
                rel_rmse_o=rel_rmse(o, ref_o),
                rel_rmse_final=rel_rmse(s, ref_s),
            )
            recs.append(rec)
            log(json.dumps(rec))
    return recs


def timings(log, repeats: int, n_values: list[int], prep_n: list[int]) -> list[dict]:
    """Each prepare variant alone (``prep_n``) and the forward with the old and new default."""
    recs = []
    for n in n_values:
        c = Case(1, 64, 2, 32, 32, n, False) if QUICK else Case(4, 4096, 8, 128, 128, n, False)
        x = make_inputs(c, seed=1)
        fns = {}
        for name, kw in VARIANTS.items() if n in prep_n else ():
            f = jax.jit(lambda k, b, kw=kw: prepare(k, b, None, interpret=QUICK, **kw)["a"])
            t0 = time.perf_counter()
            f = f.lower(x["k"], x["beta"]).compile()
            log(f"compile prepare {name} n={n}: {time.perf_counter() - t0:.1f} s")
            fns[f"prepare {name}"] = lambda f=f, x=x: f(x["k"], x["beta"])
        if n == min(prep_n):  # gated (log-gates, no resets): the old and new default
            gate = kernels.log_gates(jax.nn.log_sigmoid(x["q"][..., 0]), None, n, c.T)[1]
            for name in ("dense4", "blk4"):
                f = jax.jit(
                    lambda k, b, g, kw=VARIANTS[name]: prepare(k, b, g, interpret=QUICK, **kw)["a"]
                )
                f = f.lower(x["k"], x["beta"], gate).compile()
                fns[f"prepare {name} gated"] = lambda f=f, x=x, g=gate: f(x["k"], x["beta"], g)
        for name in ("dense4", "blk4"):
            cfg = config_of(VARIANTS[name])
            f = jax.jit(
                lambda q, k, v, b, cfg=cfg, n=n: kernels.forward(
                    q, k, v, b, None, None, None, num_householder=n, scale=0.1, config=cfg
                )[0]
            )
            f = f.lower(x["q"], x["k"], x["v"], x["beta"]).compile()
            fns[f"forward {name}"] = lambda f=f, x=x: f(x["q"], x["k"], x["v"], x["beta"])
        for name, ms in time_round_robin(fns, [()], repeats, iters_for(c)).items():
            rec = dict(kind="time", n=n, what=name, ms=ms)
            recs.append(rec)
            log(json.dumps(rec))
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, nargs="*", default=[1, 2, 3], help="forward timings")
    ap.add_argument("--prep-n", type=int, nargs="*", default=[1, 3], help="variant timings")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-forward-accuracy", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_prepare.jsonl")

    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(path.replace(".jsonl", ".log"), "a") as fh:
            fh.write(msg + "\n")

    log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    recs = []
    t0 = time.perf_counter()
    recs += timings(log, args.repeats, args.n, args.prep_n)
    log(f"timings done at {time.perf_counter() - t0:.0f} s")
    report(recs, args.n)
    if not args.skip_accuracy:
        recs += accuracy(log)
        log(f"A accuracy done at {time.perf_counter() - t0:.0f} s")
        if not args.skip_forward_accuracy:
            recs += forward_accuracy(log)
            log(f"forward accuracy done at {time.perf_counter() - t0:.0f} s")
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def report(recs: list[dict], n_values: list[int]) -> None:
    print("\n| what | " + " | ".join(f"n_h={n}" for n in n_values) + " |")
    for what in dict.fromkeys(r["what"] for r in recs if r["kind"] == "time"):
        ms = {r["n"]: r["ms"] for r in recs if r["kind"] == "time" and r["what"] == what}
        print(
            f"| {what} | " + " | ".join(f"{ms.get(n, float('nan')):.4f}" for n in n_values) + " |"
        )


if __name__ == "__main__":
    main()
