"""Where a training step's time goes: compile time, step time, and the device ops that fill it.

Builds the state-tracking model (``dpjax.nn.presets.state_tracking``, SPEC §5.3) or a named LM
preset, its jitted train step (the same ``dpjax.train`` code the experiments run) and a random
batch, then

1. lowers and compiles the train step (and the eval step at ``--eval_length`` unless 0), timing
   each;
2. times ``--steps`` train steps (median of ``--repeats`` batches, each closed by
   ``block_until_ready``);
3. records a few more steps with ``jax.profiler`` (a Perfetto trace) and sums the device time of
   every op name (Triton kernels, XLA fusions, copies), printing the top ``--top``, the share of
   the DeltaProduct Pallas kernels (``dp_*``) and the MFU (model FLOPs, ``dpjax.train.flops``,
   over the device's dense bf16 peak).

Each listed XLA fusion is traced to what it is made of (``hlo_sources``: the JAX primitives and
Python lines its instructions came from, read from the compiled HLO), and every device op is
charged to the source file most of it came from (``time_by_source``: the whole step, not only the
top ops; Pallas kernels by their names).

Writes ``profile_step.json`` (all of the above, and the ``XLA_FLAGS`` it ran under, e.g.
``--xla_gpu_enable_triton_gemm=false`` to compare cuBLAS with XLA's Triton GEMMs), the compiled
train step's HLO (``train_step.hlo.txt.gz``) and the trace folder to ``--out``.

Examples::

    python experiments/profile_step.py --help
    python experiments/profile_step.py --batch_size 2048 --k 128 --num_householder 2 --impl pallas
    python experiments/profile_step.py --preset dp2-392m --batch_size 8 --k 4095 --eval_length 0
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from cli_types import str2bool
from flax import nnx
from hlo_sources import fusion_sources, home_file, op_key

from dpjax.nn import DeltaProductLM
from dpjax.nn.conv import CONV_IMPLS
from dpjax.nn.norms import NORM_IMPLS
from dpjax.nn.presets import get_preset, state_tracking
from dpjax.train import mesh as mesh_lib
from dpjax.train.flops import device_peak_flops, flops_per_token
from dpjax.train.gemm import GEMM_CHOICES, gemm_compiler_options
from dpjax.train.lm_step import REMAT_POLICIES, lm_token_fn
from dpjax.train.loop import TrainConfig, init_train_state, make_steps, op_batch_parallel
from dpjax.train.optimizer import OptimizerConfig
from dpjax.train.step import logits_token_fn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=None, help="LM preset name instead of the ST model")
    p.add_argument("--vocab_size", type=int, default=13, help="ST model vocabulary (S3: 13)")
    p.add_argument("--num_householder", type=int, default=2, help="ST model n_h")
    p.add_argument("--allow_neg_eigval", type=str2bool, default=True, help="ST model beta range")
    p.add_argument("--n_layers", type=int, default=1, help="ST model layers")
    p.add_argument("--impl", default="pallas", help="op implementation (pallas/chunked/auto)")
    p.add_argument(
        "--conv_backward",
        default="auto",
        choices=CONV_IMPLS,
        help="backward of a preset's short convolutions (dpjax.nn.conv; auto: the Pallas kernel "
        "on a GPU, autodiff elsewhere; xla: autodiff; pallas: the kernel)",
    )
    p.add_argument(
        "--conv_forward",
        default="auto",
        choices=CONV_IMPLS,
        help="forward of a preset's short convolutions (auto: the one-pass Pallas kernel on a "
        "GPU, XLA elsewhere; xla: XLA's fusion; pallas: the kernel)",
    )
    p.add_argument(
        "--norm_impl",
        default="xla",
        choices=NORM_IMPLS,
        help="a preset's RMSNorms (dpjax.nn.norms; xla: XLA's fusions; pallas: the Pallas kernels; "
        "auto: the kernels on a GPU)",
    )
    p.add_argument(
        "--gemm",
        default="auto",
        choices=GEMM_CHOICES,
        help="GEMM emitter of the dense layers (dpjax.train.gemm; auto: cuBLAS on a GPU where a "
        "dense kernel has a side not a multiple of 8, else XLA's Triton GEMMs; xla; cublas)",
    )
    p.add_argument(
        "--param_dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="parameter dtype (default: bf16 for the ST model, as the paper; fp32 master "
        "parameters for a preset, as experiments/language_model.py); compute is bf16",
    )
    p.add_argument(
        "--remat",
        choices=sorted(REMAT_POLICIES),
        default="block",
        help="preset only: per-block rematerialisation (experiments/language_model.py --remat)",
    )
    p.add_argument(
        "--head_block", type=int, default=1024, help="preset only: positions per head block"
    )
    p.add_argument("--batch_size", type=int, default=2048, help="rows per step")
    p.add_argument("--k", type=int, default=128, help="sequence length minus the BOS token")
    p.add_argument(
        "--eval_length",
        type=int,
        default=512,
        help="eval step length minus BOS (0: no eval step)",
    )
    p.add_argument("--eval_batch_size", type=int, default=256, help="eval step rows")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed batch")
    p.add_argument("--repeats", type=int, default=5, help="timed batches (median reported)")
    p.add_argument("--trace_steps", type=int, default=3, help="steps recorded by the profiler")
    p.add_argument(
        "--top", type=int, default=25, help="device ops (and source files) listed; JSON: all"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "profile_out"), help="output folder")
    return p


def model_config(args: argparse.Namespace):
    if args.preset:
        param_dtype = "bfloat16" if args.param_dtype == "bf16" else "float32"
        return get_preset(
            args.preset,
            impl=args.impl,
            conv_forward=args.conv_forward,
            conv_backward=args.conv_backward,
            norm_impl=args.norm_impl,
            dtype="bfloat16",
            param_dtype=param_dtype,
            max_position_embeddings=args.k + 1,
        )
    dtype = "float32" if args.param_dtype == "fp32" else "bfloat16"
    return state_tracking(
        args.vocab_size,
        args.num_householder,
        args.allow_neg_eigval,
        num_layers=args.n_layers,
        impl=args.impl,
        dtype=dtype,
        param_dtype=dtype,
    )


def random_batch(rng: np.random.Generator, vocab: int, rows: int, length: int) -> dict:
    ids = rng.integers(0, vocab, size=(rows, length), dtype=np.int32)
    return {"input_ids": ids, "labels": np.roll(ids, -1, axis=1)}


def device_op_times(trace_dir: str) -> tuple[dict[str, float], float]:
    """``{op name: total device µs}`` over the Perfetto trace's device (GPU) tracks and the
    total; falls back to every complete event when the trace has no GPU track (CPU runs)."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pid_names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu_pids = {p for p, n in pid_names.items() if "GPU" in n or "/device:" in n}
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or (gpu_pids and e.get("pid") not in gpu_pids):
            continue
        if e.get("name", "").startswith("$"):  # Python frames (host tracks of a CPU run)
            continue
        totals[e.get("name", "?")] += float(e.get("dur", 0.0))
    return dict(totals), sum(totals.values())


