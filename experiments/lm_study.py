"""Small-scale language-model study: DeltaNet vs DeltaProduct_2 vs DeltaProduct_3 at matched
parameters on the default code corpus (this Python's standard library, byte tokens).

For each model: train (``experiments/language_model.py train``), then evaluate validation
loss and the per-position loss up to ``--length_factor`` x the training length (SPEC §6.2,
the paper's length-extrapolation protocol). Parameters are matched the paper's way: the same
width, depth and head size, and fewer heads for more Householder steps (the mixer's q/k/v/o
matmuls cost ``(2 + 2 n_h) * H * d_k * D``, so ``H = 6, 4, 3`` for ``n_h = 1, 2, 3``).

Scales::

    --scale gpu   (default) D 256, 4 layers, d_k 64, T 512, 2000 steps x 32 sequences
                  (~33M tokens per model, ~3 epochs of the corpus): 2 min 20 s for all three
                  models on one H100 (scripts/gpu_lm_study.sh; results and the caveat that
                  the models overfit this corpus: docs/RESULTS.md).
    --scale cpu   D 128, 2 layers, d_k 32, T 256, 150 steps x 8 sequences: a few minutes on a
                  laptop CPU; shows the pipeline works, the models are far from converged.
    --scale smoke D 32, 1 layer, T 64, 20 steps x 8 sequences: seconds (the tests use it).

On a GPU lent in short slices, ``--time_limit MINUTES`` stops the model in training with a
checkpoint when the minutes are spent; the same command continues where it stopped.
``--seeds 0 1 2`` runs the whole study once per seed (``<out_dir>/seed_<s>``) and writes the mean
and standard deviation over seeds (``summary_seeds.md/json``, ``per_position_seeds.png``).

Outputs in ``--out_dir``: one run directory per model (skipped when its ``eval/eval.json``
exists, so an interrupted study continues), ``summary.md`` / ``summary.json`` (table), and
``per_position.png`` (the per-position curves, and each minus DeltaNet's: the evaluation
sequences are shared, so their content noise cancels) and ``val_loss.png`` (validation loss vs
step). Example::

    python experiments/lm_study.py --scale gpu --out_dir runs/lm_study
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import language_model as lm  # noqa: E402  (experiments/language_model.py)

# n_h -> heads at matched parameters (same D, L, d_k)
MODELS = {"DeltaNet": (1, 6), "DeltaProduct_2": (2, 4), "DeltaProduct_3": (3, 3)}
SCALES: dict[str, dict[str, Any]] = {
    "gpu": dict(hidden_size=256, num_layers=4, head_dim=64, seq_len=512, steps=2000,
                batch_size=32, lr=1.5e-3, warmup_steps=100, eval_rows=128, num_sequences=80),
    "cpu": dict(hidden_size=128, num_layers=2, head_dim=32, seq_len=256, steps=150,
                batch_size=8, lr=2e-3, warmup_steps=15, eval_rows=32, num_sequences=32),
    "smoke": dict(hidden_size=32, num_layers=1, head_dim=8, seq_len=64, steps=20,
                  batch_size=8, lr=2e-3, warmup_steps=2, eval_rows=8, num_sequences=8),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--scale",
        default="gpu",
        choices=sorted(SCALES),
        help="model/run size (see the module docstring)",
    )
    p.add_argument(
        "--out_dir", default=None, help="study directory (default runs/lm_study_<scale>)"
    )
    p.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to compare"
    )
    p.add_argument("--corpus", default="stdlib", help="corpus for the shards ('stdlib' or a dir)")
    p.add_argument(
        "--data",
        default=None,
        help="prepared shard directory (default data/<corpus>-bytes-<seq_len>)",
    )
    p.add_argument("--steps", type=lm.int_or_none, default=None, help="override the scale's steps")
    p.add_argument(
        "--batch_size", type=lm.int_or_none, default=None, help="override the scale's global batch"
    )
    p.add_argument(
        "--length_factor",
        type=int,
        default=4,
        help="per-position loss up to this multiple of the training length",
    )
    p.add_argument(
        "--impl",
        default="auto",
        choices=("auto", "chunked", "pallas", "reference"),
        help="op implementation for training",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run the whole study once per seed (in <out_dir>/seed_<s>) and write the mean and "
        "spread over seeds (summary_seeds.md/json, per_position_seeds.png); overrides --seed",
    )
    p.add_argument(
        "--skip_existing",
        type=lm.str2bool,
        default=True,
        help="reuse runs whose eval/eval.json exists",
    )
    p.add_argument(
        "--time_limit",
        type=lm.float_or_none,
        default=None,
        help="minutes for this call: a model still training when they are spent stops with a "
        "checkpoint and the study ends without its table; the same command resumes it (each "
        "call makes progress; None: no limit)",
    )
    p.add_argument("--progress", type=lm.str2bool, default=True, help="progress bars")
    lm._add_compilation_cache(p)
    return p


def _train_argv(args, scale: dict, name: str, out: str, data: str) -> list[str]:
    n_h, heads = MODELS[name]
    return [
        "train", "--preset", "tiny", "--data", data, "--out_dir", out,
        "--num_householder", str(n_h), "--num_heads", str(heads),
        "--hidden_size", str(scale["hidden_size"]), "--num_layers", str(scale["num_layers"]),
        "--head_dim", str(scale["head_dim"]), "--impl", args.impl,
        "--steps", str(args.steps or scale["steps"]),
        "--batch_size", str(args.batch_size or scale["batch_size"]),
        "--lr", str(scale["lr"]), "--warmup_steps", str(scale["warmup_steps"]),
        "--eval_rows", str(scale["eval_rows"]), "--seed", str(args.seed),
        "--progress", str(args.progress), "--compilation_cache", str(args.compilation_cache),
    ]  # fmt: skip


def _val_curve(run_dir: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "val/loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["val/loss"])
    return steps, losses


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Train + evaluate every model; write the table and plots; return the summary."""
    from dpjax.eval.per_position import PerPositionLoss

    scale = SCALES[args.scale]
    out_dir = _study_dir(args)
    os.makedirs(out_dir, exist_ok=True)
    data = args.data or lm.default_data_dir(args.corpus, "bytes", scale["seq_len"])
    lm.ensure_data(
        argparse.Namespace(
            data=data,
            corpus=args.corpus,
            tokenizer="bytes",
            seq_len=scale["seq_len"],
            progress=args.progress,
        )
    )
    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, PerPositionLoss] = {}
    t0, worked = time.time(), False

    def minutes_left() -> float | None:  # None: no limit; <= 0: stop (once work was done)
        if args.time_limit is None:
            return None
        return args.time_limit - (time.time() - t0) / 60

    for name in args.models:
        run_dir = os.path.join(out_dir, name)
        eval_json = os.path.join(run_dir, "eval", "eval.json")
        previous = _results(run_dir)
        finished = previous is not None and not previous.get("time_limited")
        if not (args.skip_existing and finished):
            left = minutes_left()
            if left is not None and left <= 0 and worked:
                return _stopped(out_dir)
            print(f"=== {name}: training", flush=True)
            argv = _train_argv(args, scale, name, run_dir, data)
            if previous is None or previous.get("time_limited"):  # interrupted runs go on
                argv += ["--resume", "True"]
            if left is not None:
                argv += ["--time_limit", str(max(left, 1e-6))]
            worked = True
            if lm.main(argv).get("time_limited"):
                return _stopped(out_dir)
        if not (args.skip_existing and os.path.isfile(eval_json)):
            left = minutes_left()
            if left is not None and left <= 0 and worked:
                return _stopped(out_dir)
            worked = True
            print(f"=== {name}: evaluating", flush=True)
            lm.main(["eval", "--run", run_dir, "--length_factor", str(args.length_factor),
                     "--num_sequences", str(scale["num_sequences"]),
                     "--what", "perplexity", "per_position", "state_rank",
                     "--compilation_cache", str(args.compilation_cache)])  # fmt: skip
        with open(eval_json) as f:
            ev = json.load(f)
        with open(os.path.join(run_dir, "results.json")) as f:
            res = json.load(f)
        curves[name] = _per_position(run_dir)
        rows[name] = {
            "n_h": MODELS[name][0],
            "heads": MODELS[name][1],
            "params": res["params"],
            "steps": res["steps"],
            "tokens": res["tokens"],
            "val_loss": ev["perplexity"]["loss"],
            "val_ppl": ev["perplexity"]["perplexity"],
            "per_position": ev["per_position"]["mean_loss"],
            "state_rank": ev["state_rank"]["mean_per_layer"],
            "tokens_per_s": (res.get("throughput") or {}).get("tokens_per_s"),
        }
    plot_study_per_position(
        curves,
        os.path.join(out_dir, "per_position.png"),
        title=f"Per-position loss, trained at T={scale['seq_len']} ({args.scale} scale)",
    )
    _plot_val(out_dir, args.models)
    table = format_table(rows)
    summary = {"scale": args.scale, "settings": scale, "data": data, "models": rows}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    print(f"wrote {out_dir}/summary.md, per_position.png, val_loss.png", flush=True)
    return summary


