"""Language-model training, evaluation and generation (SPEC §6) from one CLI.

Subcommands (``--help`` on each lists every flag)::

    # 1. tokenise a corpus into packed shards (default: this Python's stdlib sources, bytes)
    python experiments/language_model.py prepare --corpus stdlib --out data/stdlib-bytes-512 \\
        --seq_len 512
    # 2. train (tiny preset: a few minutes on a CPU; paper presets dn/dp2/dp3-213m/392m/805m)
    python experiments/language_model.py train --preset tiny --data data/stdlib-bytes-512 \\
        --out_dir runs/lm/tiny --steps 300 --batch_size 16
    # 3. evaluate a run: perplexity, per-position loss to 4x the training length, state rank
    python experiments/language_model.py eval --run runs/lm/tiny
    # 4. sample from a run (checkpoint directory alone: model, config and tokenizer)
    python experiments/language_model.py generate --run runs/lm/tiny --prompt "def main(" \\
        --max_new_tokens 200 --temperature 0.8

Training follows the paper's recipe (SPEC §6.1): AdamW (0.9, 0.95), weight decay 0.01 except
norms/biases/A_log/dt_bias, cosine schedule with linear warmup and a floor, gradient clipping
1.0, bf16 compute with fp32 master parameters, gradient accumulation, a ("data", "fsdp") mesh
over every device of every process (``--fsdp N`` shards parameters and optimizer state by the
model's logical names), optional per-block rematerialisation, tokens/s and MFU in the logs,
Orbax checkpoints with exact resume (``--resume``). Several processes (hosts) run the same
command with ``--coordinator host:port --num_processes N --process_id i`` (or the JAX_* env
vars, or automatically under Slurm); see docs/LM.md.

Run directory: ``config.json``, ``metrics.jsonl``, ``tb/``, ``checkpoints/<step>/``,
``results.json``; ``eval/`` after ``eval``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli_types import float_or_none, int_or_none, str2bool, str_or_none

RUN_CONFIG = "config.json"
MODEL_FACTORY = "dpjax.train.checkpoint:build_delta_product_lm"
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


# --------------------------------------------------------------------------------------------
# argument types


# --------------------------------------------------------------------------------------------
# parser


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (JAX distributed runtime)")
    g.add_argument(
        "--coordinator",
        default=None,
        help="host:port of process 0's coordinator, the same for every process "
        "(env JAX_COORDINATOR_ADDRESS; auto under Slurm)",
    )
    g.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help="number of processes of the run (env JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process_id",
        type=int,
        default=None,
        help="this process's index in [0, num_processes) (env JAX_PROCESS_ID)",
    )


def _add_prepare(sub) -> None:
    from dpjax.data.text_prepare import DEFAULT_SEED, DEFAULT_VAL_FRACTION

    p = sub.add_parser(
        "prepare",
        help="tokenise a corpus into packed train/validation shards",
        description="Tokenise a local corpus (BOS per document), pack rows of seq_len+1 tokens, "
        "split train/validation by file and write .npy shards + manifest.json "
        "(dpjax.data.text). Re-running with the same settings reuses the shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--corpus",
        default="stdlib",
        help="'stdlib' (this Python's standard-library sources), a directory of "
        ".txt/.py/.md/.jsonl/.jsonl.gz/.parquet files, or one such file",
    )
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--seq_len", type=int, default=512, help="training sequence length T")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes' (vocab 259) or a HuggingFace tokenizers .json file",
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="fraction of files held out for validation",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="train/validation split seed")
    p.add_argument(
        "--limit_files", type=int_or_none, default=None, help="only the first N files (quick runs)"
    )
    p.add_argument(
        "--add_eos",
        type=str2bool,
        default=False,
        help="append EOS to every document (BOS is always prepended)",
    )
    p.add_argument(
        "--overwrite",
        type=str2bool,
        default=False,
        help="replace shards of another configuration in --out",
    )
    p.add_argument("--quiet", type=str2bool, default=False, help="no progress bar or summary")


def _add_train(sub) -> None:
    from dpjax.nn.conv import CONV_IMPLS
    from dpjax.nn.norms import NORM_IMPLS
    from dpjax.nn.presets import list_presets
    from dpjax.train.gemm import GEMM_CHOICES

    p = sub.add_parser(
        "train",
        help="train a language model",
        description="Train a DeltaProduct/DeltaNet LM on packed shards with the paper's recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        default="tiny",
        choices=list_presets(),
        help="model preset (paper LMs: dn/dp2/dp3-213m/392m/805m)",
    )
    m.add_argument(
        "--model_config",
        default=None,
        help="JSON model config (FLA GatedDeltaProductConfig keys); overrides --preset",
    )
    m.add_argument(
        "--num_householder", type=int_or_none, default=None, help="override n_h (1 = DeltaNet)"
    )
    m.add_argument("--hidden_size", type=int_or_none, default=None, help="override width D")
    m.add_argument("--num_layers", type=int_or_none, default=None, help="override layer count")
    m.add_argument("--num_heads", type=int_or_none, default=None, help="override head count")
    m.add_argument("--head_dim", type=int_or_none, default=None, help="override d_k")
    m.add_argument(
        "--impl",
        default="auto",
        choices=("auto", "chunked", "pallas", "reference"),
        help="DeltaProduct op implementation (auto: Pallas kernels on GPU)",
    )
    m.add_argument(
        "--conv_backward",
        default="auto",
        choices=CONV_IMPLS,
        help="backward of the short convolutions: auto (the one-pass Pallas kernel on a GPU, "
        "2.8x faster than autodiff on an H100, docs/LM.md; autodiff elsewhere), xla (autodiff), "
        "pallas (the kernel, interpret mode on CPU)",
    )
    m.add_argument(
        "--conv_forward",
        default="auto",
        choices=CONV_IMPLS,
        help="forward of the short convolutions (with q/k's L2 norm): auto (the one-pass Pallas "
        "kernel on a GPU, 6x faster than XLA's fusion on an H100; XLA elsewhere), xla (XLA's "
        "fusion), pallas (the kernel, interpret mode on CPU)",
    )
    m.add_argument(
        "--norm_impl",
        default="xla",
        choices=NORM_IMPLS,
        help="the RMSNorms (dpjax.nn.norms): xla (XLA's fusions, folded into the next GEMMs), "
        "pallas (one Pallas kernel each way, no faster in the DP2-392M step on an H100; "
        "interpret mode on CPU), auto (the kernels on a GPU, XLA elsewhere)",
    )
    m.add_argument(
        "--compute_dtype",
        default="bf16",
        choices=sorted(DTYPES),
        help="activation/matmul dtype (logits and loss are fp32)",
    )
    m.add_argument(
        "--param_dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="master parameter (and Adam moment) dtype",
    )
    m.add_argument(
        "--remat",
        default="none",
        choices=("none", "block", "block_save_dots"),
        help="rematerialise every block in the backward pass (saves activation memory)",
    )
    m.add_argument(
        "--head_block",
        type=int,
        default=1024,
        help="positions per block of the output head + loss (bounds logits memory)",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default=None,
        help="shard directory from `prepare` (default data/<corpus>-<tokenizer>-<T>; "
        "prepared on the fly when missing, single process only)",
    )
    d.add_argument("--corpus", default="stdlib", help="corpus for on-the-fly preparation")
    d.add_argument("--seq_len", type=int, default=512, help="T for on-the-fly preparation")
    d.add_argument("--tokenizer", default="bytes", help="tokenizer for on-the-fly preparation")
    d.add_argument(
        "--segment_resets",
        type=str2bool,
        default=False,
        help="reset the state at document starts inside a row (False: the paper's "
        "packed stream, documents separated by BOS only)",
    )
    o = p.add_argument_group("optimisation (paper: SPEC §6.1)")
    o.add_argument("--steps", type=int, default=300, help="optimizer steps (schedule length)")
    o.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="global batch: sequences per optimizer step over all devices/processes "
        "(paper: 256 x 2048 tokens)",
    )
    o.add_argument(
        "--accum_steps",
        type=int,
        default=1,
        help="gradient accumulation: micro-batches per step (batch_size / accum_steps "
        "sequences each)",
    )
    o.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    o.add_argument(
        "--min_lr", type=float_or_none, default=None, help="cosine floor (default lr / 10)"
    )
    o.add_argument(
        "--warmup_steps",
        type=int,
        default=None,
        help="linear warmup steps (default min(512, steps // 10); paper 512)",
    )
    o.add_argument(
        "--weight_decay",
        type=float,
        default=0.01,
        help="AdamW weight decay (not on norms, biases, A_log, dt_bias)",
    )
    o.add_argument("--b1", type=float, default=0.9, help="Adam beta1")
    o.add_argument("--b2", type=float, default=0.95, help="Adam beta2")
    o.add_argument(
        "--grad_clip",
        type=float_or_none,
        default=1.0,
        help="clip gradients by global norm (None: off)",
    )
    o.add_argument("--seed", type=int, default=42, help="model init and data order seed")
    r = p.add_argument_group("run")
    r.add_argument("--out_dir", default=None, help="run directory (default runs/lm/<preset>)")
    r.add_argument(
        "--resume",
        type=str2bool,
        default=False,
        help="continue from the latest checkpoint in --out_dir (same batches)",
    )
    r.add_argument(
        "--stop_at",
        type=int_or_none,
        default=None,
        help="stop after this step as if interrupted (checkpoint first)",
    )
    r.add_argument(
        "--time_limit",
        type=float_or_none,
        default=None,
        help="minutes of wall time after which training stops at the next log point, evaluates "
        "and checkpoints; --resume True continues it later (None: no limit)",
    )
    r.add_argument(
        "--eval_every",
        type=int_or_none,
        default=None,
        help="steps between validation losses (default: 4 times per run)",
    )
    r.add_argument(
        "--eval_rows", type=int, default=64, help="validation rows scored at each evaluation"
    )
    r.add_argument("--eval_batch_size", type=int, default=16, help="rows per eval batch")
    r.add_argument(
        "--checkpoint_every",
        type=int_or_none,
        default=None,
        help="steps between checkpoints (default: at evaluations; always at the end)",
    )
    r.add_argument("--keep_checkpoints", type=int, default=2, help="checkpoints kept")
    r.add_argument("--log_every", type=int, default=10, help="steps between metric logs")
    r.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="size of the parameter-sharding mesh axis (1: pure data parallel)",
    )
    r.add_argument(
        "--gemm",
        default="auto",
        choices=GEMM_CHOICES,
        help="GEMM emitter of the dense layers on a GPU (dpjax.train.gemm): auto (cuBLAS where a "
        "dense kernel has a side not a multiple of 8, e.g. the dp2-805m preset's hidden size "
        "1468, whose step it made 1.34x faster on an H100; else XLA's Triton GEMMs), xla, cublas",
    )
    r.add_argument(
        "--peak_tflops",
        type=float_or_none,
        default=None,
        help="peak TFLOP/s per device for MFU (default: known GPUs' dense bf16 peak; none on CPU)",
    )
    r.add_argument("--progress", type=str2bool, default=True, help="show a progress bar")
    r.add_argument("--tensorboard", type=str2bool, default=True, help="write TensorBoard events")
    _add_compilation_cache(r)
    _add_distributed(p)


def _add_compilation_cache(p: argparse.ArgumentParser) -> None:
    from dpjax.train.compile_cache import DEFAULT_DIR

    p.add_argument(
        "--compilation_cache",
        type=str_or_none,
        default=DEFAULT_DIR,
        help="directory of JAX's persistent compilation cache: a rerun with the same model and "
        "shapes skips the minutes-long GPU compile (None: off)",
    )


def _add_load(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        required=True,
        help="run directory (holding checkpoints/) or an Orbax checkpoint directory",
    )
    p.add_argument("--step", type=int_or_none, default=None, help="checkpoint step (latest)")
    p.add_argument(
        "--impl",
        default=None,
        choices=("auto", "chunked", "pallas", "reference"),
        help="override the op implementation stored with the model",
    )
    p.add_argument(
        "--compute_dtype",
        default=None,
        choices=sorted(DTYPES),
        help="override the compute dtype stored with the model",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, per-position loss and effective state rank of a run",
        description="Evaluate a checkpoint: validation perplexity, per-position loss up to "
        "--length_factor x the training length (SPEC §6.2) and the effective state "
        "rank per layer and head over positions; JSON + PNG in <run>/eval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_load(p)
    _add_compilation_cache(p)
    p.add_argument("--data", default=None, help="shard directory (default: the run's)")
    p.add_argument("--split", default="validation", help="split to evaluate")
    p.add_argument("--out", default=None, help="output directory (default <run>/eval)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    p.add_argument(
        "--max_rows",
        type=int_or_none,
        default=None,
        help="rows for the perplexity (default: the whole split)",
    )
    p.add_argument(
        "--length_factor",
        type=int,
        default=4,
        help="per-position loss up to this multiple of the training length",
    )
    p.add_argument(
        "--num_sequences",
        type=int,
        default=16,
        help="long sequences averaged for the per-position loss",
    )
    p.add_argument(
        "--rank_length",
        type=int_or_none,
        default=None,
        help="tokens of the state-rank sequence (default 2x the training length)",
    )
    p.add_argument("--rank_every", type=int, default=4, help="record the state rank every N tokens")
    p.add_argument(
        "--what",
        nargs="+",
        default=["perplexity", "per_position", "state_rank"],
        choices=("perplexity", "per_position", "state_rank"),
        help="evaluations to run",
    )


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a run, streaming tokens",
        description="Restore model, config and tokenizer from a checkpoint directory and "
        "continue a prompt, printing tokens as they are made.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_load(p)
    _add_compilation_cache(p)
    p.add_argument("--prompt", default="", help="prompt text (a BOS is prepended)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file instead")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int_or_none, default=None, help="keep the k most likely")
    p.add_argument("--top_p", type=float_or_none, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stop_at_document_end",
        type=str2bool,
        default=True,
        help="stop when the model starts a new document (BOS) or emits EOS",
    )
    p.add_argument(
        "--stream",
        type=str2bool,
        default=True,
        help="print tokens as they are made (False: print at the end)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python experiments/language_model.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python experiments/language_model.py <command> --help` for its flags.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    return p


# --------------------------------------------------------------------------------------------
# helpers


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _say(*args: Any) -> None:
    if _is_main():
        print(*args, flush=True)


def default_data_dir(corpus: str, tokenizer: str, seq_len: int) -> str:
    corpus_name = Path(corpus).name or "corpus"
    tok = "bytes" if tokenizer == "bytes" else Path(tokenizer).stem
    return os.path.join("data", f"{corpus_name}-{tok}-{seq_len}")


def ensure_data(args: argparse.Namespace) -> str:
    """The shard directory for training; prepared on the fly (single process) when missing."""
    import jax

    from dpjax.data.shards import MANIFEST

    shard_dir = args.data or default_data_dir(args.corpus, args.tokenizer, args.seq_len)
    if (Path(shard_dir) / MANIFEST).is_file():
        return shard_dir
    if args.data is not None and Path(shard_dir).exists() and any(Path(shard_dir).iterdir()):
        raise ValueError(
            f"--data {shard_dir!r} is not a prepared shard directory (no {MANIFEST}); run "
            "`python experiments/language_model.py prepare --out DIR ...` first"
        )
    if jax.process_count() > 1:
        raise ValueError(
            f"--data {shard_dir!r} does not exist; with several processes prepare the shards "
            "first (`prepare`), on a file system every process can read"
        )
    from dpjax.data.text import prepare_text_shards

    _say(f"preparing {shard_dir} from corpus {args.corpus!r} (seq_len {args.seq_len})")
    prepare_text_shards(
        args.corpus, shard_dir, args.seq_len, tokenizer=args.tokenizer, progress=args.progress
    )
    return shard_dir


def tokenizer_record(shard_dir: str) -> dict[str, Any]:
    """The tokenizer as stored in a checkpoint's config: its spec (+ the JSON for HF files)."""
    from dpjax.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    spec = dict(manifest["tokenizer"])
    record = {"spec": spec, "add_eos": bool(manifest["config"].get("add_eos", False))}
    if spec["kind"] != "bytes":
        record["json"] = (Path(shard_dir) / spec["file"]).read_text()
    return record


