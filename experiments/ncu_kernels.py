"""Nsight Compute over the op's Pallas kernels: where each kernel's time goes on a GPU.

Timing variants tells how long a kernel takes; the hardware counters tell why. ``ncu`` profiles
the Triton kernels inside a JAX program as JAX compiled them (its Triton can differ from a
pip-installed one: the reverse state pass's synchronous ``dv_out`` load showed up only there;
docs/BENCHMARKS.md, "2026-12-07 (fourth session)").

Subcommands:

``run``
    One forward + backward of the op (``impl="pallas"``, ``grad`` of ``<o, do>``) at ``--case``:
    the program for ``ncu`` to wrap. Every launch of a kernel is replayed by ``ncu`` with
    flushed caches, so one step is enough.
``summarize``
    Reads what ``ncu --page details`` and ``ncu --page source --print-source sass --csv`` print
    for the same report (the CSV may be gzipped) and writes ``ncu_summary.md`` and
    ``ncu_summary.json`` to ``--out``: per kernel launch its duration, DRAM throughput, L2 hit
    rate, achieved occupancy, registers, shared memory, cycles per issued instruction, its top
    stall reasons (share of the warp samples) and the synchronous global loads (``LDG``)
    executed inside a loop (more than once per warp): Triton pipelines only loads that feed a
    product, and such a load waits at its use.

On the device tool: ``bash scripts/gpu_check.sh ncu`` (``NCU_CASE`` picks the case).

Examples::

    python experiments/ncu_kernels.py --help
    ncu --clock-control none -k regex:dp_ --section SpeedOfLight --section WarpStateStats \\
        --section SourceCounters --section LaunchStats --section Occupancy \\
        --section MemoryWorkloadAnalysis -o /tmp/op python experiments/ncu_kernels.py run
    ncu -i /tmp/op.ncu-rep --page details > details.txt
    ncu -i /tmp/op.ncu-rep --page source --print-source sass --csv > source.csv
    python experiments/ncu_kernels.py summarize details.txt source.csv --out .
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
from collections import Counter

from cli_types import add_case_arguments

# ncu's metric lines: "    <name>   <unit>   <value>" (the unit may be absent)
METRICS = {
    "duration_us": "Duration",
    "dram_pct": "DRAM Throughput",
    "l2_hit_pct": "L2 Hit Rate",
    "occupancy_pct": "Achieved Occupancy",
    "registers": "Registers Per Thread",
    "shared_kb": "Dynamic Shared Memory Per Block",
    "cycles_per_issue": "Warp Cycles Per Issued Instruction",
}
TIME_UNITS = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}
HEADER = re.compile(r"^  (\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_details(text: str) -> list[dict]:
    """The kernel launches of ``ncu --page details`` output, in order: name, grid, block and
    the ``METRICS`` found (``duration_us`` in microseconds whatever unit ncu printed; the
    memory throughput in TB/s as ``dram_tbps`` where ncu gave it in Tbyte/s or Gbyte/s)."""
    launches: list[dict] = []
    for line in text.splitlines():
        head = HEADER.match(line)
        if head:
            dims = [int(x) for x in head.groups()[1:]]
            launches.append(dict(name=head.group(1), grid=dims[:3], block=dims[3:]))
            continue
        if not launches:
            continue
        current = launches[-1]
        parts = line.split()
        if len(parts) < 2:
            continue
        for key, label in METRICS.items():
            if key in current or not line.strip().startswith(label + " "):
                continue
            rest = line.strip()[len(label) :].split()
            try:
                value = _number(rest[-1])
            except ValueError:
                continue
            if key == "duration_us":
                value *= TIME_UNITS.get(rest[0], 1.0) if len(rest) > 1 else 1.0
            current[key] = value
        if line.strip().startswith("Memory Throughput") and "byte/s" in line:
            value = _number(parts[-1])
            current["dram_tbps"] = value / 1e3 if "Gbyte/s" in line else value
    return launches


def _open_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def parse_source(text: str, top: int = 5) -> list[dict]:
    """Per kernel launch of ``ncu --page source --csv`` output (blocks that start with
    ``"Kernel Name",``): the warp stall samples by reason (shares of all samples, the ``top``
    largest) and the synchronous global loads: ``LDG`` instructions and how many of them run
    inside a loop (executed more often than the kernel's least executed instruction, i.e. more
    than once per warp)."""
    kernels = []
    for block in text.split('"Kernel Name",')[1:]:
        name_line, _, body = block.partition("\n")
        rows = list(csv.reader(io.StringIO(body)))
        if not rows:
            continue
        header, data = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
        executed_col = header.index("Instructions Executed")
        stall_cols = [
            i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h
        ]
        stalls: Counter = Counter()
        for row in data:
            for i in stall_cols:
                if row[i].isdigit():
                    stalls[header[i][len("stall_") :]] += int(row[i])
        total = sum(stalls.values()) or 1
        executed = [int(r[executed_col]) for r in data if r[executed_col].isdigit()]
        once = min((x for x in executed if x > 0), default=0)
        loads = [r for r in data if _opcode(r[1]).startswith("LDG.")]
        in_loop = [r for r in loads if r[executed_col].isdigit() and int(r[executed_col]) > once]
        kernels.append(
            dict(
                name=name_line.strip().strip(",").strip('"'),
                samples=sum(stalls.values()),
                stalls={k: round(100 * v / total, 1) for k, v in stalls.most_common(top)},
                sync_loads=len(loads),
                sync_loads_in_loop=len(in_loop),
            )
        )
    return kernels


def _opcode(sass: str) -> str:
    parts = sass.split()
    if parts and parts[0].startswith("@"):  # a predicate guard
        parts = parts[1:]
    return parts[0] if parts else ""


def summarize(details_path: str, source_path: str | None) -> list[dict]:
    """Each kernel launch's details, with its source-page figures merged in (same order)."""
    launches = parse_details(_open_text(details_path))
    if source_path:
        sources = parse_source(_open_text(source_path))
        if len(sources) != len(launches):
            raise ValueError(
                f"{details_path} has {len(launches)} kernel launches but {source_path} has "
                f"{len(sources)}: give the two pages of the same ncu report"
            )
        for launch, source in zip(launches, sources, strict=True):
            launch.update({k: v for k, v in source.items() if k != "name"})
    return launches


