"""Ahead-of-time compile of every kernel variant: registers, spills, shared memory, and the SASS yardstick.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline down to a cubin with the ptxas shipped in the Triton wheel, and the wheel's ``cuobjdump
-res-usage`` reads the cubin's resources. What is compiled is not written down here: the host
wrappers (``segment_attention_fwd`` / ``segment_attention_bwd``) run on small CPU tensors with each
kernel's launch intercepted (``launch_capture.py``), so signatures, constexprs (the
``DOT_PRECISION`` heuristic included), tile sizes, ``num_warps`` and ``num_stages`` are exactly
what the package launches with ``default_config``.

Where the numbers come from (checked against ``ptxas -v`` of the same compile, see
tests/test_compile_check.py): the compiled kernel's metadata carries only shared memory offline
(``n_regs`` / ``n_spills`` are filled in by the driver when a GPU loads the cubin). cuobjdump's REG
equals ptxas's register count and its STACK equals ptxas's stack frame, which is where spills go;
its LOCAL column stays 0 even when ptxas spills, so a spill is STACK + LOCAL > 0.

The yardstick (``yardstick.py``, a plain causal flash attention) is compiled with the same tiles;
the SASS instructions per token of livr's full-tile loops must stay within ``YARDSTICK_LIMIT`` of
its unmasked loops (``compiled_stats.py``).

    python -m livr_kernels.compile_check [--arch 80 86 89 90 100 120] [--quick | --full] [--dtypes ...]
        [--rules ...] [--markdown] [--jobs N] [--no-yardstick] [--yardstick-scale X]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

from .compiled_stats import (  # noqa: F401  (re-exported: the tests and tools read them from here)
    ASYNC_COPY,
    ATOMIC_ADD,
    TMA_COPY,
    MMA_KINDS,
    SASS_MMA,
    YARDSTICK_COLUMNS,
    YARDSTICK_LIMIT,
    ResourceUsage,
    SassLoop,
    YardstickRow,
    cuobjdump_path,
    format_yardstick,
    loop_step,
    mma_kind,
    parse_resource_usage,
    pipeline_buffers,
    read_resource_usage,
    read_sass,
    sass_tile_loops,
)
from .launch_capture import (  # noqa: F401  (re-exported: the tests and tools read them from here)
    ALL_KERNELS,
    KERNELS,
    YARDSTICK_DTYPES,
    YARDSTICK_KERNELS,
    YARDSTICK_PREFIX,
    KernelLaunch,
    _jit_function,
    _target,
    capture_launches,
    capture_yardstick_launches,
    interpreter_on,
)

KIB = 1024
# Every GPU generation a fine-tuner may own: A100, RTX 30xx/A10/A40, RTX 40xx/L4/L40, H100/H200,
# B200, RTX 50xx. CI compiles the two that differ most by default; --arch takes any of them.
ARCHS = (80, 86, 89, 90, 100, 120)
DEFAULT_ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in maximum), per architecture.
SHARED_LIMIT = {80: 163 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
# What gets compiled: (dtype, head dim) pairs and rules. fp16 and bf16 compile to the same
# schedule (identical registers and shared memory in every table so far), so CI compiles bf16
# only and `--dtypes fp16 bf16` adds fp16 (at D=64/128); --full takes every head-dim block,
# --dtypes fp32 the IEEE-dot kernels (no tensor cores) and --rules other shipped rules
# (RULE_BITS is a constexpr, but the rule changes no resource count).
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_DTYPES = ("bf16",)
HALF_DTYPES = ("fp16", "bf16")
CORE_HEAD_DIMS = (64, 128)
EXTRA_HEAD_DIMS = (80, 256)
FULL_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DEFAULT_RULES = ("bottleneck",)
# Settings off in the static table that the autotuner may switch on: each is compiled too (the
# kernels it changes, shown as "<kernel>+<name>"), held to the same shared-memory limit; a spill
# there is listed but fails nothing, since the autotuner times each candidate before using it.
OPTION_VARIANTS = {"dq_atomic": {"dq_atomic": True}}
_FP_FUSION_WARNING = ".*TRITON_DEFAULT_FP_FUSION.*"


@dataclass(frozen=True)
class Variant:
    """What the table row describes; ``has_docs`` / ``rule`` are None for kernels that ignore them,
    ``option`` names the ``OPTION_VARIANTS`` entry compiled ("" for the static table)."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    has_docs: Optional[bool]
    rule: Optional[str]
    option: str = ""

    @property
    def name(self) -> str:
        """The kernel as the table shows it: ``<kernel>+<option>`` for an option variant."""
        return f"{self.kernel}+{self.option}" if self.option else self.kernel


