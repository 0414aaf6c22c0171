"""Group state tracking (the paper's ``state_tracking/src/main.py``): train a DeltaProduct LM to
output the running product of group elements, then measure accuracy vs sequence length.

The flags mirror the paper's CLI (SPEC §5.4); e.g. the paper's S3 run::

    python experiments/state_tracking.py --group S3 --k 128 --k_test 512 --n_layers 1 \\
        --epochs 100 --allow_neg_eigval True --num_householder 2 --batch_size 2048 --seed 666 \\
        --lr 1e-3 --n_heads 8 --use_scheduler True --out_dir runs/s3_dp2

Outputs in ``--out_dir``: ``config.json``, ``metrics.jsonl``, ``tb/`` (TensorBoard),
``checkpoints/`` (Orbax; ``--resume True`` continues with the same data order),
``curve_val.json`` / ``curve_test.json`` (accuracy vs length), ``accuracy_vs_length.png``,
``results.json``; a table is printed. ``--eval_only True`` re-evaluates the latest checkpoint
in ``--out_dir`` (model and data rebuilt from the checkpoint's config alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
from cli_types import float_or_none, int_or_none, str2bool, str_or_none
from flax import nnx

from dpjax.data.state_tracking import StateTrackingDataConfig, build, make_fixed_splits
from dpjax.eval.accuracy import AccuracyCurve, default_table_lengths, format_table, plot_curves
from dpjax.train import compile_cache
from dpjax.train import mesh as mesh_lib
from dpjax.train.checkpoint import restore_from_dir
from dpjax.train.loop import TrainConfig, evaluate, op_batch_parallel, train
from dpjax.train.optimizer import OptimizerConfig
from dpjax.train.step import make_eval_step

MODEL_FACTORY = "dpjax.train.checkpoint:build_delta_product_lm"


def eig_range(allow_neg_eigval: bool) -> str:
    return "[-1,1]" if allow_neg_eigval else "[0,1]"


def model_label(num_householder: int, allow_neg_eigval: bool, n_layers: int = 1) -> str:
    """The paper's naming: ``DeltaProduct_2[-1,1]`` (``DeltaNet`` is ``n_h = 1``)."""
    label = f"DeltaProduct_{num_householder}{eig_range(allow_neg_eigval)}"
    return label if n_layers == 1 else f"{label} x{n_layers}L"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    paper = p.add_argument_group("paper flags (state_tracking/src/main.py)")
    paper.add_argument(
        "--group", default="S3", help="group: S<n>, A<n>, Z<n> or a direct product like S3_x_Z2"
    )
    paper.add_argument("--k", type=int, default=128, help="training sequence length")
    paper.add_argument(
        "--k_test",
        type=int,
        default=512,
        help="length of the held-out extrapolation test sequences",
    )
    paper.add_argument("--n_layers", type=int, default=1, help="number of DeltaProduct layers")
    paper.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    paper.add_argument(
        "--allow_neg_eigval",
        type=str2bool,
        default=True,
        help="beta in (0,2): eigenvalues in [-1,1] (False: [0,1])",
    )
    paper.add_argument(
        "--num_householder",
        type=int,
        default=2,
        help="n_h, Householder steps per token (1 = DeltaNet)",
    )
    paper.add_argument("--batch_size", type=int, default=2048, help="global batch size")
    paper.add_argument(
        "--seed",
        type=int,
        default=666,
        help="seeds data generation, split, shuffling and model init",
    )
    paper.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    paper.add_argument("--n_heads", type=int, default=8, help="number of heads")
    paper.add_argument(
        "--use_scheduler",
        type=str2bool,
        default=True,
        help="cosine learning-rate decay over the run (False: constant)",
    )
    ours = p.add_argument_group("data and model")
    ours.add_argument(
        "--train_samples",
        type=int,
        default=100_000,
        help="distinct length-k sequences, split 99/1 into train/validation",
    )
    ours.add_argument(
        "--val_fraction",
        type=float,
        default=0.01,
        help="fraction of --train_samples held out for validation",
    )
    ours.add_argument(
        "--test_samples",
        type=int,
        default=1_000,
        help="distinct length-k_test sequences for the extrapolation test",
    )
    ours.add_argument(
        "--stream",
        type=str2bool,
        default=False,
        help="train on an endless i.i.d. stream instead of a fixed set "
        "(--epochs then counts --train_samples-sized passes)",
    )
    ours.add_argument("--head_dim", type=int, default=32, help="key/value dim per head")
    ours.add_argument("--hidden_size", type=int, default=128, help="model width (d_state)")
    ours.add_argument(
        "--impl",
        default="auto",
        choices=("auto", "chunked", "reference", "pallas"),
        help="implementation of the DeltaProduct op",
    )
    ours.add_argument(
        "--param_dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="parameter, Adam-moment and compute dtype (paper: whole model bf16)",
    )
    opt = p.add_argument_group("optimiser")
    opt.add_argument("--weight_decay", type=float, default=1e-6, help="AdamW weight decay")
    opt.add_argument("--warmup_steps", type=int, default=0, help="linear LR warmup steps")
    opt.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    opt.add_argument(
        "--grad_clip",
        type=float_or_none,
        default=None,
        help="clip gradients by global norm (None: off)",
    )
    opt.add_argument(
        "--max_steps",
        type=int_or_none,
        default=None,
        help="total steps (None: epochs * train split size // batch_size)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--out_dir",
        default=None,
        help="run directory (None: runs/state_tracking/<group>_L<n_layers>_nh<n_h>_..._s<seed>)",
    )
    run.add_argument(
        "--eval_every",
        type=int_or_none,
        default=None,
        help="steps between evaluations of val and test (None: one epoch)",
    )
    run.add_argument(
        "--target_acc",
        type=float_or_none,
        default=0.99,
        help="early stop once the --early_stop_on set's sequence accuracy reaches "
        "this (None: never)",
    )
    run.add_argument(
        "--early_stop_on",
        default="test",
        choices=("test", "val"),
        help="eval set for early stopping (paper: the length-k_test test set)",
    )
    run.add_argument(
        "--checkpoint_every",
        type=int_or_none,
        default=None,
        help="steps between checkpoints (None: at every evaluation; always at the end)",
    )
    run.add_argument(
        "--resume",
        type=str2bool,
        default=False,
        help="continue from the latest checkpoint in --out_dir",
    )
    run.add_argument(
        "--time_limit",
        type=float_or_none,
        default=None,
        help="minutes of wall time after which training stops at the next log point, evaluates "
        "and checkpoints; --resume True continues it later (None: no limit)",
    )
    run.add_argument(
        "--eval_only",
        type=str2bool,
        default=False,
        help="only evaluate the latest checkpoint in --out_dir",
    )
    run.add_argument("--eval_batch_size", type=int, default=256, help="rows per eval batch")
    run.add_argument("--log_every", type=int, default=10, help="steps between train-metric logs")
    run.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="parameter-sharding mesh axis size (1: pure data parallel)",
    )
    run.add_argument("--progress", type=str2bool, default=True, help="show a progress bar")
    run.add_argument(
        "--compilation_cache",
        type=str_or_none,
        default=compile_cache.DEFAULT_DIR,
        help="directory of JAX's persistent compilation cache: later runs of the same model and "
        "shapes (a sweep's seeds) skip the minutes-long GPU compile (None: off)",
    )
    return p


