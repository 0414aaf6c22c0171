"""Compile the op's Triton kernels for an H100 without a GPU: registers, spills, shared memory.

JAX lowers the op's forward + backward (``impl="pallas"``, ``grad`` of ``<o, do>``) under an
abstract CUDA device, so every ``dp_*`` kernel's Triton IR (TTIR) sits in the lowered text as
MLIR bytecode, with its ``num_warps`` and ``num_stages``. This script

1. lowers the op at ``--case`` with the ``BackwardConfig`` of ``--bwd-variant`` (no GPU: the
   kernels are lowered for the GPU, not interpreted);
2. writes each kernel's TTIR as text (``<out>/<index>_<name>.ttir``), read back with JAX's own
   MLIR and Triton dialect;
3. with ``--triton-python`` (a Python that has pip ``triton``, e.g. 3.6, in its own virtual
   environment: JAX's Triton dialect and pip Triton do not share one), compiles each TTIR for
   sm_90 with that Triton and its ``ptxas -v``, and reports per kernel: registers, spilled
   bytes, stack frame, shared memory, and the PTX's ``wgmma`` issues, ``wgmma.wait_group``
   waits and ``bar.sync`` barriers (``<out>/offline_compile.md`` and ``.json``; the TTGIR and
   PTX beside the TTIR).

The compile is pip Triton's, not the one inside jaxlib that a GPU run uses, so its register
counts can differ (docs/BENCHMARKS.md, "2026-12-07 (fourth session)"), and spills read offline
do not predict speed: time on a GPU before changing a default. What it does tell without a GPU:
whether a kernel compiles past Triton's lowering to PTX, and how its products are scheduled.

Examples::

    python experiments/offline_compile.py --help
    python experiments/offline_compile.py --case 4,4096,8,128,128,3 --out /tmp/oc
    python -m venv /tmp/tri && /tmp/tri/bin/pip install triton==3.6.0
    python experiments/offline_compile.py --case 4,4096,8,128,128,3 \\
        --bwd-variant state_dots=tf32 --kernels bwd_state_pass --triton-python /tmp/tri/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys

# the lowered text's Triton calls: `ir = "<escaped bytecode>"` followed by the call's attributes
IR_START = 'ir = "'
ESCAPES = {"\\": 0x5C, '"': 0x22, "n": 0x0A, "t": 0x09}
PTX_COUNTS = {  # key -> the PTX instruction's pattern (a regular expression)
    "wgmma": r"wgmma\.mma_async",
    "wgmma_waits": r"wgmma\.wait_group",
    "mma_sync": r"mma\.sync",
    "barriers": r"bar\.sync",
    "async_copies": r"cp\.async\.c[ag]\.shared",  # tiles copied ahead (pipelined loads)
    "global_loads": r"ld\.global",  # loads into registers (a pipelined load is a copy)
}
COMPILE_ONE = "--compile-one"  # first argument of the internal call in --triton-python's Python
PTXAS_FIELDS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_frame": r"(\d+) bytes stack frame",
}


def unescape(text: str) -> bytes:
    """The bytes of an MLIR string attribute's body (``\\XX`` hex escapes, ``\\n``, ``\\"``)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] != "\\":
            j = text.find("\\", i)
            j = len(text) if j < 0 else j
            out += text[i:j].encode()
            i = j
        elif text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
    return bytes(out)


def extract_kernels(lowered: str) -> list[dict]:
    """Each Triton call of a lowered module: ``name``, ``num_warps``, ``num_stages`` and the
    TTIR ``bytecode``, in launch order."""
    kernels = []
    pos = lowered.find(IR_START)
    while pos >= 0:
        start = end = pos + len(IR_START)
        while lowered[end] != '"':
            end += 2 if lowered[end] == "\\" else 1
        attrs = lowered[end : end + 400]
        fields = {
            key: re.search(pattern, attrs)
            for key, pattern in (
                ("name", r'name = "([^"]*)"'),
                ("num_warps", r"num_warps = (\d+)"),
                ("num_stages", r"num_stages = (\d+)"),
            )
        }
        missing = [key for key, match in fields.items() if match is None]
        if missing:
            raise ValueError(f"a Triton call without {missing} in the lowered text: {attrs!r}")
        kernels.append(
            {
                "name": fields["name"].group(1),
                "num_warps": int(fields["num_warps"].group(1)),
                "num_stages": int(fields["num_stages"].group(1)),
                "bytecode": unescape(lowered[start:end]),
            }
        )
        pos = lowered.find(IR_START, end)
    return kernels