@dataclass
class KernelReport:
    variant: Variant
    num_warps: int
    num_stages: int
    tile: str
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    mma: str = "none"
    async_copies: bool = False
    tma_copies: bool = False
    atomic_adds: bool = False
    # SASS instructions of each innermost tensor-core loop (full-tile loop first), and the
    # software pipeliner's buffer count per multi-buffered tile (TTGIR).
    loop_instructions: List[int] = field(default_factory=list)
    buffers: List[int] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local

    @property
    def option(self) -> bool:
        """A setting off in the static table (``OPTION_VARIANTS``), compiled as the autotuner would try it."""
        return bool(self.variant.option)

    def _where(self) -> str:
        v = self.variant
        return f"{v.name} sm_{v.arch} {v.dtype} D={v.head_dim}" + ("" if v.has_docs is None else f" docs={v.has_docs}")

    def _spill(self) -> str:
        return (f"{self._where()}: spills to local memory ({self.stack} B stack + {self.local} B local per thread, "
                f"{self.registers} registers, {self.num_warps} warps, tile {self.tile})")

    def notes(self) -> List[str]:
        """An option variant's spill: reported, not a failure, since the autotuner times each candidate
        against the static table before using it (as it does its wider dK/dV tile, which spills too)."""
        return [self._spill()] if self.option and self.error is None and self.spill_bytes > 0 else []

    def problems(self) -> List[str]:
        v = self.variant
        where = self._where()
        if self.error is not None:
            return [f"{where}: compile failed: {self.error}"]
        found = []
        if self.spill_bytes > 0 and not self.option:
            found.append(self._spill())
        limit = SHARED_LIMIT[v.arch]
        if self.shared > limit:
            found.append(
                f"{where}: {self.shared / KIB:.1f} KiB shared memory exceeds sm_{v.arch}'s "
                f"{limit / KIB:.0f} KiB per block (tile {self.tile}, {self.num_stages} stages)"
            )
        return found


def compile_launch(launch: KernelLaunch, variant: Variant) -> KernelReport:
    """Compile one launch for ``variant.arch`` and read its resources (runs in a worker process)."""
    import triton
    from triton.compiler import ASTSource

    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
    fn = _jit_function(launch.kernel)
    options = dict(launch.options)
    report = KernelReport(
        variant,
        num_warps=options.get("num_warps", _default_option("num_warps")),
        num_stages=options.get("num_stages", _default_option("num_stages")),
        tile=_tile(launch.constexprs),
    )
    start = time.perf_counter()
    try:
        source = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(source, target=_target(variant.arch), options=options)
        usage = read_resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    except Exception as exc:  # a variant that does not compile is a finding, not a crash
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        report.seconds = time.perf_counter() - start
        return report
    report.seconds = time.perf_counter() - start
    report.registers = usage.registers
    report.stack = usage.stack
    report.local = usage.local
    # Triton's dynamic shared memory plus whatever ptxas allocated statically.
    report.shared = compiled.metadata.shared + usage.static_shared
    report.mma = mma_kind(compiled.asm["ptx"])
    # Triton's software pipelining issues the loop's loads as asynchronous copies.
    report.async_copies = ASYNC_COPY in compiled.asm["ptx"]
    report.tma_copies = TMA_COPY in compiled.asm["ptx"]
    report.atomic_adds = ATOMIC_ADD.search(compiled.asm["ptx"]) is not None
    report.loop_instructions = [loop.instructions for loop in sass_tile_loops(read_sass(compiled.asm["cubin"]))]
    report.buffers = pipeline_buffers(compiled.asm["ttgir"])
    return report


def _default_option(name: str) -> int:
    from triton.backends.nvidia.compiler import CUDAOptions

    return getattr(CUDAOptions, name)


def _tile(constexprs: Dict[str, object]) -> str:
    """Queries x keys per program (the head dim block follows from D)."""
    sizes = [constexprs.get(name) for name in ("BLOCK_M", "BLOCK_N")]
    return "x".join(str(s) for s in sizes if s is not None)


def selection(quick: bool = False, full: bool = False, dtypes: Sequence[str] = DEFAULT_DTYPES) -> List[Tuple[str, int]]:
    """The (dtype, head dim) pairs a run compiles."""
    if full:
        return [(d, h) for d in dtypes for h in FULL_HEAD_DIMS]
    pairs = [(d, h) for d in dtypes for h in CORE_HEAD_DIMS]
    if not quick:
        pairs += [(d, h) for d in dtypes if d != "fp16" for h in EXTRA_HEAD_DIMS]
    return pairs


