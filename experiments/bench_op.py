"""Time the DeltaProduct op: Pallas kernels vs the chunked JAX path (vs the reference at small T).

One process, one GPU; candidates are timed round-robin (interleaved), each timing is a batch of
back-to-back calls closed by ``block_until_ready`` after a warm-up, over rotating input sets; the
reported number is the median over repeats. Compile time (lower + compile) is reported per
candidate. Forward and forward+backward (``grad`` of ``<o, do>`` w.r.t. q, k, v, beta, g through
the custom_vjp) are timed separately. ``--stages`` also times the three Pallas kernels alone and
``--tune`` sweeps their tile sizes / warps / stages first and uses the fastest for the op.

Writes ``bench_op.json`` and ``bench_op.md`` (markdown tables) to ``--out`` (default ``$OUT`` or
``./bench_out``). Peer results written by ``bench_peers.py`` (``peers_*.json``) in the same folder
are merged into the table when ``--peers`` is given.

Examples::

    python experiments/bench_op.py --help
    python experiments/bench_op.py --quick              # small shapes, a smoke test (CPU ok)
    python experiments/bench_op.py --tune --stages      # the full GPU run
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import glob
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.ops import chunked, reference
from dpjax.ops import pallas as dp_pallas
from pallas_kernels import backward as kernel_backward
from pallas_kernels import forward as kernels
from pallas_kernels.common import default_interpret, padded_length
from pallas_kernels.output import output
from pallas_kernels.prepare import prepare
from pallas_kernels.state_pass import state_pass

PEAK_TFLOPS = 798.0  # bf16 dense, measured on this workplace's H100 (KINDS.md)
PEAK_TBPS = 3.0  # device-to-device copy, read + write (KINDS.md)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    n: int
    gated: bool
    reference: bool = False  # also time the token-by-token reference

    @property
    def label(self) -> str:
        gate = "gated" if self.gated else "ungated"
        return f"B={self.B} T={self.T} H={self.H} K={self.K} V={self.V} n_h={self.n} {gate}"


def parse_case(text: str) -> Case:
    """``"B,T,H,K,V,N_H[,gated]"`` -> Case (argparse type)."""
    parts = [p.strip() for p in text.split(",")]
    gated = len(parts) == 7 and parts[6].lower() in ("gated", "g", "true", "1")
    if len(parts) not in (6, 7) or (len(parts) == 7 and not gated and parts[6] != "ungated"):
        raise argparse.ArgumentTypeError(f"expected B,T,H,K,V,N_H[,gated], got {text!r}")
    try:
        B, T, H, K, V, n = (int(p) for p in parts[:6])
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected integers in B,T,H,K,V,N_H, got {text!r}"
        ) from err
    if min(B, T, H, K, V, n) < 1:
        raise argparse.ArgumentTypeError(f"every size must be >= 1, got {text!r}")
    return Case(B, T, H, K, V, n, gated)


FULL_CASES = [
    Case(4, 4096, 8, 128, 128, 1, False),
    Case(4, 4096, 8, 128, 128, 2, False),
    Case(4, 4096, 8, 128, 128, 3, False),
    Case(4, 4096, 8, 128, 128, 1, True),
    Case(4, 4096, 8, 128, 128, 2, True),
    Case(4, 4096, 8, 128, 128, 3, True),
    Case(4, 4096, 16, 64, 64, 4, False),
    Case(1, 32768, 8, 128, 128, 2, False),
    Case(2, 256, 8, 128, 128, 2, False, reference=True),
]
QUICK_CASES = [
    Case(1, 128, 2, 32, 32, 2, False, reference=True),
    Case(1, 128, 2, 32, 32, 3, True),
]


def floor_ms(c: Case) -> dict[str, float]:
    """METHOD.md's two numbers for the forward: FLOPs of the chunked algorithm over the bf16
    tensor-core rate, and compulsory bytes (inputs read once, o and final state written once) over
    the copy bandwidth."""
    C, K, V, n = 64, c.K, c.V, c.n
    nti = c.T * n / C
    nt = c.T / C
    per_head = nti * (2 * C * C * K + 4 * C**3 + 2 * C * C * (K + V) + 4 * C * K * V)
    per_head += nt * (2 * C * K * V + n * 2 * C * C * (K + V))
    flops = per_head * c.B * c.H
    elems = c.B * c.H * (c.T * K + c.T * n * (K + V) + c.T * V)
    nbytes = 2 * elems + c.B * c.H * (c.T * n * 2 + c.K * c.V * 4 + (c.T * 4 if c.gated else 0))
    return {
        "gflop": flops / 1e9,
        "mbytes": nbytes / 1e6,
        "flop_ms": flops / (PEAK_TFLOPS * 1e12) * 1e3,
        "byte_ms": nbytes / (PEAK_TBPS * 1e12) * 1e3,
    }


def config_fields(spec: str, config_class: type = kernel_backward.BackwardConfig) -> dict:
    """``"grad_dtype=input,wy_warps=8"`` -> fields of ``config_class`` (BackwardConfig or
    KernelConfig; values as Python literals where they parse, else strings); unknown fields raise
    a ValueError naming them."""
    fields = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in {f.name for f in dataclasses.fields(config_class)}:
            flag = (
                "--bwd-variant" if config_class is kernel_backward.BackwardConfig else "--variant"
            )
            raise ValueError(f"{flag}: expected {config_class.__name__} FIELD=VALUE, got {item!r}")
        try:
            fields[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[name] = value
    return fields


@contextlib.contextmanager
def backward_variant(spec: str | None):
    """Within the block the op's custom_vjp runs the ``BackwardConfig`` of each head dim with the
    fields of ``spec`` (``"FIELD=VALUE[,FIELD=VALUE]"``, or None: unchanged) changed."""
    default_for = dp_pallas.backward_config_for
    if spec:
        fields = config_fields(spec)
        dp_pallas.backward_config_for = lambda key_dim, value_dim: dataclasses.replace(
            default_for(key_dim, value_dim), **fields
        )
    try:
        yield
    finally:
        dp_pallas.backward_config_for = default_for


def split_fields(spec: str) -> tuple[dict, dict]:
    """A ``--variant`` spec -> ``(KernelConfig fields, BackwardConfig fields)``: each field goes
    to the configuration that has it (KernelConfig first); unknown fields raise a ValueError."""
    forward_names = {f.name for f in dataclasses.fields(kernels.KernelConfig)}
    items = spec.split(",")
    fwd = [x for x in items if x.partition("=")[0] in forward_names]
    bwd = [x for x in items if x not in fwd]
    return (
        config_fields(",".join(fwd), kernels.KernelConfig) if fwd else {},
        config_fields(",".join(bwd)) if bwd else {},
    )


def with_state_split(config_for: Callable, split: int) -> Callable:
    """``config_for(key_dim, value_dim)`` (forward or backward) with ``state_split`` replaced."""
    return lambda key_dim, value_dim: dataclasses.replace(
        config_for(key_dim, value_dim), state_split=split
    )


def kernel_case(c: Case) -> Case:
    """``c`` with T rounded up to a whole chunk and K, V to the kernels' padded head dims."""
    Kp, Vp = kernels.padded_dims(c.K, c.V)
    return dataclasses.replace(c, T=padded_length(c.T), K=Kp, V=Vp)


