"""experiments/state_tracking.py and the sweep: --help lists every flag, boolean parsing, and a
two-step end-to-end run of the real model (train, outputs, resume, --eval_only, sweep summary)."""

import json
import os
import subprocess
import sys

import pytest
from experiment_modules import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")

PAPER_FLAGS = [
    "--group",
    "--k",
    "--k_test",
    "--n_layers",
    "--epochs",
    "--allow_neg_eigval",
    "--num_householder",
    "--batch_size",
    "--seed",
    "--lr",
    "--n_heads",
    "--use_scheduler",
]
PAPER_COMMAND = (
    "--group S3 --k 128 --k_test 512 --n_layers 1 --epochs 100 --allow_neg_eigval True "
    "--num_householder 2 --batch_size 2048 --seed 666 --lr 1e-3 --n_heads 8 --use_scheduler True"
)
OUR_FLAGS = [
    "--train_samples",
    "--test_samples",
    "--out_dir",
    "--impl",
    "--param_dtype",
    "--checkpoint_every",
    "--resume",
    "--target_acc",
    "--eval_every",
]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def st():
    return load_experiment("state_tracking")


def test_help_lists_and_explains_every_flag(st):
    parser = st.build_parser()
    text = parser.format_help()
    for flag in PAPER_FLAGS + OUR_FLAGS:
        assert flag in text, flag
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 5, action.dest
    out = subprocess.run(
        [sys.executable, os.path.join(EXP, "state_tracking.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "--allow_neg_eigval" in out.stdout and "--use_scheduler" in out.stdout


def test_paper_command_parses(st):
    args = st.build_parser().parse_args(PAPER_COMMAND.split())
    assert args.allow_neg_eigval is True and args.use_scheduler is True and args.k_test == 512
    dcfg = st.data_config(args)
    tcfg = st.train_config(args, dcfg, "/tmp/x")
    assert tcfg.total_steps == 4833  # 100 * 99,000 // 2048 (batches straddle epochs)
    assert tcfg.optimizer.weight_decay == 1e-6 and tcfg.optimizer.schedule == "cosine"
    assert tcfg.early_stop_metric == "test/sequence_accuracy" and tcfg.early_stop_target == 0.99
    args = st.build_parser().parse_args(
        ["--allow_neg_eigval", "false", "--use_scheduler", "0", "--target_acc", "None"]
    )
    assert args.allow_neg_eigval is False and args.use_scheduler is False
    assert st.train_config(args, st.data_config(args), "/tmp/x").early_stop_metric is None
    with pytest.raises(SystemExit):
        st.build_parser().parse_args(["--allow_neg_eigval", "maybe"])
    assert st.model_label(2, True) == "DeltaProduct_2[-1,1]"
    assert st.model_label(1, False, 3) == "DeltaProduct_1[0,1] x3L"


TINY = [
    "--group",
    "S3",
    "--k",
    "6",
    "--k_test",
    "12",
    "--train_samples",
    "256",
    "--test_samples",
    "16",
    "--batch_size",
    "64",
    "--epochs",
    "1",
    "--n_heads",
    "2",
    "--head_dim",
    "8",
    "--hidden_size",
    "16",
    "--param_dtype",
    "fp32",
    "--impl",
    "reference",
    "--progress",
    "False",
    "--max_steps",
    "2",
    "--eval_every",
    "1",
    "--target_acc",
    "None",
    "--eval_batch_size",
    "16",
]


@pytest.fixture(scope="module")
def nn_available():
    try:
        import dpjax.nn  # noqa: F401
    except ImportError as err:  # pragma: no cover - until the model lands
        pytest.skip(f"dpjax.nn not importable: {err}")


@pytest.fixture(scope="module")
def tiny_run(st, nn_available, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "S3_nh2_neg_s0")  # the sweep's layout
    return out, st.main([*TINY, "--out_dir", out, "--checkpoint_every", "1", "--seed", "0"])


def test_end_to_end_tiny_run_resume_and_eval_only(st, tiny_run, capsys):
    out, summary = tiny_run
    assert summary["steps"] == 2 and summary["label"] == "DeltaProduct_2[-1,1]"
    for f in (
        "config.json",
        "metrics.jsonl",
        "curve_val.json",
        "curve_test.json",
        "accuracy_vs_length.png",
        "results.json",
    ):
        assert os.path.exists(os.path.join(out, f)), f
    curve = _read_json(os.path.join(out, "curve_test.json"))
    assert len(curve["accuracy"]) == 13 and curve["train_length"] == 6
    assert summary["val/loss"] > 0
    # --resume on a finished run trains no further; --eval_only rebuilds from the checkpoint
    again = st.main([*TINY, "--out_dir", out, "--resume", "True", "--seed", "0"])
    assert again["steps"] == 2
    assert again["test/loss"] == pytest.approx(summary["test/loss"], rel=1e-5)
    assert "resumed from step 2" in capsys.readouterr().out
    ev = st.main([*TINY, "--out_dir", out, "--eval_only", "True"])
    assert "| DeltaProduct_2[-1,1] (test) |" in capsys.readouterr().out
    assert ev["test/sequence_accuracy"] == pytest.approx(summary["test/sequence_accuracy"])
    assert ev["test/loss"] == pytest.approx(summary["test/loss"], rel=1e-5)


def test_sweep_help_and_summary(tiny_run):
    sweep = load_experiment("state_tracking_sweep")
    text = sweep.build_parser().format_help()
    for flag in ("--groups", "--num_householder", "--eig_ranges", "--seeds", "--out_dir"):
        assert flag in text
    run_dir, summary = tiny_run
    out = os.path.dirname(run_dir)
    # a second, hand-made finished run (n_h=1) next to the real one: the sweep reuses both
    other = os.path.join(out, "S3_nh1_neg_s0")
    os.makedirs(other)
    fake = dict(summary, label="DeltaProduct_1[-1,1]", num_householder=1, out_dir=other)
    _write_json(os.path.join(other, "results.json"), fake)
    curve = _read_json(os.path.join(run_dir, "curve_test.json"))
    curve["accuracy"] = [1.0] + [0.0] * (len(curve["accuracy"]) - 1)
    _write_json(os.path.join(other, "curve_test.json"), curve)
    summaries = sweep.main(
        [
            "--groups",
            "S3",
            "--num_householder",
            "1",
            "2",
            "--eig_ranges",
            "neg",
            "--seeds",
            "0",
            "--out_dir",
            out,
            "--",
            *TINY,
        ]
    )
    assert [s["label"] for s in summaries] == ["DeltaProduct_1[-1,1]", "DeltaProduct_2[-1,1]"]
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert "| S3 | DeltaProduct_1[-1,1] | 0 | 2 |" in md and "DeltaProduct_2[-1,1]" in md
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000
    assert len(_read_json(os.path.join(out, "summary.json"))) == 2


def test_sweep_time_limit_stops_then_resumes(nn_available, tmp_path):
    sweep = load_experiment("state_tracking_sweep")
    grid = ["--groups", "S3", "--num_householder", "1", "2", "--seeds", "0"]
    run = [*TINY, "--epochs", "2", "--max_steps", "4", "--log_every", "1"]
    first = sweep.main([*grid, "--out_dir", str(tmp_path), "--time_limit", "1e-9", "--", *run])
    # the first cell stops at its first log point, the second is not started
    assert len(first) == 1 and first[0]["time_limited"] and first[0]["steps"] == 1
    assert not os.path.exists(tmp_path / "S3_nh2_neg_s0")
    assert "1 (stopped: time limit)" in (tmp_path / "summary.md").read_text()
    second = sweep.main([*grid, "--out_dir", str(tmp_path), "--", *run])
    assert [s["steps"] for s in second] == [4, 4]
    assert not any(s["time_limited"] for s in second)
    metrics = (tmp_path / "S3_nh1_neg_s0" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics if "train/loss" in line]
    assert steps == [1, 2, 3, 4]  # resumed at step 2, not restarted