def plan(archs: Sequence[int], pairs: Sequence[Tuple[str, int]], rules: Sequence[str]) -> List[Tuple[KernelLaunch, Variant]]:
    """Every distinct (launch, variant) to compile; kernels that ignore docs/rule appear once."""
    jobs: Dict[str, Tuple[KernelLaunch, Variant]] = {}
    for arch in archs:
        for dtype, head_dim in pairs:
            for has_docs in (False, True):
                for rule in rules:
                    for option, changes in (("", None), *OPTION_VARIANTS.items()):
                        for launch in capture_launches(arch, dtype, head_dim, has_docs, rule, changes=changes):
                            uses_mask = "RULE_BITS" in launch.constexprs
                            variant = Variant(
                                launch.kernel, arch, dtype, head_dim,
                                has_docs if uses_mask else None, rule if uses_mask else None, option,
                            )
                            # A launch the option leaves as it is keeps its plain name.
                            jobs.setdefault(f"{arch}|{launch.key()}", (launch, variant))
    return list(jobs.values())


def yardstick_plan(archs: Sequence[int], pairs: Sequence[Tuple[str, int]]) -> List[Tuple[KernelLaunch, Variant]]:
    """The yardstick's compiles: one per main kernel, for each (arch, head dim) of the half-precision dtypes
    selected (bf16 when both are: fp16 compiles to the same loop)."""
    half = [d for d in YARDSTICK_DTYPES if any(p[0] == d for p in pairs)][:1]
    jobs = []
    for arch in archs:
        for dtype, head_dim in pairs:
            if dtype not in half:
                continue
            for launch in capture_yardstick_launches(arch, dtype, head_dim):
                jobs.append((launch, Variant(launch.kernel, arch, dtype, head_dim, None, None)))
    return jobs


def yardstick_rows(reports: Sequence[KernelReport]) -> List[YardstickRow]:
    """Pair each yardstick compile with livr's kernel of the same arch, dtype and head dim (no doc ids)."""
    livr = {}
    for r in reports:
        v = r.variant
        if v.kernel in YARDSTICK_KERNELS and not v.option and v.has_docs is False and r.error is None:
            livr.setdefault((v.kernel, v.arch, v.dtype, v.head_dim), r)
    rows = []
    for r in reports:
        v = r.variant
        if not v.kernel.startswith(YARDSTICK_PREFIX) or r.error is not None:
            continue
        kernel = v.kernel[len(YARDSTICK_PREFIX):]
        mine = livr.get((kernel, v.arch, v.dtype, v.head_dim))
        if mine is None or not mine.loop_instructions or not r.loop_instructions:
            continue
        rows.append(YardstickRow(
            kernel, v.arch, v.dtype, v.head_dim, mine.tile, loop_step(kernel, mine.tile),
            mine.loop_instructions[0], r.loop_instructions[0],
            min(mine.buffers, default=0), min(r.buffers, default=0),
        ))
    return sorted(rows, key=lambda row: (row.arch, list(KERNELS).index(row.kernel), row.dtype, row.head_dim))


def _init_worker() -> None:
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)


def compile_all(jobs: List[Tuple[KernelLaunch, Variant]], workers: int) -> List[KernelReport]:
    if workers <= 1:
        return [compile_launch(launch, variant) for launch, variant in jobs]
    # spawn, not fork: the parent has torch's thread pools running.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        return list(pool.map(compile_launch, [j[0] for j in jobs], [j[1] for j in jobs]))


TABLE_COLUMNS = (
    ("kernel", 14), ("arch", 6), ("dtype", 5), ("D", 4), ("docs", 5), ("rule", 10), ("warps", 5), ("stages", 6),
    ("tile", 12), ("regs", 4), ("smem KiB", 8), ("stack", 5), ("local", 5), ("mma", 8), ("cp.async", 8),
    ("status", 6),
)


def _cells(r: KernelReport) -> tuple:
    v = r.variant
    failed = "-" if r.error else None
    return (
        v.name, f"sm_{v.arch}", v.dtype, v.head_dim, "-" if v.has_docs is None else ("yes" if v.has_docs else "no"),
        v.rule or "-", r.num_warps, r.num_stages, r.tile,
        failed or r.registers, failed or f"{r.shared / KIB:.1f}", failed or r.stack, failed or r.local, failed or r.mma,
        failed or ("yes" if r.async_copies else "no"),
        ("spill*" if r.notes() else "ok") if not r.problems() else ("ERROR" if r.error else "FAIL"),
    )


def format_table(reports: Sequence[KernelReport]) -> str:
    lines = ["  ".join(f"{name:>{width}}" for name, width in TABLE_COLUMNS)]
    for r in sorted(reports, key=_sort_key):
        lines.append("  ".join(f"{str(c):>{width}}" for c, (_, width) in zip(_cells(r), TABLE_COLUMNS)))
    return "\n".join(lines)


