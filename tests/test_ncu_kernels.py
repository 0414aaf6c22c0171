"""experiments/ncu_kernels.py: the summary of recorded Nsight Compute reports (an H100's, in
docs/data/h100_2026-12-07d/) and the program ncu wraps, on the CPU."""

import json
import os

import pytest
from experiment_modules import ROOT, load_experiment

RECORDS = os.path.join(ROOT, "docs", "data", "h100_2026-12-07d")
BEFORE = [
    f"{RECORDS}/ncu_state_passes_before.txt",
    f"{RECORDS}/ncu_state_passes_before_source.csv.gz",
]
AFTER = [f"{RECORDS}/ncu_op_after.txt", f"{RECORDS}/ncu_op_after_source.csv.gz"]


def _load():
    return load_experiment("ncu_kernels")


def test_summary_finds_the_synchronous_dv_out_load(tmp_path):
    """The reverse state pass before the change had 4 synchronous loads executed in its loop
    (``dv_out``), the forward pass none; after it, no kernel of the op has one. Durations,
    occupancy, stall shares as ncu printed them."""
    ncu = _load()
    before = ncu.summarize(*BEFORE)
    assert [k["name"] for k in before] == ["dp_bwd_state_pass", "dp_state_pass"]
    assert before[0]["duration_us"] == pytest.approx(432.70)
    assert before[0]["registers"] == 255 and before[0]["shared_kb"] == pytest.approx(152.06)
    assert before[0]["sync_loads_in_loop"] == 4 and before[1]["sync_loads_in_loop"] == 0
    assert max(before[0]["stalls"], key=before[0]["stalls"].get) == "long_sb"
    assert before[0]["stalls"]["long_sb"] == pytest.approx(43.3, abs=0.1)

    ncu.main(["summarize", *AFTER, "--out", str(tmp_path)])
    after = json.loads((tmp_path / "ncu_summary.json").read_text())
    names = [k["name"] for k in after]
    assert names == [
        "dp_bwd_dv_out",
        "dp_bwd_state_pass",
        "dp_state_pass",
        "dp_bwd_output",
        "dp_bwd_state_adjoint",
        "dp_bwd_wy",
    ]
    assert all(k["sync_loads_in_loop"] == 0 for k in after)
    assert after[1]["duration_us"] == pytest.approx(302.72)
    assert after[4]["dram_tbps"] == pytest.approx(2.90)
    for k in after:
        assert 0 < sum(k["stalls"].values()) <= 100.0 + 1e-6, k["name"]
        assert k["grid"][0] > 0 and k["block"] == [128, 1, 1]
    table = (tmp_path / "ncu_summary.md").read_text()
    assert table.count("\n| dp_") == 6


def test_summary_refuses_pages_of_different_reports():
    ncu = _load()
    with pytest.raises(ValueError, match="has 2 kernel launches but .* has 6"):
        ncu.summarize(BEFORE[0], AFTER[1])
    with pytest.raises(SystemExit, match="no kernel launches found"):
        ncu.main(["summarize", os.path.join(ROOT, "README.md")])


def test_run_does_one_forward_and_backward(capsys):
    """The program ncu wraps, at a small case (interpret mode on the CPU)."""
    _load().main(["run", "--case", "1,64,2,16,16,2", "--gated"])
    assert (
        "ran one forward + backward at B=1 T=64 H=2 K=16 V=16 n_h=2 gated"
        in capsys.readouterr().out
    )


def test_run_takes_a_backward_variant(capsys, monkeypatch):
    """``--bwd-variant`` sets BackwardConfig fields for the run (here the merged adjoint kernel,
    seen through a spy on it); an unknown field is an error naming it."""
    from dpjax.ops import pallas as dp_pallas
    from pallas_kernels import backward as kernel_backward

    monkeypatch.setattr(dp_pallas, "backward_config_for", dp_pallas.backward_config_for)
    calls = []
    merged = kernel_backward.chunk_adjoint
    monkeypatch.setattr(
        kernel_backward, "chunk_adjoint", lambda *a, **kw: calls.append(1) or merged(*a, **kw)
    )
    ncu = _load()
    ncu.main(["run", "--case", "1,64,2,16,16,2", "--bwd-variant", "merged_adjoint=True"])
    assert calls and "ran one forward + backward" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no_such_field"):
        ncu.main(["run", "--case", "1,64,2,16,16,1", "--bwd-variant", "no_such_field=1"])