def op_home(name: str, sources: dict[str, list[str]]) -> str:
    """Where a device op's time is charged: the DeltaProduct kernels (``dp_*``) and the short
    convolution's kernels (``short_conv_*``) by name, an XLA fusion by the source file most of
    its instructions came from, else ``"(no source: <kind>)"`` with the op name's leading word."""
    if name.startswith("dp_"):
        return "pallas_kernels (DeltaProduct op)"
    if name.startswith("short_conv_"):
        return "pallas_kernels/short_conv.py"
    home = home_file(sources.get(op_key(name), []))
    if home is not None:
        return home
    return f"(no source: {name.split('_')[0].split('.')[0]})"


def time_by_source(per_step: dict[str, float], sources: dict[str, list[str]]) -> list:
    """``[(home, ms per step, op count), ...]`` (``op_home``), largest first."""
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for name, t in per_step.items():
        home = op_home(name, sources)
        ms[home] += t
        count[home] += 1
    return sorted(((h, ms[h], count[h]) for h in ms), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    mcfg = model_config(args)
    tcfg = TrainConfig(total_steps=10_000, optimizer=OptimizerConfig(lr=1e-3, schedule="cosine"))
    mesh = mesh_lib.make_mesh(1)
    rules = mesh_lib.default_rules()
    graphdef, state, shardings, tx, schedule = init_train_state(
        lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(0)), tcfg, mesh, rules
    )
    token_fn = lm_token_fn(args.remat, args.head_block) if args.preset else logits_token_fn
    compiler_options = gemm_compiler_options(args.gemm, state["params"])
    train_step, eval_step = make_steps(
        graphdef, tx, shardings, mesh, schedule, token_fn, compiler_options=compiler_options
    )
    rng = np.random.default_rng(0)
    batches = [
        mesh_lib.shard_batch(random_batch(rng, mcfg.vocab_size, args.batch_size, args.k + 1), mesh)
        for _ in range(2)
    ]
    with_eval = args.eval_length > 0
    if with_eval:
        eval_batch = mesh_lib.shard_batch(
            random_batch(rng, mcfg.vocab_size, args.eval_batch_size, args.eval_length + 1), mesh
        )
        weights = jnp.ones((args.eval_batch_size,), jnp.float32)
        # the current state's parameters (the loop below rebinds ``state``)
        eval_args = lambda: (state["params"], state["rest"], eval_batch, weights)  # noqa: E731
    record: dict = {
        "args": vars(args),
        "device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compiler_options,
    }
    with op_batch_parallel(mesh):
        t0 = time.perf_counter()
        step_c = train_step.lower(state, batches[0]).compile()
        record["train_compile_s"] = time.perf_counter() - t0
        hlo = step_c.as_text()
        with gzip.open(os.path.join(args.out, "train_step.hlo.txt.gz"), "wt") as f:
            f.write(hlo)
        msg = f"compile: train step {record['train_compile_s']:.1f} s"
        if with_eval:
            t0 = time.perf_counter()
            eval_c = eval_step.lower(*eval_args()).compile()
            record["eval_compile_s"] = time.perf_counter() - t0
            msg += f", eval step {record['eval_compile_s']:.1f} s"
        print(msg, flush=True)
        state, m = step_c(state, batches[0])  # warm-up
        jax.block_until_ready(m)
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(args.steps):
                state, m = step_c(state, batches[i % 2])
            jax.block_until_ready(m)
            samples.append((time.perf_counter() - t0) / args.steps * 1e3)
        record["step_ms"] = statistics.median(samples)
        tokens = args.batch_size * (args.k + 1)
        rate = tokens / record["step_ms"] * 1e3
        msg = f"train step {record['step_ms']:.2f} ms ({rate:,.0f} tokens/s)"
        if with_eval:
            jax.block_until_ready(eval_c(*eval_args()))
            t0 = time.perf_counter()
            jax.block_until_ready(eval_c(*eval_args()))
            record["eval_batch_ms"] = (time.perf_counter() - t0) * 1e3
            msg += f"; eval batch {record['eval_batch_ms']:.2f} ms"
        print(msg, flush=True)
        trace_dir = os.path.join(args.out, "trace")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for i in range(args.trace_steps):
                state, m = step_c(state, batches[i % 2])
            jax.block_until_ready(m)
    totals, total = device_op_times(trace_dir)
    per_step = {k: v / args.trace_steps / 1e3 for k, v in totals.items()}
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]
    record["device_ms_per_step"] = total / args.trace_steps / 1e3
    record["top_ops_ms_per_step"] = top
    sources = fusion_sources(hlo, top=10)
    record["top_op_sources"] = {
        name: sources[op_key(name)][:3] for name, _ in top if op_key(name) in sources
    }
    record["all_ops_ms_per_step"] = sorted(per_step.items(), key=lambda kv: -kv[1])
    record["time_by_source"] = time_by_source(per_step, sources)
    # the DeltaProduct Pallas kernels are named dp_* (pallas_kernels); the chunked path's ops
    # are XLA fusions that cannot be told apart from the rest of the model
    record["op_kernels_ms_per_step"] = sum(v for k, v in per_step.items() if k.startswith("dp_"))
    peak = device_peak_flops()
    record["model_tflop_per_step"] = flops_per_token(mcfg, args.k + 1) * tokens / 1e12
    record["mfu"] = (
        record["model_tflop_per_step"] / (record["step_ms"] / 1e3) / (peak / 1e12) if peak else None
    )
    share = record["op_kernels_ms_per_step"] / max(record["device_ms_per_step"], 1e-9)
    print(
        f"device time per step (profiler): {record['device_ms_per_step']:.2f} ms, of which the "
        f"DeltaProduct kernels {record['op_kernels_ms_per_step']:.2f} ms ({share:.0%}); MFU "
        + (f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a (unknown peak)")
        + f" ({record['model_tflop_per_step']:.2f} model TFLOP per step)"
    )
    print("| op | ms / step | share | made of (XLA fusions: primitive @ source line) |")
    print("|---|---|---|---|")
    for name, ms in top:
        share = ms / max(record["device_ms_per_step"], 1e-9)
        made_of = "; ".join(record["top_op_sources"].get(name, []))
        print(f"| {name[:90]} | {ms:.3f} | {share:.1%} | {made_of} |")
    print("\n| source (where each op's instructions came from) | ms / step | share | ops |")
    print("|---|---|---|---|")
    for home, ms, n in record["time_by_source"][: args.top]:
        share = ms / max(record["device_ms_per_step"], 1e-9)
        print(f"| {home} | {ms:.3f} | {share:.1%} | {n} |")
    with open(os.path.join(args.out, "profile_step.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