def _study_dir(args: argparse.Namespace) -> str:
    return args.out_dir or os.path.join("runs", f"lm_study_{args.scale}")


def _per_position(run_dir: str):
    """The ``PerPositionLoss`` a model's evaluation wrote."""
    from dpjax.eval.per_position import PerPositionLoss

    return PerPositionLoss.load_json(os.path.join(run_dir, "eval", "per_position.json"))


def _results(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _stopped(out_dir: str) -> dict[str, Any]:
    print(
        f"time limit reached: the study in {out_dir} is incomplete; run the same command again "
        "to continue",
        flush=True,
    )
    return {"incomplete": True, "out_dir": out_dir}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: params, validation loss/ppl, per-position loss per training-length bucket,
    throughput."""
    buckets = list(next(iter(rows.values()))["per_position"]) if rows else []
    head = ["model", "n_h", "heads", "params", "val loss", "val ppl"]
    head += [f"loss@[{b})" for b in buckets] + ["tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        tps = r["tokens_per_s"]
        cells = [name, str(r["n_h"]), str(r["heads"]), f"{r['params'] / 1e6:.2f}M",
                 f"{r['val_loss']:.4f}", f"{r['val_ppl']:.3f}"]  # fmt: skip
        cells += [f"{r['per_position'][b]:.4f}" for b in buckets]
        cells.append("-" if tps is None else f"{tps:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study_per_position(curves, path: str, *, title: str, num_buckets: int = 32) -> None:
    """Two panels: bucketed per-position loss of every model (``{name: PerPositionLoss}``), and
    each model minus the first (the sequences are the same for all models, so content noise
    cancels in the difference)."""
    plot_seed_curves(
        {n: [c] for n, c in curves.items()}, path, title=title, num_buckets=num_buckets
    )


def _plot_val(out_dir: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        steps, losses = _val_curve(os.path.join(out_dir, name))
        ax.plot(steps, losses, marker="o", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "val_loss.png"), dpi=120)
    plt.close(fig)


def run_seeds(args: argparse.Namespace) -> dict[str, Any]:
    """``run_study`` once per seed of ``args.seeds`` (one time budget for all), then the mean and
    standard deviation over seeds of every table entry and of the per-position curves."""
    out_dir = _study_dir(args)
    deadline = None if args.time_limit is None else time.time() + 60 * args.time_limit
    summaries, curves = {}, {}
    for seed in args.seeds:
        left = None if deadline is None else (deadline - time.time()) / 60
        if left is not None and left <= 0:
            return _stopped(out_dir)
        seed_dir = os.path.join(out_dir, f"seed_{seed}")
        seed_args = argparse.Namespace(
            **{**vars(args), "seed": seed, "time_limit": left, "out_dir": seed_dir}
        )
        summary = run_study(seed_args)
        if summary.get("incomplete"):
            return _stopped(out_dir)
        summaries[seed] = summary
        for name in summary["models"]:
            curves.setdefault(name, []).append(_per_position(os.path.join(seed_dir, name)))
    table, stats = seed_table(summaries)
    result = {"scale": args.scale, "seeds": list(args.seeds), "models": stats}
    with open(os.path.join(out_dir, "summary_seeds.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "summary_seeds.md"), "w") as f:
        f.write(table + "\n")
    scale = SCALES[args.scale]
    plot_seed_curves(
        curves,
        os.path.join(out_dir, "per_position_seeds.png"),
        title=f"Per-position loss, trained at T={scale['seq_len']}, {len(args.seeds)} seeds "
        f"(mean ± std)",
    )
    print(table, flush=True)
    print(f"wrote {out_dir}/summary_seeds.md, per_position_seeds.png", flush=True)
    return result


def seed_table(summaries: dict[int, dict[str, Any]]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown table and statistics (mean, std over seeds) of validation loss and the
    per-position buckets, from each seed's ``run_study`` summary."""
    names = list(next(iter(summaries.values()))["models"])
    buckets = list(next(iter(summaries.values()))["models"][names[0]]["per_position"])
    stats: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [s["models"][name] for s in summaries.values()]
        entry = {"val_loss": [r["val_loss"] for r in rows]}
        entry |= {f"loss@[{b})": [r["per_position"][b] for r in rows] for b in buckets}
        stats[name] = {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
            for key, v in entry.items()
        }
    head = ["model", *next(iter(stats.values()))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in stats.items():
        cells = [f"{e['mean']:.4f} ± {e['std']:.4f}" for e in entry.values()]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines), stats


def plot_seed_curves(curves, path: str, *, title: str, num_buckets: int = 32) -> None:
    """``plot_study_per_position`` with several seeds per model (``{name: [PerPositionLoss]}``):
    mean curves with a ±1 std band where there are several seeds, and each model minus the first
    model, per seed, averaged (same sequences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    names = list(curves)
    per_seed = {n: np.stack([c.bucketed(num_buckets)[1] for c in curves[n]]) for n in names}
    x = curves[names[0]][0].bucketed(num_buckets)[0]
    for name in names:
        for ax, y in ((top, per_seed[name]), (bottom, per_seed[name] - per_seed[names[0]])):
            mean, std = y.mean(0), y.std(0)
            label = name if ax is top else f"{name} - {names[0]}"
            ax.plot(x, mean, marker=".", ms=3, label=label)
            if len(y) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    train_length = curves[names[0]][0].train_length
    for ax in (top, bottom):
        if train_length:
            ax.axvline(train_length, color="gray", ls="--", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("mean token loss (nats)")
    top.set_title(title)
    bottom.axhline(0.0, color="k", lw=0.8)
    bottom.set_ylabel(f"loss - {names[0]}")
    bottom.set_xlabel("position (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return run_seeds(args) if args.seeds else run_study(args)


if __name__ == "__main__":
    main(sys.argv[1:])
