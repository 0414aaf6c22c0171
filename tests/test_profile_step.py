"""experiments/profile_step.py: the Perfetto-trace summary on a hand-made trace, and one tiny
end-to-end profile of the state-tracking train step on the CPU."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest
from experiment_modules import load_experiment


@pytest.fixture(scope="module")
def prof():
    return load_experiment("profile_step")


def test_device_op_times_sums_gpu_tracks_only(prof, tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "PjitFunction(step)", "dur": 900.0},
        {"ph": "X", "pid": 7, "name": "dp_prepare", "dur": 10.0},
        {"ph": "X", "pid": 7, "name": "dp_prepare", "dur": 12.0},
        {"ph": "X", "pid": 7, "name": "input_scatter_fusion", "dur": 200.0},
        {"ph": "i", "pid": 7, "name": "marker"},
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    totals, total = prof.device_op_times(str(tmp_path))
    assert totals == {"dp_prepare": 22.0, "input_scatter_fusion": 200.0}
    assert total == 222.0
    with pytest.raises(FileNotFoundError, match="perfetto"):
        prof.device_op_times(str(tmp_path / "plugins" / "none"))


def test_profiles_a_tiny_state_tracking_step(prof, tmp_path):
    rec = prof.main(
        "--batch_size 8 --k 16 --eval_length 32 --eval_batch_size 8 --steps 2 --repeats 1 "
        f"--trace_steps 1 --impl chunked --top 5 --out {tmp_path}".split()
    )
    assert rec["step_ms"] > 0 and rec["train_compile_s"] > 0 and rec["eval_compile_s"] > 0
    assert 0 < len(rec["top_ops_ms_per_step"]) <= 5
    saved = json.loads((tmp_path / "profile_step.json").read_text())
    assert saved["step_ms"] == rec["step_ms"]
    with gzip.open(tmp_path / "train_step.hlo.txt.gz", "rt") as f:
        assert "HloModule" in f.read(200)
    assert set(rec["top_op_sources"]) <= {name for name, _ in rec["top_ops_ms_per_step"]}
    charged = sum(ms for _, ms, _ in rec["time_by_source"])
    assert charged == pytest.approx(rec["device_ms_per_step"], rel=1e-6)
    assert len(rec["all_ops_ms_per_step"]) >= len(rec["top_ops_ms_per_step"])


def test_fusion_sources_name_primitives_and_lines(prof):
    """A compiled fusion is traced to the primitives and the Python lines it was made of."""
    from hlo_sources import fusion_sources, op_key

    def loss(x, w):
        y = jnp.tanh(x @ w).astype(jnp.bfloat16)  # the line the fusions must point at
        return jnp.sum(y.astype(jnp.float32) ** 2)

    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
    sources = fusion_sources(hlo)
    assert sources and all(isinstance(v, list) for v in sources.values())
    line = loss.__code__.co_firstlineno + 1
    described = " ".join(d for v in sources.values() for d in v)
    assert f"test_profile_step.py:{line} (" in described and "loss)" in described
    assert "tanh" in described or "dot_general" in described
    assert op_key("input_convert_reduce_fusion.95") == "input_convert_reduce_fusion_95"


def test_profile_without_eval_step(prof, tmp_path):
    rec = prof.main(
        "--batch_size 8 --k 16 --eval_length 0 --steps 1 --repeats 1 --trace_steps 1 "
        f"--impl chunked --top 3 --out {tmp_path}".split()
    )
    assert "eval_compile_s" not in rec and rec["step_ms"] > 0


def test_time_is_charged_to_source_files(prof):
    """Each op goes to the file most of its instructions came from; kernels by name."""
    from hlo_sources import home_file

    entries = [
        "mul @ dpjax/nn/conv.py:60 (conv_silu) x4",
        "add @ dpjax/nn/norms.py:30 (__call__) x3",
        "exp @ dpjax/nn/norms.py:31 (__call__) x2",
    ]
    assert home_file(entries) == "dpjax/nn/norms.py"
    assert home_file(["convert_element_type"]) is None
    per_step = {
        "dp_prepare": 1.0,
        "dp_bwd_wy": 2.0,
        "short_conv_bwd": 0.5,
        "short_conv_fwd": 0.25,
        "loop_add_fusion_3": 4.0,
        "nvjet_sm90_tst": 3.0,
    }
    sources = {"loop_add_fusion_3": entries}
    rows = prof.time_by_source(per_step, sources)
    assert rows[0] == ("dpjax/nn/norms.py", 4.0, 1)
    assert ("pallas_kernels (DeltaProduct op)", 3.0, 2) in rows
    assert ("(no source: nvjet)", 3.0, 1) in rows
    assert ("pallas_kernels/short_conv.py", 0.75, 2) in rows
    assert sum(r[1] for r in rows) == sum(per_step.values())
