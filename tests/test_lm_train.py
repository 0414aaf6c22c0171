"""Language-model training end to end on CPU: the loss falls, exact resume, evaluation and
generation from the checkpoint directory alone, FSDP + gradient accumulation on 8 simulated
devices matching 1 device."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from experiment_modules import load_experiment
from flax import nnx

from dpjax.data.text import prepare_text_shards
from dpjax.nn import DeltaProductLM, get_preset
from dpjax.train import lm_data, lm_step
from dpjax.train import mesh as mesh_lib
from dpjax.train.loop import TrainConfig, train
from dpjax.train.optimizer import OptimizerConfig

# a model small enough to compile and train in seconds on a CPU
SMALL = [
    "--preset",
    "tiny",
    "--hidden_size",
    "32",
    "--num_layers",
    "1",
    "--num_heads",
    "2",
    "--head_dim",
    "8",
    "--impl",
    "reference",
    "--compute_dtype",
    "fp32",
]


def load_cli():
    return load_experiment("language_model")


def train_losses(run_dir):
    """step -> train loss from metrics.jsonl (log_every 1)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_shards")
    prepare_text_shards("stdlib", out, 32, limit_files=30, val_fraction=0.2, progress=False)
    return str(out)


def train_argv(shards, out_dir, *extra):
    return [
        "train",
        *SMALL,
        "--data",
        shards,
        "--out_dir",
        str(out_dir),
        "--steps",
        "12",
        "--batch_size",
        "8",
        "--lr",
        "3e-3",
        "--warmup_steps",
        "2",
        "--log_every",
        "1",
        "--eval_every",
        "6",
        "--eval_rows",
        "8",
        "--progress",
        "False",
        "--tensorboard",
        "False",
        *extra,
    ]


def test_train_resume_eval_generate(shards, tmp_path, capsys):
    cli = load_cli()
    full = cli.main(train_argv(shards, tmp_path / "full"))
    losses = train_losses(tmp_path / "full")
    assert sorted(losses) == list(range(1, 13))
    assert (
        np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3
    )
    assert full["steps"] == 12 and np.isfinite(full["val_loss"])
    assert full["throughput"]["tokens_per_s"] > 0 and full["throughput"]["mfu"] is None  # CPU

    # interrupted at step 6, resumed: the same batches and bit-identical losses
    run = tmp_path / "resumed"
    cli.main(train_argv(shards, run, "--stop_at", "6"))
    assert sorted(os.listdir(run / "checkpoints")) == ["6"]
    cli.main(train_argv(shards, run, "--resume", "True"))
    resumed = train_losses(run)
    for s in range(7, 13):
        assert resumed[s] == losses[s], s

    # evaluation from the run directory: JSON + PNG, right shapes, finite values
    summary = cli.main(
        [
            "eval",
            "--run",
            str(run),
            "--max_rows",
            "8",
            "--num_sequences",
            "2",
            "--length_factor",
            "3",
            "--rank_length",
            "48",
            "--rank_every",
            "4",
        ]
    )
    files = sorted(os.listdir(run / "eval"))
    assert files == [
        "eval.json",
        "per_position.json",
        "per_position.png",
        "state_rank.json",
        "state_rank.png",
    ]
    assert np.isfinite(summary["perplexity"]["loss"]) and summary["step"] == 12
    pp = json.loads((run / "eval" / "per_position.json").read_text())
    assert len(pp["token_loss"]) == 96 and pp["train_length"] == 32 and pp["num_sequences"] == 2
    assert np.isfinite(pp["token_loss"]).all()
    assert list(summary["per_position"]["mean_loss"]) == ["0-32", "32-64", "64-96"]
    sr = json.loads((run / "eval" / "state_rank.json").read_text())
    assert np.asarray(sr["ranks"]["0"]).shape == (2, 12)  # [heads, positions]

    # generation from the checkpoint directory alone, greedy: deterministic, streamed
    capsys.readouterr()
    gen = [
        "generate",
        "--run",
        str(run / "checkpoints"),
        "--prompt",
        "import os\n",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
        "--stop_at_document_end",
        "False",
    ]
    text = cli.main(gen)
    printed = capsys.readouterr().out
    assert printed.startswith("import os\n") and text in printed
    assert cli.main(gen + ["--stream", "False"]) == text