def bytecode_to_text(bytecode: bytes) -> str:
    """TTIR text of a kernel's MLIR bytecode, parsed with JAX's MLIR and its Triton dialect."""
    import jax._src.pallas.triton.lowering  # noqa: F401  (registers the dialects it uses)
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as triton_dialect

    context = ir.Context()
    triton_dialect.register_dialect(context)
    context.allow_unregistered_dialects = True
    with context:
        module = ir.Module.parse(bytecode)
        return module.operation.get_asm(print_generic_op_form=False)


@contextlib.contextmanager
def lowered_for_the_gpu():
    """Run the op's kernels lowered for the GPU (not in interpret mode) on a machine without one,
    under an abstract H100."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels import backward, forward

    saved = forward.default_interpret, backward.default_interpret
    forward.default_interpret = backward.default_interpret = lambda: False
    device = AbstractDevice("NVIDIA H100 80GB HBM3", 1, "cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            yield
    finally:
        forward.default_interpret, backward.default_interpret = saved


def lower_op(case: str, gated: bool, bwd_variant: str | None) -> str:
    """The lowered text of the op's jitted forward + backward at ``case`` (``B,T,H,K,V,N_H``),
    bf16, with ``BackwardConfig`` fields ``bwd_variant`` (``"FIELD=VALUE[,FIELD=VALUE]"``)
    changed from the default."""
    import jax
    from bench_op import OP_ARGS, backward_variant, make_inputs, op_fns, parse_case

    from dpjax.ops import pallas as dp_pallas

    c = parse_case(case + (",gated" if gated else ""))
    shapes = jax.eval_shape(lambda: make_inputs(c, seed=0))  # the benchmark's inputs, abstract
    args = tuple(shapes[n] for n in OP_ARGS)
    _, fwd_bwd = op_fns(dp_pallas.forward, c)
    with backward_variant(bwd_variant), lowered_for_the_gpu():
        return fwd_bwd.trace(*args).lower().as_text()


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, spilled bytes and stack frame from ``ptxas -v``'s log (0 where absent)."""
    out = {}
    for key, pattern in PTXAS_FIELDS.items():
        match = re.search(pattern, log)
        out[key] = int(match.group(1)) if match else 0
    return out


def count_ptx(ptx: str) -> dict[str, int]:
    """How often each instruction of ``PTX_COUNTS`` appears in a kernel's PTX (in its code, not
    per launch: a loop's body counts once)."""
    return {key: len(re.findall(pattern, ptx)) for key, pattern in PTX_COUNTS.items()}