def tokenizer_from_record(record: dict[str, Any]):
    """Rebuild a tokenizer from ``tokenizer_record``'s output (checkpoint config)."""
    from dpjax.data.tokenizer import ByteTokenizer, HFTokenizer

    spec = record["spec"]
    if spec["kind"] == "bytes":
        return ByteTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(record["json"])
        tok = HFTokenizer(path)
    for key in ("bos_id", "eos_id", "pad_id"):
        setattr(tok, key, spec[key])
    return tok


def model_config(args: argparse.Namespace, tok, seq_len: int):
    """The model config: preset or JSON file, CLI overrides, the tokenizer's vocabulary."""
    from dpjax.nn import DeltaProductConfig, get_preset

    if args.model_config:
        if not os.path.isfile(args.model_config):
            raise ValueError(f"--model_config {args.model_config!r}: no such file")
        base = DeltaProductConfig.from_json(args.model_config)
    else:
        base = get_preset(args.preset)
    overrides: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "max_position_embeddings": seq_len,
        "impl": args.impl,
        "conv_forward": args.conv_forward,
        "conv_backward": args.conv_backward,
        "norm_impl": args.norm_impl,
        "dtype": DTYPES[args.compute_dtype],
        "param_dtype": DTYPES[args.param_dtype],
    }
    for flag, field in (("num_householder", "num_householder"), ("hidden_size", "hidden_size"),
                        ("num_layers", "num_hidden_layers"), ("num_heads", "num_heads"),
                        ("head_dim", "head_dim")):  # fmt: skip
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    return base.replace(**overrides)