def _loop_run(shards, mesh, **cfg):
    mcfg = get_preset(
        "tiny",
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=1,
        num_heads=2,
        head_dim=8,
        impl="chunked",
    )
    tcfg = TrainConfig(
        total_steps=5,
        log_every=1,
        progress=False,
        tensorboard=False,
        optimizer=OptimizerConfig(
            lr=3e-3, b2=0.95, weight_decay=0.01, grad_clip=1.0, warmup_steps=1
        ),
        **cfg,
    )
    data = lm_data.lm_dataset(shards, global_batch=16, seed=0, process_index=0, process_count=1)
    return train(
        tcfg,
        build_model=lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(0)),
        train_data=data,
        mesh=mesh,
        token_fn=lm_step.lm_token_fn("block", block=16),
        flops_per_token=1e6,
        peak_flops=1e12,
        rules=mesh_lib.default_rules(fsdp=cfg.get("fsdp", 1) > 1),
    )


def test_fsdp_and_accumulation_on_8_devices_match_1_device(shards):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices: JAX_NUM_CPU_DEVICES=8")
    one = _loop_run(shards, mesh_lib.make_mesh(devices=jax.devices()[:1]))
    eight = _loop_run(shards, mesh_lib.make_mesh(fsdp=2), fsdp=2, accum_steps=2)
    kernel = eight.state["params"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert "fsdp" in str(kernel.sharding.spec)  # parameters are sharded over the fsdp axis
    a = np.array([one.train_losses[s] for s in range(1, 6)])
    b = np.array([eight.train_losses[s] for s in range(1, 6)])
    np.testing.assert_allclose(b, a, rtol=2e-5)
    assert a[-1] < a[0]
    assert eight.throughput["mfu"] == pytest.approx(
        1e6 * eight.throughput["tokens_per_s"] / (8 * 1e12)
    )


def test_lm_study_time_limit_then_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("json/encoder.py", "textwrap.py", "shlex.py")):
        src = Path(os.__file__).parent / name
        (corpus / f"doc{i}.py").write_text(src.read_text(encoding="utf-8"))
    study = load_experiment("lm_study")
    argv = [
        "--scale", "smoke", "--models", "DeltaNet", "DeltaProduct_2", "--corpus", str(corpus),
        "--data", str(tmp_path / "data"), "--out_dir", str(tmp_path / "study"),
        "--impl", "reference", "--length_factor", "2", "--progress", "False",
    ]  # fmt: skip
    first = study.main([*argv, "--time_limit", "1e-9"])  # stops at DeltaNet's first log point
    assert first["incomplete"]
    dn = json.loads((tmp_path / "study" / "DeltaNet" / "results.json").read_text())
    assert dn["time_limited"] and dn["steps"] == 10
    assert not (tmp_path / "study" / "DeltaProduct_2").exists()
    done = study.main(argv)
    assert set(done["models"]) == {"DeltaNet", "DeltaProduct_2"}
    assert all(m["steps"] == 20 for m in done["models"].values())
    assert (tmp_path / "study" / "summary.md").is_file()


def test_lm_study_over_seeds(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("textwrap.py", "shlex.py")):
        src = Path(os.__file__).parent / name
        (corpus / f"doc{i}.py").write_text(src.read_text(encoding="utf-8"))
    study = load_experiment("lm_study")
    out = tmp_path / "study"
    result = study.main([
        "--scale", "smoke", "--models", "DeltaNet", "DeltaProduct_2", "--corpus", str(corpus),
        "--data", str(tmp_path / "data"), "--out_dir", str(out), "--impl", "reference",
        "--length_factor", "2", "--progress", "False", "--steps", "6", "--seeds", "0", "1",
    ])  # fmt: skip
    assert result["seeds"] == [0, 1]
    for seed in (0, 1):
        assert (out / f"seed_{seed}" / "summary.json").is_file()
    dn = result["models"]["DeltaNet"]["val_loss"]
    assert len(dn["values"]) == 2 and dn["values"][0] != dn["values"][1]  # seeds differ
    assert np.isclose(dn["mean"], np.mean(dn["values"]))
    assert (out / "summary_seeds.md").read_text().count("±") >= 2
    assert (out / "per_position_seeds.png").stat().st_size > 0
