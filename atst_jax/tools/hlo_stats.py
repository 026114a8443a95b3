"""What a compiled step does, read from its optimized HLO text (``compiled.as_text()``): matmul FLOPs and
collectives per step, each op counted as many times as it runs (a ``while`` body — the scanned layers,
gradient accumulation — times its trip count).

XLA's own ``cost_analysis()`` counts a loop body once and is not available on every backend (None on GPU),
so the planner walks the text itself. Only the ops that dominate a transformer step are counted: ``dot`` and
``convolution`` (TPU lowers some dots to convolutions), cuBLAS GEMM custom calls and cuDNN fused attention.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
    "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in an HLO type (a tuple type has several); layouts are ignored."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def nbytes(type_text: str) -> int:
    return sum(DTYPE_BYTES[t] * math.prod(d) for t, d in arrays(type_text))


class Instr:
    __slots__ = ("name", "type", "op", "rest", "operands")

    def __init__(self, name, type_text, op, rest):
        self.name, self.type, self.op, self.rest = name, type_text, op, rest
        depth, end = 1, len(rest)
        for i, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        self.operands = re.findall(r"%([\w.\-]+)", rest[:end])

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=\{{([^}}]*)\}}", self.rest)
        return m.group(1) if m else None


def parse(text: str):
    """``(computations, entry)``: each computation's instructions in order, by name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(Instr(m.group(2), m.group(3), m.group(4), m.group(5)))
    return comps, entry


def trip_count(instr: Instr, comps) -> int | None:
    """A while loop's trip count: XLA's own annotation, else the bound its condition compares against."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.rest)
    if cond and cond.group(1) in comps:
        for i in comps[cond.group(1)]:
            if i.op == "constant" and re.match(r"s32\[\]|s64\[\]|u32\[\]", i.type):
                m = re.match(r"\s*(-?\d+)\)", i.rest)
                if m:
                    return int(m.group(1))
    return None


def multiplicities(comps, entry) -> tuple[dict[str, int], list[str]]:
    """How many times each computation runs per step, and the loops whose trip count was not found."""
    mult: dict[str, int] = defaultdict(int)
    unknown: list[str] = []

    def visit(name: str, times: int):
        mult[name] += times
        for instr in comps.get(name, ()):
            if instr.op in ("async-done", "async-update"):  # the same wrapped computation as its start
                continue
            callees = [c for _, c in _CALLS.findall(instr.rest)]
            for _, group in _CALL_LISTS.findall(instr.rest):
                callees += re.findall(r"%?([\w.\-]+)", group)
            n = times
            if instr.op == "while":
                trips = trip_count(instr, comps)
                if trips is None:
                    unknown.append(instr.name)
                    trips = 1
                n = times * trips
            for callee in callees:
                if callee in comps and callee != name:
                    visit(callee, n)

    visit(entry, 1)
    return dict(mult), unknown


def _shapes(comp: list[Instr]) -> dict[str, str]:
    table = {i.name: i.type for i in comp}
    return table


def _first_dims(type_text: str) -> tuple[int, ...]:
    a = arrays(type_text)
    return a[0][1] if a else ()


def _dot_flops(instr: Instr, table) -> float:
    out = _first_dims(instr.type)
    lhs = _first_dims(table.get(instr.operands[0], "")) if instr.operands else ()
    contract = instr.attr("lhs_contracting_dims")
    k = math.prod(lhs[int(c)] for c in contract.split(",") if c) if contract and lhs else 1
    return 2.0 * math.prod(out) * k


def _conv_flops(instr: Instr, table) -> float:
    """``2 · outputs · in-features · taps``, where taps counts, per spatial dimension, the window positions
    that can meet a real input element. TPU writes batched matmuls as convolutions whose batch dimensions are
    windows over dilated (``lhs_dilate``) or padded inputs of that size: one tap each, not a window's worth."""
    if len(instr.operands) < 2:
        return 0.0
    out = _first_dims(instr.type)
    lhs = _first_dims(table.get(instr.operands[0], ""))
    kernel = _first_dims(table.get(instr.operands[1], ""))
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->", instr.rest)
    if not out or not lhs or not kernel or not labels or "i" not in labels.group(2):
        return 0.0
    lhs_labels, kernel_labels = labels.group(1), labels.group(2)
    window = re.search(r"window=\{([^}]*)\}", instr.rest)
    fields = dict(re.findall(r"(\w+)=(\S+)", window.group(1))) if window else {}
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    dilate = [int(x) for x in fields.get("lhs_dilate", "").split("x") if x] or [1] * len(sizes)
    taps = 1
    for d, size in enumerate(sizes):
        pos = lhs_labels.find(str(d))
        extent = lhs[pos] if 0 <= pos < len(lhs) else size
        taps *= min(size, -(-size // dilate[d]), extent)
    return 2.0 * math.prod(out) * kernel[kernel_labels.index("i")] * taps


def _gemm_flops(instr: Instr, table) -> float:
    """A cuBLAS GEMM custom call: its dimension numbers are in the backend config."""
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.rest)
    out = _first_dims(instr.type)
    lhs = _first_dims(table.get(instr.operands[0], "")) if instr.operands else ()
    if not m or not lhs:
        return 0.0
    k = math.prod(lhs[int(c.strip().strip('"'))] for c in m.group(1).split(",") if c.strip())
    return 2.0 * math.prod(out) * k


def is_gemm(custom_call_target: str) -> bool:
    """cuBLAS GEMMs: ``__cublas$gemm`` and the cuBLASLt ``__cublas$lt$matmul`` (with fused epilogues)."""
    return custom_call_target.startswith("__cublas$")


def _fmha_flops(instr: Instr, table, target: str) -> float:
    """cuDNN fused attention on ``[B, T, N, H]`` q, k: two matmuls forward (4·B·N·Tq·Tk·H); backward four
    matmuls plus recomputing the logits (10·B·N·Tq·Tk·H)."""
    if len(instr.operands) < 2:
        return 0.0
    q = _first_dims(table.get(instr.operands[0], ""))
    k = _first_dims(table.get(instr.operands[1], ""))
    if len(q) != 4 or len(k) != 4:
        return 0.0
    factor = 10.0 if "Backward" in target else 4.0
    return factor * math.prod(q) * k[1]


def group_size(instr: Instr, num_devices: int) -> int:
    """Participants per group of a collective, from whichever replica-group spelling the backend printed."""
    rest = instr.rest
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)  # iota: [groups, size]<=[...]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)  # mesh['a'=4,'b'=2] {'a'}
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in re.findall(r"('?[\w]+'?)=(\d+)", m.group(1)))
        named = [n.strip("' ") for n in m.group(2).split(",") if n.strip()]
        return math.prod(sizes.get(n, 1) for n in named) if named else num_devices
    m = re.search(r"replica_groups=\{\{([^}]*)\}", rest)  # explicit {{0,1,...},{...}}
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    if instr.op.startswith("collective-permute"):
        return 2
    return num_devices