def train_config(args: argparse.Namespace, out_dir: str):
    from dpjax.train.loop import TrainConfig
    from dpjax.train.optimizer import OptimizerConfig

    if args.steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {args.steps}")
    if args.accum_steps < 1 or args.batch_size % args.accum_steps:
        raise ValueError(
            f"--batch_size {args.batch_size} must be a positive multiple of --accum_steps "
            f"{args.accum_steps}"
        )
    eval_every = args.eval_every or max(1, args.steps // 4)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(512, args.steps // 10)
    return TrainConfig(
        total_steps=args.steps,
        out_dir=out_dir,
        log_every=args.log_every,
        eval_every=eval_every,
        checkpoint_every=args.checkpoint_every or eval_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        stop_at=args.stop_at,
        time_limit=None if args.time_limit is None else 60 * args.time_limit,
        eval_batch_size=args.eval_batch_size,
        fsdp=args.fsdp,
        accum_steps=args.accum_steps,
        gemm=args.gemm,
        progress=args.progress,
        tensorboard=args.tensorboard,
        optimizer=OptimizerConfig(
            lr=args.lr,
            weight_decay=args.weight_decay,
            b1=args.b1,
            b2=args.b2,
            schedule="cosine",
            warmup_steps=warmup,
            min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
            grad_clip=args.grad_clip,
            no_decay=("norm", "bias", "a_log", "dt_bias"),
            decay_embeddings=True,
        ),
    )


# --------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model; returns the summary also written to ``<out_dir>/results.json``."""
    from dpjax.train.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)

    import jax
    from flax import nnx

    from dpjax.data.shards import read_manifest
    from dpjax.data.text import tokenizer_from_shards
    from dpjax.nn import DeltaProductLM
    from dpjax.train import flops
    from dpjax.train.lm_data import eval_arrays, lm_dataset
    from dpjax.train.lm_step import lm_token_fn
    from dpjax.train.loop import train

    out_dir = args.out_dir or os.path.join("runs", "lm", args.preset)
    shard_dir = ensure_data(args)
    manifest = read_manifest(shard_dir)
    seq_len = int(manifest["seq_len"])
    tok = tokenizer_from_shards(shard_dir)
    mcfg = model_config(args, tok, seq_len)
    tcfg = train_config(args, out_dir)
    n_dev = jax.device_count()
    micro = args.batch_size // args.accum_steps
    if micro % n_dev:
        raise ValueError(
            f"the micro-batch (--batch_size / --accum_steps = {micro}) must be a multiple of the "
            f"device count {n_dev}"
        )
    params = flops.param_count(mcfg)
    fpt = flops.flops_per_token(mcfg, seq_len)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.device_peak_flops()
    config = {
        "model": mcfg.to_dict(),
        "model_factory": MODEL_FACTORY,
        "data": {
            "shard_dir": os.path.abspath(shard_dir),
            "seq_len": seq_len,
            "segment_resets": args.segment_resets,
        },
        "tokenizer": tokenizer_record(shard_dir),
        "args": vars(args),
        "params": {"total": params.total, "non_embedding": params.non_embedding},
        "flops_per_token": fpt,
    }
    if _is_main():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, RUN_CONFIG), "w") as f:
            json.dump(dict(config, run=tcfg.to_dict()), f, indent=1)
    tokens_per_step = args.batch_size * seq_len
    _say(
        f"{args.preset if not args.model_config else args.model_config}: "
        f"{params.total / 1e6:.2f}M params (n_h={mcfg.num_householder}, impl={mcfg.impl}); "
        f"{tcfg.total_steps} steps x {args.batch_size} x {seq_len} tokens "
        f"({tokens_per_step * tcfg.total_steps / 1e6:.1f}M tokens), accum {args.accum_steps}; "
        f"{n_dev} device(s) in {jax.process_count()} process(es), fsdp {args.fsdp}; "
        f"{fpt / 1e9:.3f} GFLOP/token; data {shard_dir}"
    )
    train_data = lm_dataset(
        shard_dir,
        "train",
        global_batch=args.batch_size,
        seed=args.seed,
        segment_resets=args.segment_resets,
    )
    val = eval_arrays(
        shard_dir, "validation", max_rows=args.eval_rows, segment_resets=args.segment_resets
    )
    t0 = time.time()
    result = train(
        tcfg,
        build_model=lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(args.seed)),
        train_data=train_data,
        eval_sets={"val": val},
        config=config,
        token_fn=lm_token_fn(args.remat, args.head_block),
        flops_per_token=fpt,
        peak_flops=peak,
        portable_data_state=True,
    )
    val_res = result.final.get("val")
    summary = {
        "preset": args.preset,
        "model_config": args.model_config,
        "num_householder": mcfg.num_householder,
        "params": params.total,
        "steps": result.step,
        "time_limited": result.time_limited,
        "tokens": result.step * tokens_per_step,
        "final_train_loss": result.train_losses.get(result.step),
        "val_loss": None if val_res is None else val_res.loss,
        "val_perplexity": None if val_res is None else math.exp(min(val_res.loss, 700)),
        "seconds": round(time.time() - t0, 1),
        "throughput": result.throughput,
        "out_dir": out_dir,
    }
    if _is_main():
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        tput = result.throughput or {}
        print(
            f"done: step {result.step}, val loss {summary['val_loss']:.4f} "
            f"(ppl {summary['val_perplexity']:.3f}), "
            f"{tput.get('tokens_per_s', float('nan')):.0f} tokens/s"
            + (f", MFU {tput['mfu']:.1%}" if tput.get("mfu") is not None else ""),
            flush=True,
        )
    return summary


