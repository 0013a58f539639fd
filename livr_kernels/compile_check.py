"""Ahead-of-time compile of every kernel variant for sm_80 and sm_90: registers, spills, shared memory.

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

    python -m livr_kernels.compile_check [--arch 80 90] [--quick | --full] [--dtypes ...] [--rules ...]
                                         [--markdown] [--jobs N]
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

KIB = 1024
ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in maximum), per architecture.
SHARED_LIMIT = {80: 163 * KIB, 90: 227 * KIB}
WARP_SIZE = 32
# What gets compiled: (dtype, head dim) pairs and rules. fp16 and bf16 compile to the same
# schedule, so the padded (80) and largest (256) head dims are checked in bf16 only by default;
# --full takes every head-dim block, --dtypes adds fp32 (IEEE dots: no tensor cores) and --rules
# other shipped rules (RULE_BITS is a constexpr, but the rule changes no resource count).
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_DTYPES = ("fp16", "bf16")
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
# PTX instruction prefixes of the tensor-core paths, most specific first.
MMA_KINDS = (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
ASYNC_COPY = "cp.async"
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


@dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``; sizes in bytes (stack and local per thread)."""

    registers: int
    stack: int
    static_shared: int
    local: int


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


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jit_function(kernel: str):
    from triton.runtime.jit import JITFunction

    module, attr = KERNELS[kernel]
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
    from triton.runtime.jit import create_function_from_signature

    from .backward import segment_attention_bwd
    from .blocks import SegmentLayout
    from .config import default_config
    from .forward import segment_attention_fwd
    from .segments import Segment, resolve_rule

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    backend = make_backend(_target(arch))
    launches: List[KernelLaunch] = []

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

    batch, n = 1, CAPTURE_SEQ_LEN
    seg = torch.full((batch, n), int(Segment.TEXT), dtype=torch.int32)
    seg[:, n // 8: n // 2] = int(Segment.IMAGE)
    seg[:, n // 2 + n // 16: n // 2 + n // 8] = int(Segment.LATENT)
    seg[:, n - n // 16:] = int(Segment.ANSWER)
    doc = torch.arange(n, dtype=torch.int32)[None] * CAPTURE_DOCS // n if has_docs else None
    layout = SegmentLayout(seg, doc)
    shape_q = (batch, TARGET_Q_HEADS, n, head_dim)
    shape_kv = (batch, TARGET_KV_HEADS, n, head_dim)
    q, do = torch.zeros(shape_q, dtype=torch_dtype), torch.zeros(shape_q, dtype=torch_dtype)
    k, v = torch.zeros(shape_kv, dtype=torch_dtype), torch.zeros(shape_kv, dtype=torch_dtype)
    config = config or default_config(head_dim, _capability(arch), torch_dtype)
    resolved = resolve_rule(rule)
    scale = head_dim ** -0.5

    patched = []
    try:
        for kernel in KERNELS:
            fn = _jit_function(kernel)
            fn.run = recorder(kernel, fn)
            patched.append(fn)
        # The launches are only recorded, so o and lse come back uninitialised: fine for the capture.
        o, lse = segment_attention_fwd(q, k, v, layout, resolved, scale, config)
        segment_attention_bwd(do, q, k, v, o, lse, layout, resolved, scale, config)
    finally:
        for fn in patched:
            del fn.run
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
    return (v.arch, list(KERNELS).index(v.kernel), v.dtype, v.head_dim, bool(v.has_docs), v.rule or "")


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
) -> Tuple[List[KernelReport], float]:
    start = time.perf_counter()
    reports = compile_all(plan(archs, selection(quick, full, dtypes), rules), workers)
    return reports, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m livr_kernels.compile_check",
        description="Compile every livr kernel variant for sm_80/sm_90 without a GPU; fail on spills or too much shared memory.",
    )
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS), help="target compute capabilities")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=f"head dims {CORE_HEAD_DIMS} only")
    group.add_argument("--full", action="store_true", help=f"head dims {FULL_HEAD_DIMS}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DEFAULT_DTYPES),
                        help="dtypes to compile (fp32 spills with the shared tile configs and compiles slowly)")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="shipped rule names (RULE_BITS is a constexpr)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
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
    reports, seconds = run_checks(args.arch, args.quick, args.full, args.rules, args.jobs, args.dtypes)
    print(format_markdown(reports) if args.markdown else format_table(reports))
    for line in wgmma_summary(reports):
        print(line)
    problems = [p for r in reports for p in r.problems()]
    print(f"{len(reports)} kernels compiled for {', '.join(f'sm_{a}' for a in args.arch)} in {seconds:.0f} s "
          f"(registers and stack from cuobjdump; shared = Triton's dynamic + static)")
    if problems:
        print(f"compile_check FAILED: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("compile_check passed: no spills, shared memory within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
