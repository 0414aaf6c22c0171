"""experiments/bench_op.py on the CPU (interpret mode): every timing path runs at a shape the
kernels must pad (T not a multiple of 64, V not a power of two) and writes finite records."""

import json
import math

import pytest
from experiment_modules import load_experiment


def _load():
    return load_experiment("bench_op")


def _run(bench, tmp_path, flags: str) -> dict:
    """``bench_op.main`` at a shape the kernels must pad; returns the saved bench_op.json."""
    bench.main(f"--case 1,70,2,32,20,2 --no-chunked --repeats 1 {flags} --out {tmp_path}".split())
    return json.loads((tmp_path / "bench_op.json").read_text())


def test_bench_op_stages_and_tuning_at_a_padded_shape(tmp_path):
    saved = _run(_load(), tmp_path, "--stages --bwd-stages --tune --bwd-tune")
    kinds = {r["kind"] for r in saved["records"]}
    assert {"op", "stage", "tune", "bwd_tune", "floor"} <= kinds, kinds
    stages = {r["stage"] for r in saved["records"] if r["kind"] == "stage"}
    assert {"prepare", "state_pass", "output", "bwd_state_pass", "bwd_merged", "bwd_wy"} <= stages
    tuned = {r["stage"] for r in saved["records"] if r["kind"] == "bwd_tune"}
    # the separate stages the default merges or leaves out are tuned too
    assert {"bwd_output", "bwd_state_adjoint", "bwd_dv_out", "bwd_merged"} <= tuned, tuned
    assert "bwd_chunk_grads" in tuned, tuned
    # every variant of the tune spaces ran (one that fails is only logged and left out)
    bench = load_experiment("bench_op")
    for kind, space in (("tune", bench.TUNE_SPACE), ("bwd_tune", bench.BWD_TUNE_SPACE)):
        for stage, variants in space.items():
            ran = [r for r in saved["records"] if r["kind"] == kind and r["stage"] == stage]
            assert len(ran) == len(variants), (kind, stage, len(ran), len(variants))
    timed = [r for r in saved["records"] if "ms" in r]
    assert timed and all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in timed)
    assert (tmp_path / "bench_op.md").read_text().count("|") > 10


def test_bench_op_times_backward_variants_side_by_side(tmp_path):
    bench = _load()
    flags = "--bwd-variant grad_dtype=input --bwd-variant wy_warps=8,grad_dtype=input"
    flags += " --variant state_stored_wu=True,state_stored_w=True"
    saved = _run(bench, tmp_path, flags)
    ops = {(r["impl"], r["mode"]) for r in saved["records"] if r["kind"] == "op"}
    assert ("pallas", "fwdbwd") in ops and ("pallas[grad_dtype=input]", "fwdbwd") in ops, ops
    assert ("pallas[wy_warps=8,grad_dtype=input]", "fwdbwd") in ops, ops
    assert ("pallas[grad_dtype=input]", "fwd") not in ops  # same forward kernels
    stored = "pallas[fwd:state_stored_wu=True,state_stored_w=True]"
    assert (stored, "fwd") in ops and (stored, "fwdbwd") in ops, ops
    assert bench.config_fields("grad_dtype=input,wy_block=32") == {
        "grad_dtype": "input",
        "wy_block": 32,
    }
    with pytest.raises(ValueError, match="no_such_field"):
        bench.config_fields("no_such_field=1")
    assert bench.split_fields("state_stored_wu=True,state_stored_w=True,out_warps=8") == (
        {"state_stored_wu": True, "out_warps": 8},
        {"state_stored_w": True},
    )
    with pytest.raises(ValueError, match="BackwardConfig FIELD=VALUE, got 'bogus=1'"):
        bench.split_fields("out_warps=8,bogus=1")