# --------------------------------------------------------------------------------------------
# loading a run


def checkpoint_dir(run: str) -> str:
    """``run/checkpoints`` when it exists, else ``run`` if it holds Orbax step directories."""
    path = Path(run)
    if not path.exists():
        raise ValueError(f"--run {run!r}: no such directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        raise ValueError(
            f"--run {run!r}: no checkpoint found (expected a run directory with checkpoints/ "
            "or an Orbax checkpoint directory with numbered step directories)"
        )
    return str(path)


def load_run(args: argparse.Namespace):
    """``(model, config, step, tokenizer)`` from a run/checkpoint directory alone."""
    from dpjax.nn import DeltaProductConfig, DeltaProductLM
    from dpjax.train.checkpoint import restore_from_dir

    ckpt = checkpoint_dir(args.run)
    overrides = {}
    if args.impl:
        overrides["impl"] = args.impl
    if args.compute_dtype:
        overrides["dtype"] = DTYPES[args.compute_dtype]

    def build(model_dict):
        from flax import nnx

        cfg = DeltaProductConfig.from_dict(dict(model_dict)).replace(**overrides)
        return DeltaProductLM(cfg, rngs=nnx.Rngs(0))

    model, config, step = restore_from_dir(ckpt, step=args.step, build_model=build)
    if "tokenizer" not in config:
        raise ValueError(
            f"checkpoint {ckpt!r} has no tokenizer in its config (not written by "
            "experiments/language_model.py train)"
        )
    return model, config, step, tokenizer_from_record(config["tokenizer"])


