"""Which source lines an XLA fusion came from, read from a compiled module's HLO text.

A profile names device ops after the HLO instructions that launched them (``loop_add_fusion_50``,
``input_convert_reduce_fusion``, ``gemm_fusion_dot_10``). The optimized HLO
(``jax.jit(f).lower(...).compile().as_text()``) keeps, for every instruction a fusion absorbed,
the JAX primitive path (``op_name``) and a stack frame that points at the Python line. Counting
those over the fusion's called computation says what the fusion is made of.

``fusion_sources(hlo_text)`` maps each fusion's name (with ``.`` written ``_``, as in the
profiler's op names) to its most frequent ``primitive @ file:line (function)`` entries;
``home_file(entries)`` names the source file most of them came from.
"""

from __future__ import annotations

import re
from collections import Counter

_SECTION = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\s*$")
_NUMBERED = re.compile(r"^(\d+)\s+(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_FIELD = re.compile(r"(\w+)=(\d+)")


def op_key(name: str) -> str:
    """An HLO instruction name as the profiler writes it (``fusion.3`` -> ``fusion_3``)."""
    return name.replace(".", "_").replace("-", "_")


def _tables(lines: list[str]) -> dict[str, dict[int, str]]:
    """The numbered FileNames / FunctionNames / FileLocations / StackFrames sections."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            current = tables.setdefault(header.group(1), {})
            continue
        numbered = _NUMBERED.match(line) if current is not None else None
        if numbered is None:
            current = None
            continue
        current[int(numbered.group(1))] = numbered.group(2).strip().strip('"')
    return tables


def _frame_location(tables: dict[str, dict[int, str]], frame_id: int) -> str | None:
    """``file:line (function)`` of a stack frame (its innermost location: JAX keeps the user's
    frame there)."""
    frame = tables.get("StackFrames", {}).get(frame_id)
    if frame is None:
        return None
    fields = dict((k, int(v)) for k, v in _FIELD.findall(frame))
    location = tables.get("FileLocations", {}).get(fields.get("file_location_id", -1))
    if location is None:
        return None
    loc = dict((k, int(v)) for k, v in _FIELD.findall(location))
    file = tables.get("FileNames", {}).get(loc.get("file_name_id", -1), "?")
    function = tables.get("FunctionNames", {}).get(loc.get("function_name_id", -1), "?")
    return f"{_short_path(file)}:{loc.get('line', '?')} ({function})"


def _short_path(path: str) -> str:
    for root in ("dpjax/", "pallas_kernels/", "experiments/"):
        i = path.find(root)
        if i >= 0:
            return path[i:]
    return path.split("site-packages/", 1)[-1]


def _describe(line: str, tables: dict[str, dict[int, str]]) -> str | None:
    op = _OP_NAME.search(line)
    if op is None:
        return None
    primitive = op.group(1).rsplit("/", 1)[-1]
    where = None
    frame = _FRAME.search(line)
    if frame is not None:
        where = _frame_location(tables, int(frame.group(1)))
    source = _SOURCE.search(line)
    if where is None and source is not None:
        where = f"{_short_path(source.group(1))}:{source.group(2)}"
    return f"{primitive} @ {where}" if where else primitive


def fusion_sources(hlo_text: str, top: int = 3) -> dict[str, list[str]]:
    """``{fusion op name: [the top most frequent "primitive @ file:line (function)", ...]}`` for
    every instruction of ``hlo_text`` that calls a computation (fusions; ``calls=%...``), counted
    over that computation's instructions (each entry suffixed with ``xN`` when N > 1)."""
    lines = hlo_text.splitlines()
    tables = _tables(lines)
    bodies: dict[str, list[str]] = {}
    current = None
    for line in lines:
        start = _COMPUTATION.match(line)
        if start:
            current = bodies.setdefault(start.group(1), [])
            continue
        if line.strip() == "}":
            current = None
        elif current is not None:
            current.append(line)
    out: dict[str, list[str]] = {}
    for body in bodies.values():
        for line in body:
            inst, calls = _INSTRUCTION.match(line), _CALLS.search(line)
            if inst is None or calls is None or calls.group(1) not in bodies:
                continue
            counts = Counter(
                d for d in (_describe(x, tables) for x in bodies[calls.group(1)]) if d is not None
            )
            if not counts:
                own = _describe(line, tables)
                counts = Counter([own] if own else [])
            out[op_key(inst.group(1))] = [
                f"{what} x{n}" if n > 1 else what for what, n in counts.most_common(top)
            ]
    return out


_ENTRY = re.compile(r"@ ([^:]+):\d+.*?(?: x(\d+))?$")


def home_file(entries: list[str]) -> str | None:
    """The source file that most of a fusion's instructions came from (``fusion_sources``
    entries, weighted by their ``xN`` counts), or None when no entry names a file."""
    weights: Counter = Counter()
    for entry in entries:
        m = _ENTRY.search(entry)
        if m:
            weights[m.group(1)] += int(m.group(2) or 1)
    return weights.most_common(1)[0][0] if weights else None
