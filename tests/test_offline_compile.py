"""experiments/offline_compile.py on the CPU: the op's kernels lowered for the GPU, their Triton
IR extracted and read back as text, and the ``ptxas -v`` log parsed (the compile itself needs pip
Triton in a separate Python: not in CI)."""

import json
import re

import pytest
from experiment_modules import load_experiment

SMALL = "1,128,96,32,32,2"  # 96 programs per state pass: no automatic sequence split
FP32_DOT = re.compile(r"tt\.dot .*: tensor<\w+xf32> \* tensor<\w+xf32>")  # a TF32 product


def _load():
    return load_experiment("offline_compile")


def test_escaped_bytecode_round_trips():
    oc = _load()
    raw = bytes(range(256))
    escaped = "".join(
        {0x5C: "\\\\", 0x22: '\\"'}.get(b, chr(b) if 32 <= b < 127 else f"\\{b:02X}") for b in raw
    )
    assert oc.unescape(escaped) == raw
    text = f'x ir = "{escaped}", name = "dp_k", num_stages = 2, num_warps = 4 y'
    (kernel,) = oc.extract_kernels(text)
    assert kernel == {"name": "dp_k", "num_warps": 4, "num_stages": 2, "bytecode": raw}
    with pytest.raises(ValueError, match="without \\['num_stages'\\]"):
        oc.extract_kernels('ir = "ab", name = "dp_k", num_warps = 4')


def test_every_kernel_of_the_op_is_lowered_and_read_back(tmp_path):
    """The forward's three kernels, then the backward's (n_h = 2: reverse pass, merged adjoint,
    WY adjoint), each as TTIR text with its launch parameters; a variant's field reaches the
    kernels (the 16-bit chain has no TF32 product)."""
    oc = _load()
    kernels = oc.extract_kernels(oc.lower_op(SMALL, gated=True, bwd_variant=None))
    names = [k["name"] for k in kernels]
    assert names == [
        "dp_prepare",
        "dp_state_pass",
        "dp_output",
        "dp_bwd_state_pass",
        "dp_bwd_chunk_adjoint",
        "dp_bwd_wy",
    ]
    reverse = oc.bytecode_to_text(kernels[3]["bytecode"])
    assert "tt.func" in reverse and FP32_DOT.search(reverse)
    sixteen_bit = oc.extract_kernels(oc.lower_op(SMALL, gated=True, bwd_variant="state_dots=input"))
    assert not FP32_DOT.search(oc.bytecode_to_text(sixteen_bit[3]["bytecode"]))

    oc.main(["--case", SMALL, "--kernels", "bwd_state", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "offline_compile.json").read_text())
    assert [k["name"] for k in saved["kernels"]] == ["dp_bwd_state_pass"]
    assert "tt.func" in (tmp_path / "0_dp_bwd_state_pass.ttir").read_text()
    with pytest.raises(SystemExit, match="no kernel of the lowered op matches"):
        oc.main(["--case", SMALL, "--kernels", "nothing", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--case: expected B,T,H,K,V,N_H"):
        oc.main(["--case", "1,128,2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--bwd-variant: .*FIELD=VALUE, got 'no_such=1'"):
        oc.main(["--case", SMALL, "--bwd-variant", "no_such=1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--triton-python: .* is not an executable Python"):
        oc.main(["--case", SMALL, "--triton-python", str(tmp_path / "none")])


def test_ptxas_log_and_ptx_counts():
    oc = _load()
    log = (
        "ptxas info    : Function properties for k\n"
        "    2120 bytes stack frame, 2536 bytes spill stores, 2612 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 2120 bytes cumulative stack size\n"
    )
    assert oc.parse_ptxas(log) == {
        "registers": 255,
        "spill_stores": 2536,
        "spill_loads": 2612,
        "stack_frame": 2120,
    }
    ptx = (
        "wgmma.mma_async.x\nwgmma.mma_async.y\nwgmma.wait_group.sync 0;\nbar.sync 0;\n"
        "cp.async.cg.shared.global [a], [b];\ncp.async.commit_group;\nld.global.v4.b32 x;"
    )
    assert oc.count_ptx(ptx) == {
        "wgmma": 2,
        "wgmma_waits": 1,
        "mma_sync": 0,
        "barriers": 1,
        "async_copies": 1,
        "global_loads": 1,
    }
    row = {"name": "dp_k", "num_warps": 4, "num_stages": 1, **oc.parse_ptxas(log)}
    row |= {"shared_kb": 144.0, **oc.count_ptx(ptx)}
    table = oc.markdown([row, {"name": "dp_p", "num_warps": 4, "num_stages": 1, "error": "x"}])
    assert "| dp_k | 4 | 1 | 255 | 2536 / 2612 | 2120 | 144.0 | 2 | 1 | 0 | 1 | 1 | 1 |" in table
    assert "| dp_p | 4 | 1 | failed: x |" in table