# --------------------------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a checkpoint; writes JSON + PNG files and returns the summary."""
    import jax
    import numpy as np

    from dpjax.eval.lm_eval import perplexity
    from dpjax.eval.lm_eval_state import state_rank_by_layer
    from dpjax.eval.per_position import long_sequences, per_position_loss, plot_per_position
    from dpjax.train.mesh import make_mesh

    model, config, step, tok = load_run(args)
    # batches split over this process's devices (the op's kernels run per device)
    mesh = make_mesh() if jax.device_count() > 1 and jax.process_count() == 1 else None
    data = config["data"]
    shard_dir = args.data or data["shard_dir"]
    train_len = int(data["seq_len"])
    resets = bool(data.get("segment_resets", False))
    out = Path(args.out or Path(args.run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    label = f"n_h={model.config.num_householder}"
    summary: dict[str, Any] = {"run": args.run, "step": step, "train_length": train_len}
    if "perplexity" in args.what:
        t = time.time()
        res = perplexity(
            model,
            shard_dir,
            args.split,
            batch_size=args.batch_size,
            max_rows=args.max_rows,
            segment_resets=resets,
            mesh=mesh,
        )
        summary["perplexity"] = res
        print(
            f"{args.split}: loss {res['loss']:.4f}, perplexity {res['perplexity']:.3f} over "
            f"{res['tokens']:,} tokens ({time.time() - t:.1f}s)",
            flush=True,
        )
    if "per_position" in args.what:
        t = time.time()
        length = train_len * args.length_factor
        seqs = long_sequences(
            shard_dir, args.split, length=length, max_sequences=args.num_sequences
        )
        pp = per_position_loss(
            model,
            seqs,
            batch_size=max(1, args.batch_size // 4),
            train_length=train_len,
            segment_resets=resets,
            bos_id=tok.bos_id,
            mesh=mesh,
        )
        pp.extra.update(step=step, label=label)
        pp.save_json(out / "per_position.json")
        plot_per_position(
            {label: pp},
            out / "per_position.png",
            title=f"Per-position loss ({pp.num_sequences} sequences)",
        )
        table = {f"{a}-{b}": pp.mean_between(a, b)
                 for a, b in _length_buckets(train_len, length)}  # fmt: skip
        summary["per_position"] = {"num_sequences": pp.num_sequences, "length": length,
                                   "mean_loss": table}  # fmt: skip
        print(
            f"per-position loss ({pp.num_sequences} x {length} tokens, {time.time() - t:.1f}s): "
            + ", ".join(f"[{k}) {v:.3f}" for k, v in table.items()),
            flush=True,
        )
    if "state_rank" in args.what:
        t = time.time()
        length = args.rank_length or 2 * train_len
        seq = long_sequences(shard_dir, args.split, length=length, max_sequences=1)[0, :-1]
        ranks = state_rank_by_layer(
            model,
            seq,
            every=args.rank_every,
            segment_resets=resets,
            bos_id=tok.bos_id,
            train_length=train_len,
        )
        ranks.save_json(out / "state_rank.json")
        ranks.plot(out / "state_rank.png", title=f"Effective state rank ({label})")
        per_layer = {str(layer): float(np.mean(ranks.ranks[i]))
                     for i, layer in enumerate(ranks.layers)}  # fmt: skip
        summary["state_rank"] = {"length": length, "mean_per_layer": per_layer,
                                 "head_dim": ranks.head_dim}  # fmt: skip
        print(
            f"effective state rank (mean over heads and {length} positions, "
            f"d_k={ranks.head_dim}, {time.time() - t:.1f}s): "
            + ", ".join(f"layer {k}: {v:.2f}" for k, v in per_layer.items()),
            flush=True,
        )
    with open(out / "eval.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out}", flush=True)
    return summary


def _length_buckets(train_len: int, length: int) -> list[tuple[int, int]]:
    """``[0, T), [T, 2T), ...`` up to ``length``."""
    return [(a, min(a + train_len, length)) for a in range(0, length, train_len)]


# --------------------------------------------------------------------------------------------
# generate


class _Streamer:
    """Print newly decoded text as tokens arrive (holds back an incomplete UTF-8 tail)."""

    def __init__(self, tok, enabled: bool):
        self.tok, self.enabled = tok, enabled
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, i: int, tokens) -> None:
        self.ids.append(int(tokens[0]))
        if not self.enabled:
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()
        self.printed = text


def cmd_generate(args: argparse.Namespace) -> str:
    """Continue ``--prompt``; returns the generated text."""
    import numpy as np

    from dpjax.generate import generate

    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens: expected >= 1, got {args.max_new_tokens}")
    prompt = args.prompt
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ValueError(f"--prompt_file {args.prompt_file!r}: no such file")
        prompt = Path(args.prompt_file).read_text()
    model, config, step, tok = load_run(args)
    ids = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)[None]
    stop = None
    if args.stop_at_document_end:
        stop = tok.eos_id if config["tokenizer"].get("add_eos") else tok.bos_id
    streamer = _Streamer(tok, args.stream)
    if args.stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    out = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        rng=args.seed,
        eos_token_id=stop,
        pad_token_id=tok.pad_id,
        callback=streamer,
    )
    new = [int(t) for t in np.asarray(out)[0]]
    if stop is not None and stop in new:
        new = new[: new.index(stop)]
    text = tok.decode(new)
    if args.stream:
        sys.stdout.write(text[len(streamer.printed) :] + "\n")
    else:
        print(prompt + text)
    sys.stdout.flush()
    return text


# --------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from dpjax.data.text import prepare_text_shards

    return prepare_text_shards(
        args.corpus, args.out, args.seq_len, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, seed=args.seed, limit_files=args.limit_files,
        add_eos=args.add_eos, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval,
            "generate": cmd_generate}  # fmt: skip


def main(argv: list[str] | None = None) -> Any:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "compilation_cache", None):
            from dpjax.train.compile_cache import enable_compilation_cache

            enable_compilation_cache(args.compilation_cache)
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
