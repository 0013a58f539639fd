"""What a compiled kernel costs, read off its cubin, SASS and TTGIR without a GPU.

Resources (registers, stack, shared memory) come from the cuobjdump shipped in the Triton wheel;
the tile loops' instruction counts from its SASS listing; the software pipeliner's buffer counts
from the TTGIR. ``YardstickRow`` compares livr's full-tile loop with the plain causal yardstick
(``yardstick.py``) compiled with the same tiles.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

# Tensor-core instructions in SASS: a loop holding one is a tile loop.
SASS_MMA = re.compile(r"\b(HGMMA|HMMA|UTC\w*MMA)\b")
# PTX instruction prefixes of the tensor-core paths, most specific first.
MMA_KINDS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
ASYNC_COPY = "cp.async"
# The tensor memory accelerator's bulk tile copy (``KernelConfig.fwd_tma``).
TMA_COPY = "cp.async.bulk.tensor"
# fp32 adds to global memory (``tl.atomic_add`` with relaxed order): the atomic dQ path.
ATOMIC_ADD = re.compile(r"\b(?:red|atom)\.global\.\S*add\S*\.f32")
# Most SASS instructions per key (per query for dK/dV) livr's FULL-tile loop may cost, as a
# multiple of the yardstick's unmasked loop with the same tiles.
YARDSTICK_LIMIT = {"fwd": 1.05, "bwd_dkv": 1.10, "bwd_dq": 1.10}


@dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``; sizes in bytes (stack and local per thread)."""

    registers: int
    stack: int
    static_shared: int
    local: int


_FUNCTION_LINE = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_FIELD = re.compile(r"\b([A-Z]+):(\d+)")


def parse_resource_usage(text: str) -> Dict[str, ResourceUsage]:
    """Parse ``cuobjdump -res-usage`` output into one entry per function."""
    usage: Dict[str, ResourceUsage] = {}
    name = None
    for line in text.splitlines():
        match = _FUNCTION_LINE.match(line)
        if match:
            name = match.group(1)
            continue
        if name is None or "REG:" not in line:
            continue
        fields = {key: int(value) for key, value in _FIELD.findall(line)}
        usage[name] = ResourceUsage(
            registers=fields.get("REG", 0),
            stack=fields.get("STACK", 0),
            static_shared=fields.get("SHARED", 0),
            local=fields.get("LOCAL", 0),
        )
        name = None
    return usage


def cuobjdump_path() -> str:
    """The cuobjdump shipped in the Triton wheel (``TRITON_CUOBJDUMP_PATH`` overrides it)."""
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def read_resource_usage(cubin: bytes, function: str) -> ResourceUsage:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump_path(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    usage = parse_resource_usage(out)
    if function not in usage:
        raise RuntimeError(f"cuobjdump reported no function {function!r}; its output was:\n{out}")
    return usage[function]


def mma_kind(ptx: str) -> str:
    for name, instruction in MMA_KINDS:
        if instruction in ptx:
            return name
    return "none"


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# "@P1 BRA 0x1710" and, on sm_120, "BRA.U !UP0, 0x2a90" (the predicate as an operand).
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:!?U?P[T\d]+,\s*)?0x([0-9a-f]+)")


@dataclass(frozen=True)
class SassLoop:
    """An innermost loop of a SASS listing: byte addresses of its first and last (branch) instruction."""

    start: int
    end: int
    instructions: int
    mma: int


def sass_tile_loops(sass: str) -> List[SassLoop]:
    """Innermost loops that hold a tensor-core instruction, in address order.

    A loop is a backward branch (``@P BRA 0x<earlier address>``); innermost means no other
    backward branch lies strictly inside it. Padding NOPs are not counted.
    """
    code: List[Tuple[int, str]] = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            code.append((int(match.group(1), 16), match.group(2)))
    spans = []
    for address, text in code:
        branch = _SASS_BRANCH.search(text)
        if branch and branch.group(1) is not None and int(branch.group(1), 16) <= address:
            spans.append((int(branch.group(1), 16), address))
    loops = []
    for start, end in spans:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in spans):
            continue
        body = [text for address, text in code if start <= address <= end and not text.startswith("NOP")]
        mma = sum(1 for text in body if SASS_MMA.search(text))
        if mma:
            loops.append(SassLoop(start, end, len(body), mma))
    return sorted(loops, key=lambda loop: loop.start)


def read_sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([cuobjdump_path(), "-sass", path], capture_output=True, text=True, check=True).stdout


_MULTI_BUFFER = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x(\d+)x")


def pipeline_buffers(ttgir: str) -> List[int]:
    """Buffer counts of the multi-buffered 2-D tiles the software pipeliner allocated, in TTGIR order."""
    return [int(m.group(1)) for m in _MULTI_BUFFER.finditer(ttgir)]


@dataclass
class YardstickRow:
    """livr's full-tile loop against the yardstick's unmasked loop, compiled with the same tiles."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    tile: str
    step: int
    livr_instructions: int
    yardstick_instructions: int
    livr_buffers: int
    yardstick_buffers: int

    @property
    def ratio(self) -> float:
        return self.livr_instructions / self.yardstick_instructions

    def problems(self, limits: Dict[str, float] = YARDSTICK_LIMIT) -> List[str]:
        limit = limits[self.kernel]
        if self.ratio <= limit:
            return []
        return [
            f"{self.kernel} sm_{self.arch} {self.dtype} D={self.head_dim}: full-tile loop costs "
            f"{self.livr_instructions / self.step:.2f} SASS instructions per token, {self.ratio:.3f}x the "
            f"yardstick's {self.yardstick_instructions / self.step:.2f} (limit {limit:.2f}x, tile {self.tile})"
        ]


def loop_step(kernel: str, tile: str) -> int:
    """Tokens one loop iteration covers: keys (forward, dQ) or queries (dK/dV)."""
    block_m, block_n = (int(x) for x in tile.split("x"))
    return block_m if kernel == "bwd_dkv" else block_n


YARDSTICK_COLUMNS = (
    ("kernel", 8), ("arch", 6), ("dtype", 5), ("D", 4), ("tile", 7), ("livr/token", 10), ("yardstick", 9),
    ("ratio", 6), ("limit", 5), ("bufs", 4), ("yd bufs", 7), ("status", 6),
)


def format_yardstick(rows: Sequence[YardstickRow], limits: Dict[str, float] = YARDSTICK_LIMIT, markdown: bool = False) -> str:
    cells = [
        (r.kernel, f"sm_{r.arch}", r.dtype, r.head_dim, r.tile, f"{r.livr_instructions / r.step:.2f}",
         f"{r.yardstick_instructions / r.step:.2f}", f"{r.ratio:.3f}", f"{limits[r.kernel]:.2f}",
         r.livr_buffers, r.yardstick_buffers, "ok" if not r.problems(limits) else "FAIL")
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(n for n, _ in YARDSTICK_COLUMNS) + " |", "|" + "---|" * len(YARDSTICK_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in cells])
    lines = ["  ".join(f"{n:>{w}}" for n, w in YARDSTICK_COLUMNS)]
    return "\n".join(lines + ["  ".join(f"{str(c):>{w}}" for c, (_, w) in zip(row, YARDSTICK_COLUMNS)) for row in cells])