OP_ARGS = ("q", "k", "v", "beta", "g", "do")  # make_inputs' keys in op_fns' argument order


def make_inputs(c: Case, seed: int, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.key(seed), 6)
    L = c.T * c.n
    k = jax.random.normal(ks[1], (c.B, L, c.H, c.K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": jax.random.normal(ks[0], (c.B, c.T, c.H, c.K), dtype),
        "k": k.astype(dtype),
        "v": jax.random.normal(ks[2], (c.B, L, c.H, c.V), dtype),
        "beta": (2 * jax.random.uniform(ks[3], (c.B, L, c.H))).astype(dtype),
        "g": jax.nn.log_sigmoid(jax.random.normal(ks[4], (c.B, c.T, c.H))) if c.gated else None,
        "do": jax.random.normal(ks[5], (c.B, c.T, c.H, c.V), dtype),
    }


def op_fns(impl: Callable, c: Case) -> tuple[Callable, Callable]:
    """Jitted forward and forward+backward of one implementation."""
    scale = c.K**-0.5

    def fwd(q, k, v, beta, g):
        return impl(q, k, v, beta, g, None, None, num_householder=c.n, scale=scale)

    def loss(q, k, v, beta, g, do):
        o, _ = fwd(q, k, v, beta, g)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    argnums = (0, 1, 2, 3, 4) if c.gated else (0, 1, 2, 3)
    return jax.jit(lambda q, k, v, beta, g, do: fwd(q, k, v, beta, g)[0]), jax.jit(
        jax.grad(loss, argnums)
    )


def compile_time(fn: Callable, args: tuple) -> tuple[Callable, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_round_robin(
    fns: dict[str, Callable], arg_sets: list[tuple], repeats: int, iters: int
) -> dict[str, float]:
    """Median ms per call of each function; calls interleaved across functions."""
    for f in fns.values():  # warm-up
        for args in arg_sets:
            jax.block_until_ready(f(*args))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            out = None
            for i in range(iters):
                out = f(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / iters * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_stages(
    c: Case, stages: dict[str, tuple], repeats: int, iters: int, log: Callable
) -> list[dict]:
    """Each stage alone (interleaved medians) and its compile time (lower + compile of the
    stage's jitted function: the kernel's Triton compile plus its little XLA glue)."""
    compiles = {}
    for s, (f, a) in stages.items():
        jax.clear_caches()  # building the stage inputs compiled some stages already
        compiles[s] = compile_time(f, a)[1]
    fns = {s: (lambda f=f, a=a: f(*a)) for s, (f, a) in stages.items()}
    records = []
    for s, ms in time_round_robin(fns, [()], repeats, iters).items():
        rec = dict(
            kind="stage",
            case=c.label,
            **dataclasses.asdict(c),
            stage=s,
            ms=ms,
            compile_s=compiles[s],
        )
        records.append(rec)
        log(json.dumps(rec))
    return records


def iters_for(c: Case) -> int:
    work = c.B * c.T * c.H * c.n
    return max(3, min(50, int(2e7 / max(work, 1))))


def stage_fns(c: Case, config: kernels.KernelConfig, inputs: dict) -> dict[str, tuple]:
    """The three kernels alone, each on the outputs of the previous one (padded layout)."""
    n = c.n
    q, k, v, beta = inputs["q"], inputs["k"], inputs["v"], inputs["beta"]
    gate_tok, gate_sub = kernels.log_gates(inputs["g"], None, n, c.T)
    factors = "wu" if config.state_stored_wu else ""
    prep = jax.jit(
        lambda k, b, g, v: prepare(
            k,
            b,
            g,
            num_warps=config.prep_warps,
            num_stages=config.prep_stages,
            v=v if factors else None,
            factors=factors,
            interpret=default_interpret(),
        )
    )
    p = prep(k, beta, gate_sub, v)
    sp = jax.jit(
        lambda a, k, v, b, gam, fdec, wu: state_pass(
            a,
            k,
            v,
            b,
            gam,
            fdec,
            None,
            num_householder=n,
            block_v=config.state_block_v,
            num_warps=config.state_warps,
            num_stages=config.state_stages,
            tf32_state=config.state_tf32,
            split=config.state_split,
            wu=wu,
            loop=config.state_loop,
            interpret=default_interpret(),
        )
    )
    wu = (p["w"], p["u"]) if factors else None
    sp_args = (p["a"], k, v, beta, p.get("gam"), p.get("fdec"), wu)
    h, vnew, _ = sp(*sp_args)
    out = jax.jit(
        lambda q, k, vn, h, g: output(
            q,
            k,
            vn,
            h,
            g,
            num_householder=n,
            scale=0.1,
            block_v=config.out_block_v,
            num_warps=config.out_warps,
            num_stages=config.out_stages,
            interpret=default_interpret(),
        )
    )
    return {
        "prepare": (prep, (k, beta, gate_sub, v)),
        "state_pass": (sp, sp_args),
        "output": (out, (q, k, vnew, h, gate_tok)),
    }


def stage_fn(
    kern: dict[str, Callable], stage: str, cfg: kernel_backward.BackwardConfig
) -> Callable:
    """The jitted backward kernel of ``stage`` taking its arguments positionally (the reverse
    state pass: then the forward's ``W``, read only with ``cfg.state_stored_w``, and the token
    log-gate, read only where ``dv_out`` is None: ``cfg.state_fused_dv_out``)."""
    if stage == "bwd_state_pass":
        stored = cfg.state_stored_w
        return jax.jit(
            lambda *a, f=kern["state_pass"]: f(
                *a[:-2], w=a[-2] if stored else None, gate_tokens=a[-1]
            )
        )
    return jax.jit(kern[STAGE_KERNEL[stage]])


def backward_stage_fns(
    c: Case, inputs: dict, cfg: kernel_backward.BackwardConfig | None = None
) -> dict[str, tuple]:
    """The backward kernels alone (``pallas_kernels.backward`` stages, as ``cfg`` selects them),
    each on the outputs of the previous ones, plus the whole backward (kernels + the JAX gate
    glue)."""
    n, scale = c.n, c.K**-0.5
    cfg = cfg or dp_pallas.backward_config_for(c.K, c.V)
    q, k, v, beta, g, do = (inputs[x] for x in OP_ARGS)
    _, _, res = jax.jit(
        lambda *a: kernels.forward(
            *a,
            None,
            None,
            num_householder=n,
            scale=scale,
            save_states=cfg.save_states,
            save_mid_states=cfg.reads_mid_states(c.K, c.V, n),
            save_w=True,  # for the stored-W variant of the reverse pass (bwd_tune)
        )
    )(q, k, v, beta, g)
    whole = jax.jit(
        lambda q, k, v, beta, res, do: kernel_backward.backward(
            q, k, v, beta, res, do, None, num_householder=n, scale=scale, config=cfg
        )
    )
    st = jax.jit(
        lambda q, k, v, beta, res, do: kernel_backward.stages(
            q, k, v, beta, res, do, None, num_householder=n, scale=scale, config=cfg
        )
    )(q, k, v, beta, res, do)
    gam, fdec, gam_tok = kernel_backward.gate_vectors(res)
    dht = jnp.zeros((c.B, c.H, c.K, c.V), jnp.float32)
    kern = kernel_backward.stage_kernels(
        cfg, num_householder=n, scale=scale, interpret=default_interpret()
    )
    jit = lambda name, **kw: jax.jit(functools.partial(kern[name], **kw))
    grad_dtype = cfg.intermediate_dtype(q.dtype)  # of dk_out, dW, dkp: as the op writes them
    out = {}
    if res.v_new is None:
        out["bwd_recompute"] = (
            jit("recompute"),
            (res.a, k, v, beta, res.h, q, do, gam, fdec, res.gate_tokens),
        )
    elif not (cfg.output_dv or cfg.state_fused_dv_out):
        out["bwd_dv_out"] = (jit("dv_out"), (k, q, do, res.gate_tokens))
    grads_kernel = cfg.runs_chunk_grads(c.K, c.V, n)
    merged = cfg.merges_adjoints(c.K, c.V, n)
    if not (merged or grads_kernel):
        output_args = (q, do, res.h, k, st["vnew"], res.gate_tokens)
        with_dv_out = res.v_new is not None and cfg.output_dv
        out["bwd_output"] = (
            jit("output", with_dv_out=with_dv_out, dk_dtype=grad_dtype),
            output_args,
        )
    out["bwd_state_pass"] = (
        stage_fn(kern, "bwd_state_pass", cfg),
        (res.a, k, beta, st["dv_out"], q, do, dht, gam, fdec, gam_tok, res.w, res.gate_tokens),
    )
    # what the token-chunk kernels (merged adjoint, per-chunk gradients) read first
    chunk_args = (q, do, res.h, st["h_mid"], st["dh_il"], k, st["vnew"], st["dvnew"])
    if grads_kernel:
        out["bwd_chunk_grads"] = (
            jit("chunk_grads"),
            (*chunk_args, res.a, v, beta, res.gate_tokens, res.gate_substeps),
        )
    elif cfg.wy_fused:
        h_il = kernel_backward.interleaved_states(res.h, st["h_mid"], n)
        out["bwd_wy_fused"] = (
            jit("wy_fused"),
            (
                res.a,
                k,
                v,
                beta,
                h_il,
                st["dh_il"],
                st["vnew"],
                st["dvnew"],
                st["dk_out"],
                res.gate_substeps,
            ),
        )
    elif merged:
        out["bwd_merged"] = (
            jit("merged", out_dtype=grad_dtype),
            (*chunk_args, res.gate_tokens, gam, fdec),
        )
    if not (cfg.wy_fused or merged or grads_kernel):
        out["bwd_state_adjoint"] = (
            jit("state_adjoint", out_dtype=grad_dtype),
            (res.h, st["h_mid"], st["dh_il"], st["vnew"], st["dvnew"], st["dk_out"], k, gam, fdec),
        )
    if not (cfg.wy_fused or grads_kernel):
        out["bwd_wy"] = (
            jit("wy"),
            (res.a, k, v, beta, st["dw"], st["dvnew"], st["dkp"], res.gate_substeps, st["dG_st"]),
        )
    out["bwd_total"] = (whole, (q, k, v, beta, res, do))
    return out


# the previous backward (before 2026-11-23 later): recompute stage, output adjoint at 8 warps,
# the fused stage 3 + 4 kernel at 8 warps
OLD_BACKWARD = kernel_backward.BackwardConfig(save_states=False, wy_fused=True, output_warps=8)

# fields that change the rounding, not just the speed: their variants are timed for the record
# but never chosen by --tune / --bwd-tune
PRECISION_FIELDS = {"state_tf32", "state_stored_wu"}
BWD_PRECISION_FIELDS = {"state_dots", "state_dv_out_dots", "state_stored_w"}


def fastest(variants: list[dict], times: dict[int, float], precision: set[str]) -> dict:
    """The fields of the fastest timed variant (``times``: index -> ms) that sets none of the
    ``precision`` fields; ``{}`` if none."""
    usable = {i: t for i, t in times.items() if not precision & variants[i].keys()}
    return variants[min(usable, key=usable.get)] if usable else {}


# stage -> variants (BackwardConfig fields); the first has the default tiles. The tile variants
# of the state passes run unsplit (state_split=1) and the split ones with the default tiles, so
# that the automatic split (the default) is compared against both.
BWD_TUNE_SPACE = {
    "bwd_state_pass": [
        dict(state_block_v=bv, state_warps=w, state_stages=s, state_split=1)
        for bv, w, s in ((32, 4, 3), (32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 2, 3))
    ]
    + [dict(state_split=p) for p in (2, 4, 8)]
    + [dict(state_loop=loop) for loop in ("token", "sub")]
    + [dict(state_read_masked=flag) for flag in (True, False)]
    + [dict(state_dots=d) for d in ("input", "tf32")]
    + [dict(state_dv_out_dots="input"), dict(state_dots="tf32", state_read_masked=False)]
    + [dict(state_dots="tf32", state_dv_out_dots="input", state_read_masked=False)]
    + [dict(state_stored_w=True)],
    "bwd_state_adjoint": [dict(adjoint_warps=w) for w in (8, 4, 2)],
    "bwd_wy": [
        dict(wy_warps=w, wy_block=b, wy_dots=d, wy_stages=s)
        for w, b, d, s in (
            (4, 128, "input", 1),
            (4, 64, "input", 1),
            (8, 128, "input", 1),
            (8, 64, "input", 1),
            (2, 128, "input", 1),
            (4, 128, "tf32", 1),
            (4, 128, "split", 1),
        )
    ]
    + [dict(wy_chunks=c, wy_stages=s) for c, s in ((4, 1), (4, 2), (2, 2))],
    "bwd_output": [dict(output_warps=w) for w in (8, 4, 2)],
    "bwd_dv_out": [dict(dv_block_v=bv, dv_warps=w) for bv, w in ((64, 4), (128, 4))],
}
STAGE_KERNEL = {
    "bwd_state_pass": "state_pass",
    "bwd_state_adjoint": "state_adjoint",
    "bwd_wy": "wy",
    "bwd_output": "output",
    "bwd_dv_out": "dv_out",
}


def bwd_tune(
    cases: list[Case], repeats: int, log: Callable, only: list[str] | None = None
) -> tuple[dict, list[dict]]:
    """Time every backward stage variant alone, side by side, on the same stage inputs (plus the
    previous fused stage 3 + 4 kernel, the output adjoint computing ``dv_out``, the recompute
    stage, the merged output + state adjoint and the per-chunk gradient kernel at several launch
    parameters); return the fastest fields and all records. Variants that fail to compile are
    reported and skipped."""
    records = []
    totals: dict[str, dict[int, float]] = {s: {} for s in BWD_TUNE_SPACE}
    base = kernel_backward.BackwardConfig()
    for c in cases:
        inputs = make_inputs(c, seed=1)
        base_fns = backward_stage_fns(c, inputs, base)
        # the stages the default merges or leaves out (dv_out, the output and state adjoints)
        separate = dataclasses.replace(base, merged_adjoint=False, state_fused_dv_out=False)
        base_fns = backward_stage_fns(c, inputs, separate) | base_fns
        fns, labels = {}, {}
        for stage, variants in BWD_TUNE_SPACE.items():
            if only and stage not in only:
                continue
            args = base_fns[stage][1]
            for i, fields in enumerate(variants):
                try:
                    cfg = dataclasses.replace(base, **fields)
                    kern = kernel_backward.stage_kernels(
                        cfg, num_householder=c.n, scale=c.K**-0.5, interpret=default_interpret()
                    )
                    f = stage_fn(kern, stage, cfg)
                    jax.block_until_ready(f(*args))
                    fns[(stage, i)] = lambda f=f, a=args: f(*a)
                    labels[(stage, i)] = fields
                except Exception as err:
                    log(f"bwd tune {stage} {fields} failed: {err!r:.300}")
        extra = {
            ("bwd_wy_fused", 0): (dict(wy_fused=True), "bwd_wy_fused"),
            ("bwd_output_dv", 0): (dict(output_dv=True, state_fused_dv_out=False), "bwd_output"),
            ("bwd_recompute", 0): (dict(save_states=False), "bwd_recompute"),
        }
        merged_launches = ((8, 1, False), (4, 1, False), (8, 2, False), (4, 2, False))
        merged_launches += ((4, 1, True), (8, 1, True))  # merged_loop: from n_h = 3 on
        for i, (warps, stages, loop) in enumerate(merged_launches):
            merged = dict(merged_adjoint=True, merged_warps=warps, merged_stages=stages)
            extra[("bwd_merged", i)] = ({**merged, "merged_loop": loop}, "bwd_merged")
        for i, (warps, block) in enumerate(((8, 64), (4, 64), (8, 128), (4, 128))):
            grads = dict(chunk_grads=True, chunk_grads_warps=warps, chunk_grads_block=block)
            extra[("bwd_chunk_grads", i)] = (grads, "bwd_chunk_grads")
        for key, (fields, stage) in extra.items():
            if only and key[0] not in only:
                continue
            try:
                f, a = backward_stage_fns(c, inputs, dataclasses.replace(base, **fields))[stage]
                fns[key] = lambda f=f, a=a: f(*a)
                labels[key] = fields
            except Exception as err:
                log(f"bwd tune {key} failed: {err!r:.300}")
        times = time_round_robin(fns, [()], repeats, iters_for(c))
        for (stage, i), t in times.items():
            if stage in totals:
                totals[stage][i] = totals[stage].get(i, 0.0) + t
            rec = dict(kind="bwd_tune", case=c.label, stage=stage, **labels[(stage, i)], ms=t)
            records.append(rec)
            log(json.dumps(rec))
    best = {}
    for stage, by_variant in totals.items():
        best.update(fastest(BWD_TUNE_SPACE[stage], by_variant, BWD_PRECISION_FIELDS))
    return best, records


def memory_report(log: Callable, with_chunked: bool = True) -> list[dict]:
    """Compiled memory analysis of one layer's forward+backward (grad of ``<o, do>`` w.r.t.
    q, k, v, beta) at B=4, T=4096, H=8, K=V=128, n_h=2, bf16: pallas (vs chunked)."""
    c = Case(4, 4096, 8, 128, 128, 2, False)
    x = make_inputs(c, seed=0)
    args = tuple(x[n] for n in OP_ARGS)
    records = []
    impls = [("pallas", dp_pallas.forward)]
    if with_chunked:
        impls.append(("chunked", chunked.forward))
    for name, impl in impls:
        _, fb = op_fns(impl, c)
        m = fb.lower(*args).compile().memory_analysis()
        rec = dict(
            kind="memory",
            case=c.label,
            impl=name,
            temp_mb=m.temp_size_in_bytes / 2**20,
            argument_mb=m.argument_size_in_bytes / 2**20,
            output_mb=m.output_size_in_bytes / 2**20,
            alias_mb=m.alias_size_in_bytes / 2**20,
        )
        rec["peak_mb"] = rec["temp_mb"] + rec["argument_mb"] + rec["output_mb"] - rec["alias_mb"]
        records.append(rec)
        log(json.dumps(rec))
    return records


TUNE_SPACE = {  # variants that compile without register spills for K = V = 128 (ptxas, sm_90)
    "prepare": [dict(prep_warps=w) for w in (4, 8, 2)],
    "state_pass": [
        dict(state_block_v=bv, state_warps=w, state_stages=s, state_split=1)
        for bv, w, s in ((16, 4, 2), (32, 4, 2), (32, 4, 3), (32, 8, 2), (64, 8, 2))
    ]
    + [dict(state_block_v=32, state_warps=4, state_stages=2, state_tf32=True, state_split=1)]
    + [dict(state_split=p) for p in (2, 4, 8)]
    + [dict(state_stored_wu=True), dict(state_loop="token"), dict(state_loop="sub")]
    + [dict(state_loop="sub", state_stages=2)],
    "output": [
        dict(out_block_v=bv, out_warps=w) for bv, w in ((64, 4), (64, 8), (128, 8), (64, 2))
    ],
}


def tune(
    cases: list[Case], repeats: int, log: Callable, only: list[str] | None = None
) -> tuple[dict, list[dict]]:
    """Time every stage variant side by side; return the fastest fields and all records."""
    records = []
    totals: dict[str, dict[int, float]] = {s: {} for s in TUNE_SPACE}
    for c in cases:
        inputs = make_inputs(c, seed=1)
        for stage, variants in TUNE_SPACE.items():
            if only and stage not in only:
                continue
            fns = {}
            for i, fields in enumerate(variants):
                cfg = dataclasses.replace(kernels.KernelConfig(), **fields)
                try:
                    f, args = stage_fns(c, cfg, inputs)[stage]
                    fns[i] = lambda f=f, args=args: f(*args)
                except Exception as err:  # a variant that fails to compile is reported
                    log(f"tune {stage} {fields} failed: {err!r:.300}")
            times = time_round_robin({i: f for i, f in fns.items()}, [()], repeats, iters_for(c))
            for i, t in times.items():
                totals[stage][i] = totals[stage].get(i, 0.0) + t
                rec = dict(kind="tune", case=c.label, stage=stage, **variants[i], ms=t)
                records.append(rec)
                log(json.dumps(rec))
    best = {}
    for stage, by_variant in totals.items():
        best.update(fastest(TUNE_SPACE[stage], by_variant, PRECISION_FIELDS))
    return best, records


def check(fwd_fns: dict[str, Callable], args: tuple) -> dict:
    """Relative RMSE of the timed Pallas forward against the timed chunked one (fp32 inside,
    output rounded to bf16), on the same inputs; a sanity check, the tests hold the real bounds."""
    o = fwd_fns["pallas"](*args).astype(jnp.float32)
    ref = fwd_fns["chunked"](*args).astype(jnp.float32)
    err = float(jnp.sqrt(jnp.mean((o - ref) ** 2)) / jnp.sqrt(jnp.mean(ref**2)))
    return dict(rel_rmse=err, finite=bool(jnp.isfinite(o).all()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test, CPU ok)")
    ap.add_argument("--repeats", type=int, default=7, help="timed batches per candidate")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--no-chunked", action="store_true", help="skip the chunked JAX path")
    ap.add_argument("--stages", action="store_true", help="also time each Pallas kernel alone")
    ap.add_argument(
        "--bwd-stages", action="store_true", help="also time each backward kernel alone"
    )
    ap.add_argument(
        "--bwd-tune",
        action="store_true",
        help="time backward stage variants alone first (on the --case shapes, else the "
        "n_h = 1, 2 targets), use the best",
    )
    ap.add_argument(
        "--bwd-old",
        action="store_true",
        help="also time the op with the previous backward (recompute + fused stage 3 + 4)",
    )
    ap.add_argument(
        "--bwd-variant",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,FIELD=VALUE]",
        help="also time the op's forward+backward with these BackwardConfig fields changed "
        "(repeatable; e.g. grad_dtype=input), side by side with the default",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,FIELD=VALUE]",
        help="also time the op's forward and forward+backward with these KernelConfig (forward "
        "kernels) and BackwardConfig fields changed (repeatable; e.g. "
        "state_stored_wu=True,state_stored_w=True), side by side with the default",
    )
    ap.add_argument(
        "--memory", action="store_true", help="compiled memory of fwd+bwd (pallas vs chunked)"
    )
    ap.add_argument(
        "--tune-stages",
        nargs="+",
        metavar="STAGE",
        help="with --tune / --bwd-tune: only these stages' variants (e.g. state_pass "
        "bwd_state_pass; default: all)",
    )
    ap.add_argument(
        "--tune",
        action="store_true",
        help="sweep forward kernel tiles first (on the --case shapes, else the n_h = 1, 3 "
        "targets), use the best",
    )
    ap.add_argument(
        "--state_split",
        type=int,
        default=None,
        help="sequence split of the forward and backward state passes (KernelConfig / "
        "BackwardConfig.state_split: up to this many pieces walked in parallel; 1 = never; "
        "unset = the default, automatic where B*H*V/BV programs are few)",
    )
    ap.add_argument("--peers", action="store_true", help="merge peers_*.json from --out")
    ap.add_argument("--only", type=int, nargs="*", help="indices of cases to run")
    ap.add_argument(
        "--case",
        action="append",
        type=parse_case,
        metavar="B,T,H,K,V,N_H[,gated]",
        help="time this shape instead of the built-in cases (repeatable), e.g. the paper's "
        "state tracking: --case 2048,129,8,32,32,2",
    )
    ap.add_argument(
        "--bwd-cases", type=int, nargs="*", help="indices of cases that also time fwd+bwd (all)"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite bench_op.md from --out's JSON files"
    )
    ap.add_argument(
        "--resources",
        action="store_true",
        help="no GPU needed: compile each kernel for sm_90 with the pip `triton` package and\n"
        "report registers / spills / shared memory (then exit)",
    )
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        report_only(args.out)
        return
    log_path = os.path.join(args.out, "bench_op.log")

    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(log_path, "a") as fh:
            fh.write(msg + "\n")

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    cases = args.case or (QUICK_CASES if args.quick else FULL_CASES)
    if args.only:
        cases = [cases[i] for i in args.only]
    records: list[dict] = []
    config = kernels.KernelConfig()
    if args.tune:
        tune_cases = cases[:1] if args.quick else [FULL_CASES[0], FULL_CASES[2]]
        tune_cases = [kernel_case(c) for c in (args.case or tune_cases)]
        best, tune_records = tune(tune_cases, args.repeats, log, args.tune_stages)
        records += tune_records
        config = dataclasses.replace(config, **best)
        log(f"tuned config: {config}")
        save(args, dev.device_kind, config, records, echo=False)
    if args.state_split:
        config = dataclasses.replace(config, state_split=args.state_split)
    if args.resources:
        records += resources(cases, config, args.out, log, args.state_split)
        with open(os.path.join(args.out, "resources.json"), "w") as fh:
            json.dump(records, fh, indent=1)
        return
    if args.tune:  # the op uses the tuned config (else its own per-head-dim choice)
        dp_pallas.config_for = lambda key_dim, value_dim, _c=config: _c
    elif args.state_split:
        dp_pallas.config_for = with_state_split(dp_pallas.config_for, args.state_split)
    bconfig = kernel_backward.BackwardConfig()
    if args.bwd_tune:
        tune_cases = cases[:1] if args.quick else [FULL_CASES[0], FULL_CASES[1]]
        tune_cases = [kernel_case(c) for c in (args.case or tune_cases)]
        best, tune_records = bwd_tune(tune_cases, args.repeats, log, args.tune_stages)
        records += tune_records
        bconfig = dataclasses.replace(bconfig, **best)
        log(f"tuned backward config: {bconfig}")
        save(args, dev.device_kind, config, records, echo=False)
    backward_config_for = dp_pallas.backward_config_for  # wide heads get wide tiles
    if args.bwd_tune:
        backward_config_for = lambda key_dim, value_dim, _c=bconfig: _c  # noqa: E731
    if args.state_split:
        backward_config_for = with_state_split(backward_config_for, args.state_split)
    dp_pallas.backward_config_for = backward_config_for
    if args.memory:
        records += memory_report(log, with_chunked=not args.no_chunked)
        save(args, dev.device_kind, config, records, echo=False)

    impls = {"pallas": dp_pallas.forward}
    if args.bwd_old:
        impls["pallas_old_bwd"] = dp_pallas.forward  # traced with OLD_BACKWARD (below)
    variants = {f"pallas[{v}]": config_fields(v) for v in args.bwd_variant}
    impls |= dict.fromkeys(variants, dp_pallas.forward)  # fwd+bwd only, traced with the fields
    forward_config_for = dp_pallas.config_for
    fwd_variants = {f"pallas[fwd:{v}]": split_fields(v) for v in args.variant}
    impls |= dict.fromkeys(fwd_variants, dp_pallas.forward)  # fwd and fwd+bwd
    if not args.no_chunked:
        impls["chunked"] = chunked.forward
    for index, c in enumerate(cases):
        with_bwd = not args.no_bwd and (args.bwd_cases is None or index in args.bwd_cases)
        inputs = [make_inputs(c, seed=s) for s in range(2)]
        arg_sets = [tuple(x[n] for n in OP_ARGS) for x in inputs]
        case_impls = dict(impls)
        if c.reference:
            case_impls["reference"] = reference.forward
        fwd_fns, bwd_fns, compiles = {}, {}, {}
        for name, impl in case_impls.items():
            bwd_only = name == "pallas_old_bwd" or name in variants
            if bwd_only and not with_bwd:  # same forward kernels; timed for fwd+bwd only
                continue
            if name == "pallas_old_bwd":
                dp_pallas.backward_config_for = lambda key_dim, value_dim: OLD_BACKWARD
            elif name in variants:
                dp_pallas.backward_config_for = lambda key_dim, value_dim, f=variants[name]: (
                    dataclasses.replace(backward_config_for(key_dim, value_dim), **f)
                )
            elif name in fwd_variants:
                fwd_fields, bwd_fields = fwd_variants[name]
                dp_pallas.config_for = lambda key_dim, value_dim, f=fwd_fields: dataclasses.replace(
                    forward_config_for(key_dim, value_dim), **f
                )
                dp_pallas.backward_config_for = lambda key_dim, value_dim, f=bwd_fields: (
                    dataclasses.replace(backward_config_for(key_dim, value_dim), **f)
                )
            f, fb = op_fns(impl, c)
            try:
                if not bwd_only:
                    fwd_fns[name], compiles[(name, "fwd")] = compile_time(f, arg_sets[0])
                if with_bwd:
                    bwd_fns[name], compiles[(name, "fwdbwd")] = compile_time(fb, arg_sets[0])
            except Exception as err:
                log(f"{c.label} {name} failed: {err!r:.500}")
            dp_pallas.backward_config_for = backward_config_for
            dp_pallas.config_for = forward_config_for
        iters = iters_for(c)
        for mode, fns in (("fwd", fwd_fns), ("fwdbwd", bwd_fns)):
            if not fns:
                continue
            times = time_round_robin(fns, arg_sets, args.repeats, iters)
            for name, ms in times.items():
                rec = dict(
                    kind="op",
                    case=c.label,
                    **dataclasses.asdict(c),
                    impl=name,
                    mode=mode,
                    ms=ms,
                    compile_s=compiles[(name, mode)],
                )
                records.append(rec)
                log(json.dumps(rec))
        if args.bwd_stages or args.stages:
            kc = kernel_case(c)  # the kernels alone take the padded layout the op builds
            k_inputs = inputs[0] if kc == c else make_inputs(kc, seed=0)
            if kc != c:
                log(f"stages of {c.label} timed at the kernels' padded shape {kc.label}")
        if args.bwd_stages:
            stages = backward_stage_fns(kc, k_inputs, backward_config_for(c.K, c.V))
            records += time_stages(c, stages, args.repeats, iters, log)
        if args.stages:
            stages = stage_fns(kc, dp_pallas.config_for(c.K, c.V), k_inputs)
            records += time_stages(c, stages, args.repeats, iters, log)
        fl = floor_ms(c)
        records.append(dict(kind="floor", case=c.label, **dataclasses.asdict(c), **fl))
        log(json.dumps(records[-1]))
        if "pallas" in fwd_fns and "chunked" in fwd_fns:
            records.append(dict(kind="check", case=c.label, **check(fwd_fns, arg_sets[1])))
            log(json.dumps(records[-1]))
        save(args, dev.device_kind, config, records, echo=False)
    save(args, dev.device_kind, config, records, echo=True)


def save(args, device: str, config, records: list[dict], *, echo: bool) -> None:
    """Write bench_op.json and bench_op.md (called after every case, so a cut-off run keeps
    what it measured)."""
    peers = []
    if args.peers:
        for path in sorted(glob.glob(os.path.join(args.out, "peers_*.json"))):
            with open(path) as fh:
                peers += json.load(fh)
    with open(os.path.join(args.out, "bench_op.json"), "w") as fh:
        json.dump(
            dict(device=device, config=dataclasses.asdict(config), records=records, peers=peers),
            fh,
            indent=1,
        )
    table = markdown(records, peers, device, config)
    with open(os.path.join(args.out, "bench_op.md"), "w") as fh:
        fh.write(table)
    if echo:
        print(table)


def resources(
    cases: list[Case], config: kernels.KernelConfig, out: str, log: Callable, split: int | None
) -> list:
    """Registers, spill stack and shared memory of each kernel for sm_90, without a GPU.

    Lowers the forward for an abstract H100 (as the lowering tests do), captures each kernel's
    Triton IR (through a private JAX hook) and compiles it with the ``triton`` package's own
    compiler and ptxas (``pip install triton``; not a project dependency). The pip Triton need not
    match the Triton inside jaxlib exactly, so the numbers are a close estimate.
    """
    import subprocess

    import triton
    from jax._src.pallas.triton import pallas_call_registration as registration
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    from triton.backends.compiler import GPUTarget

    modules: list[str] = []
    lower_module = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = lower_module(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    launch = {
        "dp_prepare": (config.prep_warps, config.prep_stages),
        "dp_state_pass": (config.state_warps, config.state_stages),
        "dp_state_transfer": (config.state_warps, config.state_stages),
        "dp_output": (config.out_warps, config.out_stages),
    }
    bconf = dp_pallas.backward_config_for(cases[0].K, cases[0].V)
    if split:
        bconf = dataclasses.replace(bconf, state_split=split)
    launch |= {
        "dp_bwd_recompute": (bconf.recompute_warps, bconf.recompute_stages),
        "dp_bwd_state_pass": (bconf.state_warps, bconf.state_stages),
        "dp_bwd_state_transfer": (bconf.state_warps, bconf.state_stages),
        "dp_bwd_output": (bconf.output_warps, bconf.output_stages),
        "dp_bwd_state_adjoint": (bconf.adjoint_warps, bconf.adjoint_stages),
        "dp_bwd_dv_out": (bconf.dv_warps, bconf.dv_stages),
        "dp_bwd_chunk_adjoint": (bconf.merged_warps, bconf.merged_stages),
        "dp_bwd_chunk_grads": (bconf.chunk_grads_warps, bconf.chunk_grads_stages),
        "dp_bwd_wy": (bconf.wy_warps, bconf.wy_stages),
        "dp_bwd_wy_fused": (bconf.fused_warps, 1),
    }
    device = AbstractDevice("NVIDIA H100 80GB HBM3", 1, "cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    records = []
    try:
        for c in cases:
            modules.clear()
            x = make_inputs(c, seed=0)
            spec = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
            args = [spec(x[n]) for n in ("q", "k", "v", "beta", "g")]

            def fn(*a, c=c):
                o, final, res = kernels.forward(
                    *a,
                    None,
                    None,
                    num_householder=c.n,
                    scale=0.1,
                    interpret=False,
                    config=config,
                    save_states=True,
                    save_mid_states=bconf.reads_mid_states(c.K, c.V, c.n),
                )
                grads = kernel_backward.backward(
                    *a[:4],
                    res,
                    o,
                    final,
                    num_householder=c.n,
                    scale=0.1,
                    interpret=False,
                    config=bconf,
                )
                return o, final, grads

            with jax.sharding.use_abstract_mesh(mesh):
                jax.jit(fn).trace(*args).lower()
            for text in modules:
                name = text.split("tt.func public @")[1].split("(")[0]
                path = os.path.join(out, f"{name}.ttir")
                with open(path, "w") as fh:
                    fh.write(text)
                warps, stages = launch[name]
                kernel = triton.compile(
                    path,
                    target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": warps, "num_stages": stages},
                )
                cubin = path.replace(".ttir", ".cubin")
                with open(cubin, "wb") as fh:
                    fh.write(kernel.asm["cubin"])
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True
                ).stdout
                field = lambda key, u=usage: int(u.split(f"{key}:")[1].split()[0])
                rec = dict(
                    kind="resources",
                    case=c.label,
                    kernel=name,
                    warps=warps,
                    stages=stages,
                    regs=field("REG"),
                    spill_stack=field("STACK"),
                    shared_bytes=kernel.metadata.shared,
                )
                records.append(rec)
                log(json.dumps(rec))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower_module
    return records


def report_only(out: str) -> None:
    """Rebuild the markdown from ``bench_op.json`` plus any ``peers_*.json`` in ``out``."""
    with open(os.path.join(out, "bench_op.json")) as fh:
        data = json.load(fh)
    peers = []
    for path in sorted(glob.glob(os.path.join(out, "peers_*.json"))):
        with open(path) as fh:
            peers += json.load(fh)
    config = kernels.KernelConfig(**data["config"])
    table = markdown(data["records"], peers, data["device"], config)
    with open(os.path.join(out, "bench_op.md"), "w") as fh:
        fh.write(table)
    print(table)


def markdown(records: list[dict], peers: list[dict], device: str, config) -> str:
    lines = [f"Device: {device}. Kernel config: {dataclasses.asdict(config)}", ""]
    lines += [
        "| case | impl | fwd ms | fwd+bwd ms | compile fwd / fwd+bwd s |",
        "|---|---|---|---|---|",
    ]
    ops = [r for r in records if r["kind"] == "op"]
    seen = []
    for r in ops:
        key = (r["case"], r["impl"])
        if key in seen:
            continue
        seen.append(key)
        fwd = next((x for x in ops if (x["case"], x["impl"], x["mode"]) == (*key, "fwd")), None)
        bwd = next((x for x in ops if (x["case"], x["impl"], x["mode"]) == (*key, "fwdbwd")), None)
        fmt = lambda x, k, f="{:.3f}": f.format(x[k]) if x else "—"
        lines.append(
            f"| {key[0]} | {key[1]} | {fmt(fwd, 'ms')} | {fmt(bwd, 'ms')} | "
            f"{fmt(fwd, 'compile_s', '{:.1f}')} / {fmt(bwd, 'compile_s', '{:.1f}')} |"
        )
    for p in peers:
        gate = "gated" if p["gated"] else "ungated"
        label = f"B={p['B']} T={p['T']} H={p['H']} K={p['D']} V={p['D']} n_h={p['n']} {gate}"
        lines.append(f"| {label} | {p['peer']} | {p['fwd_ms']:.3f} | {p['fwdbwd_ms']:.3f} | — |")
    stages = [r for r in records if r["kind"] == "stage"]
    if stages:
        names = list(dict.fromkeys(r["stage"] for r in stages))
        lines += ["", "| case | " + " | ".join(f"{x} ms" for x in names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for case in dict.fromkeys(r["case"] for r in stages):
            ms = {r["stage"]: r["ms"] for r in stages if r["case"] == case}
            cells = " | ".join(f"{ms[x]:.3f}" if x in ms else "—" for x in names)
            lines.append(f"| {case} | {cells} |")
        if any("compile_s" in r for r in stages):
            lines += ["", "| case | " + " | ".join(f"{x} compile s" for x in names) + " |"]
            lines.append("|---" * (len(names) + 1) + "|")
            for case in dict.fromkeys(r["case"] for r in stages):
                sec = {r["stage"]: r.get("compile_s") for r in stages if r["case"] == case}
                cells = " | ".join("—" if sec.get(x) is None else f"{sec[x]:.2f}" for x in names)
                lines.append(f"| {case} | {cells} |")
    mem = [r for r in records if r["kind"] == "memory"]
    if mem:
        lines += ["", "| memory case | impl | peak MB | temp MB | args MB | out MB |"]
        lines.append("|---|---|---|---|---|---|")
        for r in mem:
            lines.append(
                f"| {r['case']} | {r['impl']} | {r['peak_mb']:.0f} | {r['temp_mb']:.0f} | "
                f"{r['argument_mb']:.0f} | {r['output_mb']:.0f} |"
            )
    floors = [r for r in records if r["kind"] == "floor"]
    if floors:
        lines += [
            "",
            "| case | GFLOP | MB | FLOP floor ms | byte floor ms |",
            "|---|---|---|---|---|",
        ]
        for r in floors:
            lines.append(
                f"| {r['case']} | {r['gflop']:.3g} | {r['mbytes']:.3g} | "
                f"{r['flop_ms']:.3f} | {r['byte_ms']:.3f} |"
            )
    btunes = [r for r in records if r["kind"] == "bwd_tune"]
    if btunes:
        lines += ["", "| bwd tune case | stage | variant | ms |", "|---|---|---|---|"]
        for r in btunes:
            variant = {k: v for k, v in r.items() if k not in ("kind", "case", "stage", "ms")}
            lines.append(f"| {r['case']} | {r['stage']} | {variant} | {r['ms']:.3f} |")
    tunes = [r for r in records if r["kind"] == "tune"]
    if tunes:
        lines += ["", "| tune case | stage | variant | ms |", "|---|---|---|---|"]
        for r in tunes:
            variant = {k: v for k, v in r.items() if k not in ("kind", "case", "stage", "ms")}
            lines.append(f"| {r['case']} | {r['stage']} | {variant} | {r['ms']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
