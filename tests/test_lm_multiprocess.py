"""Two processes on 127.0.0.1 (JAX's distributed runtime, 2 CPU devices each) train with the
same losses as one process, and their checkpoint restores in one process: resumed training
(same batches), and generation."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_lm_train import SMALL, load_cli, train_losses

from dpjax.data.text import prepare_text_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_mp_shards")
    prepare_text_shards("stdlib", out, 32, limit_files=30, val_fraction=0.2, progress=False)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv(shards, out_dir, *extra):
    return [
        "train",
        *SMALL,
        "--data",
        shards,
        "--out_dir",
        str(out_dir),
        "--steps",
        "6",
        "--batch_size",
        "8",
        "--lr",
        "3e-3",
        "--warmup_steps",
        "1",
        "--log_every",
        "1",
        "--eval_every",
        "3",
        "--eval_rows",
        "8",
        "--progress",
        "False",
        "--tensorboard",
        "False",
        *extra,
    ]


def test_two_processes_match_one_and_restore_in_one(shards, tmp_path):
    cli = load_cli()
    one = tmp_path / "one"
    cli.main(argv(shards, one))  # this process: 8 simulated devices
    ref = train_losses(one)

    two = tmp_path / "two"
    port = free_port()
    env = dict(
        os.environ,
        JAX_NUM_CPU_DEVICES="2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    script = os.path.join(ROOT, "experiments", "language_model.py")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                *argv(shards, two, "--stop_at", "3"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0] and "4 device(s)" in outs[0]
    data_state = sorted(
        f for f in os.listdir(two / "checkpoints" / "3" / "data") if f.endswith(".json")
    )
    assert data_state == ["process_0-of-2.json", "process_1-of-2.json"]
    first = train_losses(two)
    assert sorted(first) == [1, 2, 3]
    for s in (1, 2, 3):
        assert first[s] == pytest.approx(ref[s], rel=2e-5), s

    # the 2-process checkpoint resumes in this one process and continues with the same batches
    cli.main(argv(shards, two, "--resume", "True"))
    resumed = train_losses(two)
    np.testing.assert_allclose(
        [resumed[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)], rtol=2e-5
    )
    text = cli.main(
        [
            "generate",
            "--run",
            str(two),
            "--step",
            "3",
            "--prompt",
            "x = ",
            "--max_new_tokens",
            "4",
            "--temperature",
            "0",
            "--stream",
            "False",
        ]
    )
    assert isinstance(text, str)