def format_markdown(reports: Sequence[KernelReport]) -> str:
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in _cells(r)) + " |" for r in sorted(reports, key=_sort_key)]
    return "\n".join(lines)


def _sort_key(r: KernelReport):
    v = r.variant
    return (v.arch, list(ALL_KERNELS).index(v.kernel), v.option, v.dtype, v.head_dim, bool(v.has_docs), v.rule or "")


def wgmma_summary(reports: Sequence[KernelReport]) -> List[str]:
    """Does every fp16/bf16 forward on sm_90 use wgmma? (fp32 runs IEEE dots on the FMA units.)"""
    forwards = [
        r for r in reports
        if r.variant.kernel == "fwd" and r.variant.arch == 90 and r.variant.dtype in HALF_DTYPES and r.error is None
    ]
    if not forwards:
        return []
    without = sorted({f"{r.variant.dtype} D={r.variant.head_dim} ({r.mma})" for r in forwards if r.mma != "wgmma"})
    if not without:
        return [f"sm_90 forward: all {len(forwards)} fp16/bf16 variants use wgmma"]
    return [f"sm_90 forward: {len(without)} fp16/bf16 variant group(s) do NOT use wgmma: " + ", ".join(without)]


def run_checks(
    archs: Sequence[int],
    quick: bool = False,
    full: bool = False,
    rules: Sequence[str] = DEFAULT_RULES,
    workers: int = 1,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    yardstick: bool = True,
) -> Tuple[List[KernelReport], float]:
    """Compile livr's kernels (and the yardstick's, for the SASS comparison); yardstick reports
    carry kernel names starting with YARDSTICK_PREFIX."""
    start = time.perf_counter()
    pairs = selection(quick, full, dtypes)
    jobs = plan(archs, pairs, rules) + (yardstick_plan(archs, pairs) if yardstick else [])
    reports = compile_all(jobs, workers)
    return reports, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m livr_kernels.compile_check",
        description="Compile every livr kernel variant without a GPU; fail on spills, too much shared memory, "
                    "or a full-tile loop costlier than the yardstick allows.",
    )
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(DEFAULT_ARCHS),
                        help=f"target compute capabilities (default {list(DEFAULT_ARCHS)}; all: {list(ARCHS)})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=f"head dims {CORE_HEAD_DIMS} only")
    group.add_argument("--full", action="store_true", help=f"head dims {FULL_HEAD_DIMS}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DEFAULT_DTYPES),
                        help="dtypes to compile (fp32 spills with the shared tile configs and compiles slowly)")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="shipped rule names (RULE_BITS is a constexpr)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-yardstick", action="store_true", help="skip the SASS comparison with the plain causal kernels")
    parser.add_argument("--yardstick-scale", type=float, default=1.0,
                        help="multiply the yardstick limits (forward 1.05x, backward 1.10x) by this factor")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    from .segments import RULES

    unknown = [r for r in args.rules if r not in RULES]
    if unknown:
        parser.error(f"--rules must name shipped rules {sorted(RULES)}; got {unknown}")

    if interpreter_on():
        # The kernels must be real JIT functions, decorated without the interpreter: start afresh.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "livr_kernels.compile_check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode

    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
    reports, seconds = run_checks(args.arch, args.quick, args.full, args.rules, args.jobs, args.dtypes, not args.no_yardstick)
    livr = [r for r in reports if not r.variant.kernel.startswith(YARDSTICK_PREFIX)]
    print(format_markdown(livr) if args.markdown else format_table(livr))
    for line in wgmma_summary(livr):
        print(line)
    notes = [n for r in livr for n in r.notes()]
    if notes:
        print("spill*: autotuner candidates that spill (not failures: each is timed against the static table before use):")
        for note in notes:
            print(f"  {note}")
    problems = [p for r in reports for p in r.problems()]
    if not args.no_yardstick:
        limits = {name: limit * args.yardstick_scale for name, limit in YARDSTICK_LIMIT.items()}
        rows = yardstick_rows(reports)
        print("\nSASS instructions per token in the full-tile loop, livr vs the plain causal yardstick "
              "(same tiles; bufs = pipeline buffers per K/V or Q/dO tile):")
        print(format_yardstick(rows, limits, args.markdown))
        problems += [p for row in rows for p in row.problems(limits)]
    print(f"{len(reports)} kernels compiled for {', '.join(f'sm_{a}' for a in args.arch)} in {seconds:.0f} s "
          f"(registers and stack from cuobjdump; shared = Triton's dynamic + static)")
    if problems:
        print(f"compile_check FAILED: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("compile_check passed: no spills, shared memory within limits"
          + ("" if args.no_yardstick else ", full-tile loops within the yardstick limits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