def default_out_dir(args: argparse.Namespace) -> str:
    rng = "neg" if args.allow_neg_eigval else "pos"
    return os.path.join(
        "runs",
        "state_tracking",
        f"{args.group}_L{args.n_layers}_nh{args.num_householder}_{rng}_k{args.k}_s{args.seed}",
    )


def data_config(args: argparse.Namespace) -> StateTrackingDataConfig:
    return StateTrackingDataConfig(
        group=args.group,
        k=args.k,
        k_test=args.k_test,
        train_samples=args.train_samples,
        val_fraction=args.val_fraction,
        test_samples=args.test_samples,
        batch_size=args.batch_size,
        epochs=None if args.stream else args.epochs,
        seed=args.seed,
        stream=args.stream,
    )


def model_config(args: argparse.Namespace, vocab_size: int):
    from dpjax.nn.presets import state_tracking

    dtype = "bfloat16" if args.param_dtype == "bf16" else "float32"
    return state_tracking(
        vocab_size,
        args.num_householder,
        args.allow_neg_eigval,
        num_layers=args.n_layers,
        num_heads=args.n_heads,
        head_dim=args.head_dim,
        hidden_size=args.hidden_size,
        impl=args.impl,
        dtype=dtype,
        param_dtype=dtype,
    )


def train_config(args: argparse.Namespace, dcfg: StateTrackingDataConfig, out_dir: str):
    steps_per_epoch = max(1, round(dcfg.num_train / dcfg.batch_size))
    total = args.max_steps or max(1, (args.epochs * dcfg.num_train) // dcfg.batch_size)
    eval_every = args.eval_every or steps_per_epoch
    return TrainConfig(
        total_steps=total,
        out_dir=out_dir,
        log_every=args.log_every,
        eval_every=eval_every,
        checkpoint_every=args.checkpoint_every or eval_every,
        resume=args.resume,
        time_limit=None if args.time_limit is None else 60 * args.time_limit,
        early_stop_metric=None
        if args.target_acc is None
        else f"{args.early_stop_on}/sequence_accuracy",
        early_stop_target=args.target_acc,
        eval_batch_size=args.eval_batch_size,
        fsdp=args.fsdp,
        progress=args.progress,
        optimizer=OptimizerConfig(
            lr=args.lr,
            weight_decay=args.weight_decay,
            schedule="cosine" if args.use_scheduler else "constant",
            warmup_steps=args.warmup_steps,
            min_lr=args.min_lr,
            grad_clip=args.grad_clip,
            no_decay=(),  # the paper decays every parameter
        ),
    )


def _is_main() -> bool:
    return jax.process_index() == 0


def _write_outputs(out_dir: str, label: str, results: dict, k: int) -> dict[str, AccuracyCurve]:
    """Curve JSONs and the accuracy-vs-length PNG (process 0 only); returns the curves."""
    curves = {name: r.curve for name, r in results.items()}
    for curve in curves.values():
        curve.train_length = k
    if not _is_main():
        return curves
    for name, curve in curves.items():
        curve.save_json(os.path.join(out_dir, f"curve_{name}.json"))
    plot_curves(
        {f"{label} ({name})": c for name, c in curves.items()},
        os.path.join(out_dir, "accuracy_vs_length.png"),
        title=f"{label}: accuracy vs length",
        train_length=k,
    )
    return curves


def _summary(args, label, results, curves, extra) -> dict[str, Any]:
    test = curves.get("test")
    out = {
        "label": label,
        "group": args.group,
        "num_householder": args.num_householder,
        "allow_neg_eigval": args.allow_neg_eigval,
        "n_layers": args.n_layers,
        "seed": args.seed,
        "k": args.k,
        "k_test": args.k_test,
        **{
            f"{n}/{m}": v
            for n, r in results.items()
            for m, v in (
                ("loss", r.loss),
                ("token_accuracy", r.token_accuracy),
                ("sequence_accuracy", r.sequence_accuracy),
            )
        },
        **extra,
    }
    if test is not None:
        out["test/acc_at"] = {
            str(n): test.at(n) for n in default_table_lengths(args.k_test, args.k)
        }
        out["test/len_acc>=0.99"] = test.longest_length_above(0.99)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or evaluate) one configuration; returns the summary also saved as results.json."""
    out_dir = args.out_dir or default_out_dir(args)
    os.makedirs(out_dir, exist_ok=True)
    compile_cache.enable_compilation_cache(args.compilation_cache)
    label = model_label(args.num_householder, args.allow_neg_eigval, args.n_layers)
    if args.eval_only:
        return _eval_only(args, out_dir)
    dcfg = data_config(args)
    t0 = time.time()
    data = build(dcfg, shard_index=jax.process_index(), shard_count=jax.process_count())
    t_data = time.time() - t0
    mcfg = model_config(args, data.tokens.vocab_size)
    tcfg = train_config(args, dcfg, out_dir)
    config = {
        "model": mcfg.to_dict(),
        "model_factory": MODEL_FACTORY,
        "data": dcfg.to_dict(),
        "args": vars(args),
    }
    if _is_main():
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(config, run=tcfg.to_dict()), f, indent=1)
    print(
        f"{label} on {args.group}: {dcfg.num_train} train / {dcfg.num_val} val (k={args.k}), "
        f"{dcfg.test_samples} test (k={args.k_test}); {tcfg.total_steps} steps of "
        f"{args.batch_size}; data built in {t_data:.1f}s; devices: {jax.device_count()}",
        flush=True,
    )
    from dpjax.nn import DeltaProductLM

    result = train(
        tcfg,
        build_model=lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(args.seed)),
        train_data=data.train,
        eval_sets={"val": data.val, "test": data.test},
        config=config,
        train_length=args.k,
    )
    curves = _write_outputs(out_dir, label, result.final, args.k)
    summary = _summary(
        args,
        label,
        result.final,
        curves,
        {
            "steps": result.step,
            "stopped_early": result.stopped_early,
            "time_limited": result.time_limited,
            "train_seconds": round(result.seconds, 1),
            "final_train_loss": result.train_losses.get(result.step),
            "out_dir": out_dir,
        },
    )
    if _is_main():
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(
        format_table(
            {f"{label} (test)": curves["test"], f"{label} (val)": curves["val"]},
            default_table_lengths(args.k_test, args.k),
        )
    )
    return summary


def _eval_only(args, out_dir: str) -> dict[str, Any]:
    model, config, step = restore_from_dir(os.path.join(out_dir, "checkpoints"))
    stored = argparse.Namespace(**dict(config["args"], eval_only=True))
    label = model_label(stored.num_householder, stored.allow_neg_eigval, stored.n_layers)
    dcfg = StateTrackingDataConfig(**config["data"])
    _, val, test = make_fixed_splits(dcfg)
    mesh = mesh_lib.make_mesh()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(
        graphdef,
        params_shardings=jax.tree.map(lambda x: x.sharding, params),
        rest_shardings=jax.tree.map(lambda x: x.sharding, rest),
        batch_sharding=mesh_lib.batch_sharding(mesh),
    )
    with op_batch_parallel(mesh):
        results = {
            name: evaluate(
                eval_step,
                params,
                rest,
                arrays,
                batch_size=args.eval_batch_size,
                mesh=mesh,
                train_length=dcfg.k,
            )
            for name, arrays in (("val", val), ("test", test))
        }
    curves = _write_outputs(out_dir, label, results, dcfg.k)
    summary = _summary(stored, label, results, curves, {"steps": step, "out_dir": out_dir})
    print(f"checkpoint step {step} in {out_dir}")
    print(
        format_table(
            {f"{label} (test)": curves["test"], f"{label} (val)": curves["val"]},
            default_table_lengths(dcfg.k_test, dcfg.k),
        )
    )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
