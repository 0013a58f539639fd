"""Ahead-of-time compile of every kernel variant: registers, spills, shared memory, and the SASS yardstick.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline down to a cubin with the ptxas shipped in the Triton wheel, and the wheel's ``cuobjdump
-res-usage`` reads the cubin's resources. What is compiled is not written down here: the host
wrappers (``segment_attention_fwd`` / ``segment_attention_bwd``) run on small CPU tensors with each
kernel's launch intercepted, so signatures, constexprs (the ``DOT_PRECISION`` heuristic included), tile sizes,
``num_warps`` and ``num_stages`` are exactly what the package launches with ``default_config``.

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
import importlib
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

KIB = 1024
# Every GPU generation a fine-tuner may own: A100, RTX 30xx/A10/A40, RTX 40xx/L4/L40, H100/H200,
# B200, RTX 50xx. CI compiles the two that differ most by default; --arch takes any of them.
ARCHS = (80, 86, 89, 90, 100, 120)
DEFAULT_ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in maximum), per architecture.
SHARED_LIMIT = {80: 163 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
WARP_SIZE = 32
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
# The target setting. HQ and GROUP are constexprs, so the head counts are part of a variant.
TARGET_Q_HEADS = 16
TARGET_KV_HEADS = 2
# Length of the capture tensors. Not a multiple of 16, like most real lengths, so the length
# arguments get no divisibility hint (a multiple of 16 would compile a slightly different variant).
CAPTURE_SEQ_LEN = 1000
CAPTURE_DOCS = 3
# Short kernel name -> (module, attribute) of what the host wrappers launch.
KERNELS = {
    "fwd": ("livr_kernels.forward", "segment_attention_fwd_kernel"),
    "bwd_preprocess": ("livr_kernels.backward", "segment_attention_bwd_kernel_preprocess"),
    "bwd_dkv": ("livr_kernels.backward", "segment_attention_bwd_kernel_dkv"),
    "bwd_dq": ("livr_kernels.backward", "segment_attention_bwd_kernel_dq"),
}
# The plain causal kernels (livr_kernels/yardstick.py) that livr's main kernels are measured against.
YARDSTICK_KERNELS = {
    "fwd": ("livr_kernels.yardstick", "causal_fwd_kernel"),
    "bwd_dkv": ("livr_kernels.yardstick", "causal_bwd_dkv_kernel"),
    "bwd_dq": ("livr_kernels.yardstick", "causal_bwd_dq_kernel"),
}
YARDSTICK_PREFIX = "yardstick_"
ALL_KERNELS = {**KERNELS, **{YARDSTICK_PREFIX + name: where for name, where in YARDSTICK_KERNELS.items()}}
YARDSTICK_DTYPES = ("bf16", "fp16")
# The yardstick has no bounds masks: its length is a multiple of every block size.
YARDSTICK_SEQ_LEN = 1024
_FP_FUSION_WARNING = ".*TRITON_DEFAULT_FP_FUSION.*"


@dataclass
class KernelLaunch:
    """One intercepted kernel launch, in the form ``triton.compile`` takes it."""

    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, int]

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


@dataclass(frozen=True)
class Variant:
    """What the table row describes; ``has_docs`` / ``rule`` are None for kernels that ignore them."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    has_docs: Optional[bool]
    rule: Optional[str]


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
    # SASS instructions of each innermost tensor-core loop (full-tile loop first), and the
    # software pipeliner's buffer count per multi-buffered tile (TTGIR).
    loop_instructions: List[int] = field(default_factory=list)
    buffers: List[int] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local

    def problems(self) -> List[str]:
        v = self.variant
        where = f"{v.kernel} sm_{v.arch} {v.dtype} D={v.head_dim}" + ("" if v.has_docs is None else f" docs={v.has_docs}")
        if self.error is not None:
            return [f"{where}: compile failed: {self.error}"]
        found = []
        if self.spill_bytes > 0:
            found.append(
                f"{where}: spills to local memory ({self.stack} B stack + {self.local} B local per thread, "
                f"{self.registers} registers, {self.num_warps} warps, tile {self.tile})"
            )
        limit = SHARED_LIMIT[v.arch]
        if self.shared > limit:
            found.append(
                f"{where}: {self.shared / KIB:.1f} KiB shared memory exceeds sm_{v.arch}'s "
                f"{limit / KIB:.0f} KiB per block (tile {self.tile}, {self.num_stages} stages)"
            )
        return found


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jit_function(kernel: str):
    from triton.runtime.jit import JITFunction

    module, attr = ALL_KERNELS[kernel]
    fn = getattr(importlib.import_module(module), attr)
    # Heuristics / autotuner wrappers keep the JITFunction in ``.fn``.
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _capability(arch: int) -> Tuple[int, int]:
    return divmod(arch, 10)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, WARP_SIZE)