def markdown(launches: list[dict]) -> str:
    cols = [
        ("kernel", "name", "{}"),
        ("µs", "duration_us", "{:.1f}"),
        ("DRAM TB/s", "dram_tbps", "{:.2f}"),
        ("DRAM %", "dram_pct", "{:.0f}"),
        ("L2 hit %", "l2_hit_pct", "{:.0f}"),
        ("occupancy %", "occupancy_pct", "{:.1f}"),
        ("registers", "registers", "{:.0f}"),
        ("shared KB", "shared_kb", "{:.1f}"),
        ("cycles / issue", "cycles_per_issue", "{:.2f}"),
        ("sync loads (in a loop)", None, None),
        ("top stalls (% of samples)", None, None),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for launch in launches:
        cells = []
        for _, key, fmt in cols[:-2]:
            cells.append(fmt.format(launch[key]) if key in launch else "")
        if "sync_loads" in launch:
            cells.append(f"{launch['sync_loads']} ({launch['sync_loads_in_loop']})")
            cells.append(", ".join(f"{k} {v}" for k, v in launch["stalls"].items()))
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(case: str, gated: bool, bwd_variant: str | None = None) -> None:
    """One forward + backward of the op at ``case`` (``B,T,H,K,V,N_H``), bf16; ``bwd_variant``:
    ``BackwardConfig`` fields changed from the default (``"FIELD=VALUE[,FIELD=VALUE]"``)."""
    # imported here: ``summarize`` needs neither JAX nor the package
    import jax
    from bench_op import OP_ARGS, backward_variant, make_inputs, op_fns, parse_case

    from dpjax.ops import pallas as dp_pallas

    c = parse_case(case + (",gated" if gated else ""))
    x = make_inputs(c, seed=0)
    _, fwd_bwd = op_fns(dp_pallas.forward, c)
    args = tuple(x[n] for n in OP_ARGS)
    with backward_variant(bwd_variant):
        jax.block_until_ready(fwd_bwd(*args))
    print(f"ran one forward + backward at {c.label} on {jax.devices()[0].device_kind}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -m pydoc experiments/ncu_kernels.py) for the "
        "ncu command lines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="one forward + backward of the op, for ncu to wrap")
    add_case_arguments(p_run, "merged_adjoint=True")
    p_sum = sub.add_parser("summarize", help="tables of an ncu report's details and source pages")
    p_sum.add_argument("details", help="text of `ncu -i REPORT --page details`")
    p_sum.add_argument(
        "source",
        nargs="?",
        help="CSV (or .csv.gz) of `ncu -i REPORT --page source --print-source sass --csv`; "
        "without it no stall reasons or loads are reported",
    )
    p_sum.add_argument("--out", default=".", help="folder for ncu_summary.md and .json")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.case, args.gated, args.bwd_variant)
        return
    launches = summarize(args.details, args.source)
    if not launches:
        raise SystemExit(f"no kernel launches found in {args.details}: is it ncu's details page?")
    os.makedirs(args.out, exist_ok=True)
    table = markdown(launches)
    with open(os.path.join(args.out, "ncu_summary.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "ncu_summary.json"), "w") as f:
        json.dump(launches, f, indent=1)
    print(table, end="")


if __name__ == "__main__":
    main()
