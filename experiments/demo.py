"""CPU demo (a few minutes): on S3, DeltaProduct_2[-1,1] learns the group and extrapolates to
sequences 4x longer than it was trained on; DeltaProduct_1[-1,1] (DeltaNet) does not learn it.

    python experiments/demo.py            # writes runs/demo/{summary.md,comparison.png,...}

A scaled-down version of the paper's S3 experiment (SPEC §5, §9 item 6): train on length 32
instead of 128, test up to length 128 instead of 512, a smaller model (4 heads × 16, width 64
instead of 8 × 32, 128), 800 steps of 64 sequences (about 51k sequences seen), with a 100-step
warmup and gradient clipping (the paper has neither; they make this short run reliable: 4 of 4
seeds reach ≥ 0.85 at length 128, and without them 1 of 4). The two runs go in parallel, one
per CPU core, when the machine has at least 2 cores. XLA runs single-threaded in each run:
faster for a model this small, and the same numerics however the runs are scheduled. Each run
is an ordinary ``experiments/state_tracking.py`` run (``DEMO_FLAGS``), so ``--out_dir`` holds the
usual checkpoints, metrics, curves and plots per run, plus the sweep's ``summary.md``,
``summary.json`` and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import state_tracking as st  # noqa: E402
import state_tracking_sweep as sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

DEMO_FLAGS = [
    "--group",
    "S3",
    "--k",
    "32",
    "--k_test",
    "128",
    "--train_samples",
    "100000",
    "--test_samples",
    "500",
    "--batch_size",
    "64",
    "--epochs",
    "1",
    "--max_steps",
    "800",
    "--n_heads",
    "2",
    "--head_dim",
    "16",
    "--hidden_size",
    "64",
    "--lr",
    "3e-3",
    "--warmup_steps",
    "100",
    "--grad_clip",
    "1.0",
    "--use_scheduler",
    "True",
    "--param_dtype",
    "fp32",
    "--impl",
    "reference",
    "--eval_every",
    "200",
    "--target_acc",
    "None",
]
CELLS = ((2, "neg"), (1, "neg"))
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="runs/demo", help="demo directory")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (data and init)")
    p.add_argument(
        "--parallel",
        type=st.str2bool,
        default=(os.cpu_count() or 1) >= 2,
        help="run the two models at the same time, one CPU core each",
    )
    p.add_argument(
        "--rerun",
        type=st.str2bool,
        default=False,
        help="train again even if results exist in --out_dir",
    )
    return p


def _command(n_h: int, rng: str, seed: int, out_dir: str, progress: bool) -> list[str]:
    return [
        sys.executable,
        os.path.join(HERE, "state_tracking.py"),
        *DEMO_FLAGS,
        "--num_householder",
        str(n_h),
        "--allow_neg_eigval",
        str(sweep.EIG_RANGES[rng]),
        "--seed",
        str(seed),
        "--out_dir",
        out_dir,
        "--progress",
        str(progress),
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    # Single-threaded XLA in every run (parallel or not): faster for this small model, and the
    # same numerics whichever way the runs are scheduled.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    jobs = []
    for i, (n_h, rng) in enumerate(CELLS):
        d = sweep.run_dir(args.out_dir, "S3", n_h, rng, args.seed)
        if not args.rerun and os.path.exists(os.path.join(d, "results.json")):
            print(f"reusing {d} (pass --rerun True to train again)")
            continue
        os.makedirs(d, exist_ok=True)
        label = st.model_label(n_h, sweep.EIG_RANGES[rng])
        # With two parallel jobs, the first shows its progress bar; the second writes a log.
        foreground = i == 0 or not args.parallel
        log = None if foreground else open(os.path.join(d, "log.txt"), "w")  # noqa: SIM115
        print(
            f"training {label} -> {d}" + ("" if foreground else f" (log: {d}/log.txt)"), flush=True
        )
        proc = subprocess.Popen(
            _command(n_h, rng, args.seed, d, foreground),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
        )
        jobs.append((proc, log, label))
        if not args.parallel:
            proc.wait()
    for proc, log, label in jobs:
        if proc.wait() != 0:
            raise SystemExit(f"{label} failed (exit code {proc.returncode})")
        if log is not None:
            log.close()
    summaries = []
    for n_h, rng in CELLS:
        with open(
            os.path.join(sweep.run_dir(args.out_dir, "S3", n_h, rng, args.seed), "results.json")
        ) as f:
            summaries.append(json.load(f))
    table = sweep.write_summary(summaries, args.out_dir, [8, 16, 32, 64, 96, 128])
    print(
        "\nS3, trained on length 32, tested on 500 unseen sequences of length 128 "
        "(accuracy = fraction of sequences with every position <= t correct):\n"
    )
    print(table)
    acc = {s["num_householder"]: s["test/acc_at"] for s in summaries}
    ok = acc[2]["128"] >= 0.8 and acc[1]["32"] <= 0.1
    print(
        f"\nDeltaProduct_2[-1,1] at length 128 (4x the training length): {acc[2]['128']:.3f}; "
        f"DeltaProduct_1[-1,1] already at length 32: {acc[1]['32']:.3f} -> "
        + ("n_h=2 extrapolates, n_h=1 does not." if ok else "UNEXPECTED: effect not shown.")
    )
    print(
        f"plot: {os.path.join(args.out_dir, 'comparison.png')}; wall time {time.time() - t0:.0f}s"
    )
    return summaries


if __name__ == "__main__":
    main()