def compile_with_pip_triton(ttir_path: str, num_warps: int, num_stages: int) -> dict:
    """(Run by ``--triton-python``: imports pip Triton, not JAX.) Compile one TTIR file for
    sm_90; write its TTGIR and PTX beside it; return ``ptxas -v``'s figures, the shared memory
    and the PTX counts."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(
        ttir_path,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    stem = ttir_path.removesuffix(".ttir")
    for key in ("ttgir", "ptx"):
        with open(f"{stem}.{key}", "w") as f:
            f.write(kernel.asm[key])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", f"{stem}.ptx", "-o", f"{tmp}/k.cubin"],
            capture_output=True,
            text=True,
            check=True,
        )
    return {
        **parse_ptxas(result.stderr),
        "shared_kb": kernel.metadata.shared / 1024,
        **count_ptx(kernel.asm["ptx"]),
    }


def markdown(rows: list[dict]) -> str:
    cols = [
        ("kernel", "name"),
        ("warps", "num_warps"),
        ("stages", "num_stages"),
        ("registers", "registers"),
        ("spill stores / loads B", None),
        ("stack B", "stack_frame"),
        ("shared KB", "shared_kb"),
        ("wgmma", "wgmma"),
        ("wgmma waits", "wgmma_waits"),
        ("mma.sync", "mma_sync"),
        ("bar.sync", "barriers"),
        ("cp.async", "async_copies"),
        ("ld.global", "global_loads"),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if "error" in row:
            cells = [row["name"], str(row["num_warps"]), str(row["num_stages"])]
            lines.append("| " + " | ".join(cells) + f" | failed: {row['error']} |")
            continue
        cells = []
        for _, key in cols:
            if key is None:
                cells.append(f"{row['spill_stores']} / {row['spill_loads']}")
            elif key == "shared_kb":
                cells.append(f"{row[key]:.1f}")
            else:
                cells.append(str(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [COMPILE_ONE]:  # in --triton-python's interpreter: no JAX, no package imports
        path, warps, stages = argv[1:]
        print(json.dumps(compile_with_pip_triton(path, int(warps), int(stages))))
        return
    from bench_op import config_fields, parse_case
    from cli_types import add_case_arguments

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -m pydoc experiments/offline_compile.py).",
    )
    add_case_arguments(parser, "state_dots=tf32")
    parser.add_argument(
        "--kernels",
        default="",
        metavar="REGEX",
        help="only the kernels whose name matches (re.search; e.g. bwd_state_pass); default: all",
    )
    parser.add_argument(
        "--triton-python",
        metavar="PYTHON",
        help="a Python with pip triton (its own venv) to compile the TTIR to PTX and run "
        "ptxas -v; without it only the TTIR is written",
    )
    parser.add_argument("--out", default="offline_compile", help="folder for every output")
    args = parser.parse_args(argv)

    try:
        pattern = re.compile(args.kernels)
    except re.error as err:
        raise SystemExit(f"--kernels: not a regular expression: {args.kernels!r} ({err})") from None
    for flag, value, check in (
        ("--case", args.case, parse_case),
        ("--bwd-variant", args.bwd_variant, config_fields),
    ):
        try:
            value is None or check(value)
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise SystemExit(f"{flag}: {err}") from None
    if args.triton_python and not os.access(args.triton_python, os.X_OK):
        raise SystemExit(f"--triton-python: {args.triton_python!r} is not an executable Python")
    kernels = [
        k
        for k in extract_kernels(lower_op(args.case, args.gated, args.bwd_variant))
        if pattern.search(k["name"])
    ]
    if not kernels:
        raise SystemExit(f"no kernel of the lowered op matches --kernels {args.kernels!r}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for index, kernel in enumerate(kernels):
        path = os.path.abspath(os.path.join(args.out, f"{index}_{kernel['name']}.ttir"))
        with open(path, "w") as f:
            f.write(bytecode_to_text(kernel.pop("bytecode")))
        row = {**kernel, "ttir": path}
        if args.triton_python:
            result = subprocess.run(
                [
                    args.triton_python,
                    os.path.abspath(__file__),
                    COMPILE_ONE,
                    path,
                    str(kernel["num_warps"]),
                    str(kernel["num_stages"]),
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                row.update(json.loads(result.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = (result.stderr.strip().splitlines() or ["no message"])[-1][:200]
        rows.append(row)
        print(f"{kernel['name']}: {path}", flush=True)
    if args.triton_python:
        table = markdown(rows)
        with open(os.path.join(args.out, "offline_compile.md"), "w") as f:
            f.write(
                f"case {args.case}{' gated' if args.gated else ''}, "
                f"bwd variant {args.bwd_variant or 'none'}\n\n{table}"
            )
        print(table)
    with open(os.path.join(args.out, "offline_compile.json"), "w") as f:
        json.dump(
            {
                "case": args.case,
                "gated": args.gated,
                "bwd_variant": args.bwd_variant,
                "kernels": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