def _recording(backend, launches: List["KernelLaunch"], kernels: Sequence[str]):
    """Context: each named kernel's launches are recorded (in launch form), not run."""
    from triton.runtime.jit import create_function_from_signature

    def recorder(kernel: str, fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            # The same specialisation a real launch computes: types, divisibility by 16, ints equal to 1.
            bound, specialization, options = binder(*args, **kwargs)
            names = list(bound)
            signature = {name: spec[0] for name, spec in zip(names, specialization)}
            constexprs = {name: bound[name] for name, spec in zip(names, specialization) if spec[0] == "constexpr"}
            attrs = {
                (i,): backend.parse_attr(spec[1])
                for i, spec in enumerate(specialization)
                if spec[0] != "constexpr" and isinstance(spec[1], str)
            }
            launches.append(KernelLaunch(kernel, signature, constexprs, attrs, dict(options)))

        return run

    class Recording:
        def __enter__(self):
            self.patched = []
            for kernel in kernels:
                fn = _jit_function(kernel)
                fn.run = recorder(kernel, fn)
                self.patched.append(fn)

        def __exit__(self, *exc):
            for fn in self.patched:
                del fn.run

    return Recording()


def _capture_inputs(dtype: str, head_dim: int, n: int, kv_heads: int):
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    shape_q = (1, TARGET_Q_HEADS, n, head_dim)
    shape_kv = (1, kv_heads, n, head_dim)
    q, do = torch.zeros(shape_q, dtype=torch_dtype), torch.zeros(shape_q, dtype=torch_dtype)
    k, v = torch.zeros(shape_kv, dtype=torch_dtype), torch.zeros(shape_kv, dtype=torch_dtype)
    return torch_dtype, q, k, v, do


def capture_launches(
    arch: int, dtype: str, head_dim: int, has_docs: bool, rule: str, config=None
) -> List[KernelLaunch]:
    """Run the forward and backward host wrappers on CPU tensors, recording each kernel launch.

    ``config`` (a ``KernelConfig``) replaces ``default_config`` to try other tile sizes.
    """
    if interpreter_on():
        raise RuntimeError("capture_launches needs real JIT functions: unset TRITON_INTERPRET before importing livr_kernels")
    import torch
    from triton.compiler.compiler import make_backend

    from .backward import segment_attention_bwd
    from .blocks import SegmentLayout
    from .config import default_config
    from .forward import segment_attention_fwd
    from .segments import Segment, resolve_rule

    n = CAPTURE_SEQ_LEN
    seg = torch.full((1, n), int(Segment.TEXT), dtype=torch.int32)
    seg[:, n // 8: n // 2] = int(Segment.IMAGE)
    seg[:, n // 2 + n // 16: n // 2 + n // 8] = int(Segment.LATENT)
    seg[:, n - n // 16:] = int(Segment.ANSWER)
    doc = torch.arange(n, dtype=torch.int32)[None] * CAPTURE_DOCS // n if has_docs else None
    layout = SegmentLayout(seg, doc)
    torch_dtype, q, k, v, do = _capture_inputs(dtype, head_dim, n, TARGET_KV_HEADS)
    config = config or default_config(head_dim, _capability(arch), torch_dtype)
    resolved = resolve_rule(rule)
    scale = head_dim ** -0.5
    launches: List[KernelLaunch] = []
    with _recording(make_backend(_target(arch)), launches, list(KERNELS)):
        # The launches are only recorded, so o and lse come back uninitialised: fine for the capture.
        o, lse = segment_attention_fwd(q, k, v, layout, resolved, scale, config)
        segment_attention_bwd(do, q, k, v, o, lse, layout, resolved, scale, config)
    return launches


def capture_yardstick_launches(arch: int, dtype: str, head_dim: int, config=None) -> List[KernelLaunch]:
    """The yardstick's launches with the tiles, warps and stages livr uses (``default_config``)."""
    if interpreter_on():
        raise RuntimeError("capture needs real JIT functions: unset TRITON_INTERPRET before importing livr_kernels")
    from triton.compiler.compiler import make_backend

    from .config import default_config
    from .yardstick import causal_bwd, causal_fwd

    torch_dtype, q, k, v, do = _capture_inputs(dtype, head_dim, YARDSTICK_SEQ_LEN, TARGET_KV_HEADS)
    config = config or default_config(head_dim, _capability(arch), torch_dtype)
    scale = head_dim ** -0.5
    launches: List[KernelLaunch] = []
    with _recording(make_backend(_target(arch)), launches, [YARDSTICK_PREFIX + name for name in YARDSTICK_KERNELS]):
        o, lse = causal_fwd(q, k, v, scale, config)
        # The yardstick backward has no GQA; one head group's K and V stand in (same tiles).
        causal_bwd(do, q, q, q, o, lse, scale, config)
    return launches


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
                    for launch in capture_launches(arch, dtype, head_dim, has_docs, rule):
                        uses_mask = "RULE_BITS" in launch.constexprs
                        variant = Variant(
                            launch.kernel, arch, dtype, head_dim,
                            has_docs if uses_mask else None, rule if uses_mask else None,
                        )
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
        if v.kernel in YARDSTICK_KERNELS and v.has_docs is False and r.error is None:
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
        v.kernel, f"sm_{v.arch}", v.dtype, v.head_dim, "-" if v.has_docs is None else ("yes" if v.has_docs else "no"),
        v.rule or "-", r.num_warps, r.num_stages, r.tile,
        failed or r.registers, failed or f"{r.shared / KIB:.1f}", failed or r.stack, failed or r.local, failed or r.mma,
        failed or ("yes" if r.async_copies else "no"),
        "ok" if not r.problems() else ("ERROR" if r.error else "FAIL"),
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
    return (v.arch, list(ALL_KERNELS).index(v.kernel), v.dtype, v.head_dim, bool(v.has_docs), v.rule or "")


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