def analyze(text: str, num_devices: int) -> dict:
    """FLOPs and collectives per step (per device) of an optimized, SPMD-partitioned HLO module."""
    comps, entry = parse(text)
    mult, unknown = multiplicities(comps, entry)
    flops = 0.0
    colls = {k: {"count": 0, "bytes": 0, "wire_bytes": 0.0} for k in COLLECTIVES}
    custom_calls: dict[str, int] = defaultdict(int)
    # libtpu writes a reduce-scatter as a fusion whose computation ("all-reduce-scatter...") all-reduces and
    # keeps its own slice; the fusion is the reduce-scatter, the all-reduce inside it is not one of its own.
    scatter_comps = {n for n in comps if n.startswith("all-reduce-scatter")}
    for name, instrs in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        table = _shapes(instrs)
        for i in instrs:
            if i.op == "fusion":
                callee = re.search(r"\bcalls=%?([\w.\-]+)", i.rest)
                if callee and callee.group(1) in scatter_comps:
                    inner = next((x for x in comps[callee.group(1)] if x.op == "all-reduce"), None)
                    n = group_size(inner, num_devices) if inner is not None else num_devices
                    full = sum(nbytes(table.get(o, "")) for o in i.operands)
                    c = colls["reduce-scatter"]
                    c["count"] += times
                    c["bytes"] += times * full
                    c["wire_bytes"] += times * full * (n - 1) / n
                    continue
            if name in scatter_comps:
                continue
            if i.op == "dot":
                flops += times * _dot_flops(i, table)
            elif i.op == "convolution":
                flops += times * _conv_flops(i, table)
            elif i.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', i.rest)
                target = target.group(1) if target else "?"
                custom_calls[target] += times
                if is_gemm(target):
                    flops += times * _gemm_flops(i, table)
                elif "fmha" in target.lower():
                    flops += times * _fmha_flops(i, table, target)
            kind = i.op[: -len("-start")] if i.op.endswith("-start") else i.op
            if kind in COLLECTIVES:
                operand = sum(nbytes(table.get(o, "")) for o in i.operands)
                n = group_size(i, num_devices)
                # The array the group works on: gathered (all-gather), or the unreduced input.
                full = operand * n if kind == "all-gather" else operand
                share = (n - 1) / n if n > 1 else 0.0
                # Ring algorithms: bytes each device sends for the op.
                wire = {"all-reduce": 2 * full * share, "collective-permute": full}.get(kind, full * share)
                c = colls[kind]
                c["count"] += times
                c["bytes"] += times * full
                c["wire_bytes"] += times * wire
    return {
        "flops": flops,
        "collectives": colls,
        "custom_calls": dict(custom_calls),
        "unknown_trip_counts": unknown,
    }
