"""A grid of state-tracking runs (group × n_h × eigenvalue range × seed) with one summary table
(markdown + JSON) and one comparison plot of accuracy vs length.

Grid flags are listed below; every other flag is passed to each run of
``experiments/state_tracking.py`` (see its ``--help``). Example, the paper's S3 table
(SPEC §9 item 6), 3 seeds::

    python experiments/state_tracking_sweep.py --groups S3 --num_householder 1 2 \\
        --eig_ranges neg pos --seeds 0 1 2 --out_dir runs/sweep_s3 -- \\
        --k 128 --k_test 512 --epochs 100 --batch_size 2048 --lr 1e-3

Outputs in ``--out_dir``: one sub-directory per run (skipped when its ``results.json`` exists,
so an interrupted sweep continues), ``summary.md``, ``summary.json``, ``comparison.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import state_tracking as st  # noqa: E402  (experiments/state_tracking.py)
from cli_types import float_or_none  # noqa: E402

from dpjax.eval.accuracy import AccuracyCurve  # noqa: E402

EIG_RANGES = {"neg": True, "pos": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Any other flag (after the grid flags, optionally after '--') is passed to every "
        "run of experiments/state_tracking.py.",
    )
    p.add_argument("--groups", nargs="+", default=["S3"], help="groups to run")
    p.add_argument("--num_householder", nargs="+", type=int, default=[1, 2], help="values of n_h")
    p.add_argument(
        "--eig_ranges",
        nargs="+",
        choices=sorted(EIG_RANGES),
        default=["neg"],
        help="neg = eigenvalues in [-1,1] (beta in (0,2)); pos = [0,1]",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[666], help="seeds per cell")
    p.add_argument("--out_dir", default="runs/state_tracking_sweep", help="sweep directory")
    p.add_argument(
        "--skip_existing",
        type=st.str2bool,
        default=True,
        help="reuse runs whose results.json exists",
    )
    p.add_argument(
        "--time_limit",
        type=float_or_none,
        default=None,
        help="minutes for the whole sweep: a run still going when they are spent stops at its "
        "next log point with a checkpoint, later cells are not started (each call trains at "
        "least one run), and the next call of the "
        "same command resumes the interrupted run and goes on (None: no limit)",
    )
    p.add_argument(
        "--table_lengths",
        nargs="+",
        type=int,
        default=None,
        help="lengths for the summary table (default 16..k_test, powers of two)",
    )
    return p


def run_dir(out_dir: str, group: str, n_h: int, rng: str, seed: int) -> str:
    return os.path.join(out_dir, f"{group}_nh{n_h}_{rng}_s{seed}")


def run_grid(sweep: argparse.Namespace, forwarded: list[str]) -> list[dict[str, Any]]:
    """Run (or reuse) every cell; returns the list of run summaries."""
    os.makedirs(sweep.out_dir, exist_ok=True)
    base = st.build_parser()
    summaries = []
    cells = list(
        itertools.product(sweep.groups, sweep.num_householder, sweep.eig_ranges, sweep.seeds)
    )
    t0, started = time.time(), False
    for i, (group, n_h, rng, seed) in enumerate(cells):
        d = run_dir(sweep.out_dir, group, n_h, rng, seed)
        previous = _load_results(d)
        if sweep.skip_existing and previous is not None and not previous.get("time_limited"):
            summaries.append(previous)
            print(f"[{i + 1}/{len(cells)}] reusing {d}", flush=True)
            continue
        limit = []
        if sweep.time_limit is not None:  # every call trains at least one run a little
            left = sweep.time_limit - (time.time() - t0) / 60
            if left <= 0 and started:
                print(f"time limit reached: {len(cells) - i} cell(s) not run yet", flush=True)
                break
            limit = ["--time_limit", str(max(left, 1e-6))]
        started = True
        # an interrupted run (time limit, or killed: checkpoints but no results) goes on
        interrupted = previous is None or bool(previous.get("time_limited"))
        resume = ["--resume", "True"] if interrupted else []
        what = "running" if previous is None else "resuming" if interrupted else "re-running"
        print(f"[{i + 1}/{len(cells)}] {what} {group} n_h={n_h} {rng} seed={seed} -> {d}")
        args = base.parse_args(
            [
                *forwarded,
                *limit,
                *resume,
                "--group",
                group,
                "--num_householder",
                str(n_h),
                "--allow_neg_eigval",
                str(EIG_RANGES[rng]),
                "--seed",
                str(seed),
                "--out_dir",
                d,
            ]
        )
        summaries.append(st.run(args))
    return summaries


def _load_results(run: str) -> dict | None:
    path = os.path.join(run, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _cell_key(s: dict) -> tuple:
    return (s["group"], s["label"])


def _load_curve(s: dict, name: str = "test") -> AccuracyCurve | None:
    path = os.path.join(s["out_dir"], f"curve_{name}.json")
    return AccuracyCurve.load_json(path) if os.path.exists(path) else None


def summary_markdown(summaries: list[dict], lengths: list[int] | None = None) -> str:
    """One row per run: accuracy at chosen lengths of the test curve, val accuracy, steps."""
    if not summaries:
        raise ValueError("summary_markdown: no runs")
    k_test = max(s["k_test"] for s in summaries)
    k = summaries[0]["k"]
    if lengths is None:
        lengths = sorted({n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= k_test} | {k})
    header = (
        ["group", "model", "seed", "steps", "val seq acc"]
        + [f"test acc@{n}" for n in lengths]
        + ["len(acc≥0.99)", "time (s)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in sorted(summaries, key=lambda s: (s["group"], s["label"], s["seed"])):
        curve = _load_curve(s)
        accs = [
            f"{curve.at(n):.3f}" if curve is not None and n < len(curve.accuracy) else "-"
            for n in lengths
        ]
        row = [
            s["group"],
            s["label"],
            str(s["seed"]),
            f"{s.get('steps', '-')}{' (stopped: time limit)' if s.get('time_limited') else ''}",
            f"{s.get('val/sequence_accuracy', float('nan')):.3f}",
            *accs,
            str(s.get("test/len_acc>=0.99", "-")),
            str(s.get("train_seconds", "-")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_comparison(summaries: list[dict], path: str) -> None:
    """Test accuracy vs length, one panel per group, mean over seeds with a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple, list[AccuracyCurve]] = defaultdict(list)
    for s in summaries:
        c = _load_curve(s)
        if c is not None:
            cells[_cell_key(s)].append(c)
    groups = sorted({g for g, _ in cells})
    if not groups:
        raise ValueError("plot_comparison: no test curves found")
    fig, axes = plt.subplots(
        1, len(groups), figsize=(6.0 * len(groups), 4.0), dpi=120, squeeze=False
    )
    for ax, group in zip(axes[0], groups, strict=True):
        for (g, label), curves in sorted(cells.items()):
            if g != group:
                continue
            n = min(len(c.accuracy) for c in curves)
            acc = np.stack([c.accuracy[:n] for c in curves])
            t = np.arange(1, n)
            (line,) = ax.plot(
                t,
                acc.mean(0)[1:],
                label=f"{label} ({len(curves)} seed{'s' if len(curves) > 1 else ''})",
            )
            if len(curves) > 1:
                ax.fill_between(
                    t, acc.min(0)[1:], acc.max(0)[1:], alpha=0.2, color=line.get_color()
                )
        k = next(
            (
                c.train_length
                for (g, _), cs in cells.items()
                if g == group
                for c in cs
                if c.train_length
            ),
            None,
        )
        if k:
            ax.axvline(k, color="gray", linestyle="--", linewidth=1, label="train length")
        ax.set_title(f"{group}: accuracy vs sequence length")
        ax.set_xlabel("sequence length t")
        ax.set_ylabel("accuracy (all positions ≤ t correct)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(summaries: list[dict], out_dir: str, lengths: list[int] | None = None) -> str:
    """Write summary.md, summary.json and comparison.png; returns the markdown table."""
    table = summary_markdown(summaries, lengths)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    plot_comparison(summaries, os.path.join(out_dir, "comparison.png"))
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep, forwarded = build_parser().parse_known_args(argv)
    forwarded = [a for a in forwarded if a != "--"]
    summaries = run_grid(sweep, forwarded)
    table = write_summary(summaries, sweep.out_dir, sweep.table_lengths)
    print(table)
    print(
        f"summary: {os.path.join(sweep.out_dir, 'summary.md')}, plot: "
        f"{os.path.join(sweep.out_dir, 'comparison.png')}"
    )
    return summaries


if __name__ == "__main__":
    main()
