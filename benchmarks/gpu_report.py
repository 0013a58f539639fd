"""One command for a lent GPU: compiled-kernel tests, then the attention benchmarks, as a dated table.

    python3 benchmarks/gpu_report.py [--results benchmarks/RESULTS.md] [--quick]

Uses the torch and triton already installed (it never installs anything). Steps:

1. ``pytest tests/test_kernels_cuda.py tests/test_host_path.py``: the compiled kernels, forward and
   every gradient, against the float64 reference; no host-device sync in a patched step.
2. Timings (CUDA events, median, ``triton.testing.do_bench``) on the LIVR layouts of
   ``benchmarks/layouts.py`` at the issue's setting (bf16, D=128, Hq=16, Hkv=2, 16k tokens per
   batch): livr with a prebuilt layout (autotuned; the static table; the table with one setting
   changed, ``TABLE_VARIANTS``, each also shown as a ratio to the table) and with the layout built
   per call, SDPA with a dense mask,
   SDPA ``is_causal`` (no LIVR mask: the floor), the same causal attention in Triton with livr's
   tiles (``triton_causal.py``: splits the distance to the floor into mask cost and Triton cost), FlexAttention (Triton backend) with the block
   mask prebuilt and built per call, FlexAttention's FLASH backend and flash-attn where they import.
   Forward, backward (forward+backward minus forward) and TFLOP/s of the required work.
3. GPU time per kernel (forward, preprocess, dK/dV, dQ, other) of one step at the first length
   (the longest by default), right after its timings and before the other lengths, for the static
   table, the autotuned config, atomic dQ and the causal Triton kernel (``kernel_breakdown.py``).
4. FlexAttention recompiles: first-call time of each new sequence length.
5. The model step packed vs padded (``benchmarks/test_model_step.py -k packing``): real tokens per
   second of one training step on the same examples laid out each way.

The markdown lands in ``--results`` (appended) and on stdout; ``--json`` keeps every number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import test_attention as bench  # noqa: E402
import kernel_breakdown  # noqa: E402
from report_runners import TABLE_VARIANTS, register_runners  # noqa: E402,F401  (TABLE_VARIANTS: read by the tests here)
from report_tables import gap_markdown, packing_markdown, ratio_cell, variants_markdown  # noqa: E402
from livr_kernels import autotune  # noqa: E402

WARMUP_MS = 50
REPEAT_MS = 300
QUICK_REPEAT_MS = 100
TFLOP = 1e12
# The CUDA tests compile every kernel variant they touch; a hang must not eat the whole lease.
TEST_TIMEOUT_S = 300
TEST_WORKERS = 8
# The compiled kernels against float64 (every gradient), and the host path: no host-device sync in a
# patched forward + backward (torch.cuda.set_sync_debug_mode("error")), op counts, decode steps.
CUDA_TEST_FILES = ("test_kernels_cuda.py", "test_host_path.py")
# The lent GPU machines stop a command at 600 s: past this budget no new timing starts (one that
# has started may still compile for a minute or two) and the report is written with what was
# measured (--budget-s 0: no limit, e.g. on your own GPU).
DEFAULT_BUDGET_S = 480
NOT_TIMED = "not timed: time budget spent"
# Characters of an error message kept in a timing row's note and in a per-kernel row.
ERROR_CHARS = 160
BREAKDOWN_ERROR_CHARS = 120
BWD_FLOP_FACTOR = 2.5
TARGETS = (
    "targets (issue 11, fwd+bwd): >= 1.3x flex, >= 4x dense SDPA, within 10% of causal SDPA; "
    "fwd >= 450, bwd >= 300 TFLOP/s of required work"
)
# Profiled kernel by kernel at the first (by default the longest) length: the static table, the autotuned config, the
# table with atomic dQ (dK/dV grows, the dQ kernel goes) and the yardstick with the static tiles.
BREAKDOWN_METHODS = ("livr_table", "livr", "livr_table_dq_atomic", "triton_causal")
# In the order they are timed: what the targets compare first, so that a spent budget cuts
# the one-setting variants of the static table and the optional backends.
METHODS = ("livr", "livr_table", "sdpa_causal", "triton_causal", "flex", "flex+block_mask", "sdpa_dense_mask",
           "livr+layout", "livr_table_dq_atomic", "livr_table_dkv64", "livr_table_tma", "livr_table_row_order",
           "livr_table_dkv_in_place", "flex_flash", "flash_attn")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    for name in ("transformers", "peft", "accelerate", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # an optional package may be missing or broken; the report says so
            out[name] = "not importable"
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        out["cuda"] = torch.version.cuda
    return out


class Budget:
    """Seconds left of the report's time budget (``seconds`` 0: unlimited)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.end = None if not seconds else clock() + seconds

    def left(self, cap: float = float("inf")) -> float:
        return cap if self.end is None else max(0.0, min(cap, self.end - self.clock()))

    def spent(self) -> bool:
        return self.left() <= 0


def run_cuda_tests(budget: "Budget" = Budget(0)) -> dict:
    start = time.perf_counter()
    timeout = budget.left(TEST_TIMEOUT_S)
    cmd = [sys.executable, "-m", "pytest", *(str(ROOT / "tests" / name) for name in CUDA_TEST_FILES), "-q", "-p", "no:cacheprovider"]
    try:
        import xdist  # noqa: F401  (compiling the kernel variants dominates: spread it over the CPU cores)

        cmd += ["-n", str(min(TEST_WORKERS, os.cpu_count() or 1))]
    except ImportError:
        pass
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(output[-3000:], flush=True)
        return {"returncode": 1, "summary": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - start}


def run_packing_step(budget: "Budget" = Budget(0)) -> list:
    """Rows of the packed vs padded model-step benchmark, or one row saying why there are none."""
    timeout = budget.left(TEST_TIMEOUT_S)
    if timeout <= 0:
        return [{"error": NOT_TIMED}]
    out = ROOT / "benchmarks" / ".packing_step.json"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_model_step.py"), "-k", "packing", "-q",
           "-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={out}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout:.0f} s"}]
    if proc.returncode != 0 or not out.exists():
        return [{"error": ((proc.stdout + proc.stderr).strip().splitlines() or ["no output"])[-1]}]
    rows = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    out.unlink()
    return rows


def tuned_configs() -> list:
    """The configs the autotuner chose in this process, one line per tuning key."""
    return [f"D={key[3]}, N bucket {key[6]}, docs {key[7]}: {config}" for key, config in autotune._memory.items()]


def time_method(case, method: str, repeat_ms: int) -> dict:
    """Median ms of the forward and of forward+backward, or the error that stopped it."""
    result = {}
    for mode in bench.MODES:
        try:
            step = bench.make_step(case, method, mode)
            out = step()
            if mode == "fwd":
                expected = bench.expected_output(case, method)
                if expected is not None:
                    live = case.live_rows[:, None, :, None].expand_as(out)
                    err = (out.float()[live] - expected.float()[live]).abs().max().item()
                    result["max_abs_diff"] = err
            result[mode] = do_bench(step, warmup=WARMUP_MS, rep=repeat_ms, return_mode="median")
        except Exception as exc:  # one failing method must not hide the others' numbers
            result[mode] = None
            result["error"] = error_text(exc, ERROR_CHARS)
            break
    return result


def flex_recompile_times(layout_name: str, lengths, budget: "Budget" = Budget(0)) -> list:
    """First-call time (compile + run) of compiled flex for each new sequence length."""
    rows = []
    for n in lengths:
        if budget.spent():
            break
        case = bench.make_case(layout_name, n)
        step = bench.make_step(case, "flex", "fwd_bwd")
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        rows.append({"n": n, "first_call_s": first, "steady_ms": do_bench(step, warmup=10, rep=50, return_mode="median")})
    return rows


def required_tflops(flops: float, ms) -> str:
    return "-" if ms is None or ms <= 0 else f"{flops / (ms * 1e-3) / TFLOP:.0f}"


def error_text(exc: Exception, limit: int) -> str:
    """One line for a table cell: the exception's type and the start of its message's first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:limit] if str(exc) else ''}"


def fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def benchmark(lengths, layouts, repeat_ms, budget: "Budget" = Budget(0)) -> list:
    register_runners()
    rows = []
    # Length outside, layout inside: a budget that runs out still leaves both layouts at the lengths timed.
    for n in lengths:
        for layout_name in layouts:
            if budget.spent():
                rows += [{"layout": layout_name, "n": n, "method": method, "error": NOT_TIMED} for method in METHODS]
                continue
            case = bench.make_case(layout_name, n)
            fwd_flops = bench.FWD_FLOPS_PER_PAIR_PER_DIM * bench.SHAPE.head_dim * case.allowed_pairs * bench.SHAPE.q_heads
            for method in METHODS:
                if method not in bench.RUNNERS:
                    rows.append({"layout": layout_name, "n": n, "method": method, "error": "not importable here"})
                    continue
                if budget.spent():
                    rows.append({"layout": layout_name, "n": n, "method": method, "error": NOT_TIMED})
                    continue
                timing = time_method(case, method, repeat_ms)
                fwd, fwd_bwd = timing.get("fwd"), timing.get("fwd_bwd")
                bwd = None if fwd is None or fwd_bwd is None else fwd_bwd - fwd
                row = {
                    "layout": layout_name, "n": n, "batch": case.segment_ids.shape[0], "method": method,
                    "fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fwd_bwd,
                    "fwd_tflops": required_tflops(fwd_flops, fwd),
                    "bwd_tflops": required_tflops(BWD_FLOP_FACTOR * fwd_flops, bwd),
                    "allowed_of_causal": case.allowed_pairs / case.causal_pairs,
                    **{k: v for k, v in timing.items() if k in ("error", "max_abs_diff")},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            bench.make_case.cache_clear()
            torch.cuda.empty_cache()
    return rows


def kernel_breakdowns(n: int, layouts, budget: "Budget" = Budget(0)) -> list:
    """Per-kernel GPU time of one forward + backward step of each ``BREAKDOWN_METHODS`` at length ``n``."""
    register_runners()
    rows = []
    for layout_name in layouts:
        for method in BREAKDOWN_METHODS:
            row = {"layout": layout_name, "n": n, "method": method}
            if budget.spent():
                rows.append({**row, "error": NOT_TIMED})
                continue
            try:
                step = bench.make_step(bench.make_case(layout_name, n), method, "fwd_bwd")
                kernels = kernel_breakdown.profile_kernels(step)
                rows.append({**row, **kernel_breakdown.breakdown(kernels, kernel_breakdown.PROFILED_STEPS)})
            except Exception as exc:  # a profiler that fails must not cost the report
                rows.append({**row, "error": error_text(exc, BREAKDOWN_ERROR_CHARS)})
        bench.make_case.cache_clear()
        torch.cuda.empty_cache()
    return rows


def markdown(info: dict, tests: dict, rows: list, recompiles: list, packing: list = (), kernels: list = ()) -> str:
    lines = [
        f"## {datetime.date.today().isoformat()}, {info.get('device', 'no GPU')} ({info.get('capability', '-')}): make gpu-report",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("device", "capability")) + ".",
        f"Shape: {str(bench.SHAPE.dtype).replace('torch.', '')}, D={bench.SHAPE.head_dim}, "
        f"Hq={bench.SHAPE.q_heads}, Hkv={bench.SHAPE.kv_heads}, {bench.SHAPE.tokens_per_batch} tokens per batch, bottleneck rule.",
        f"CUDA tests ({', '.join('tests/' + name for name in CUDA_TEST_FILES)}): {tests['summary']} in {tests['seconds']:.0f} s.",
        "Times are medians of CUDA-event timings (triton.testing.do_bench); bwd = fwd+bwd minus fwd; "
        "TFLOP/s count only the work the mask requires (4*D FLOPs per allowed pair and head, x2.5 for bwd), "
        "the same numerator for every method. " + TARGETS + ".",
        "",
        "| layout | N | B | method | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | vs livr (fwd+bwd) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    livr = {(r["layout"], r["n"]): r.get("fwd_bwd_ms") for r in rows if r["method"] == "livr"}
    for r in rows:
        base = livr.get((r["layout"], r["n"]))
        ratio = ratio_cell(r.get("fwd_bwd_ms"), base)
        note = r.get("error", "")
        if "max_abs_diff" in r:
            note = (note + f" max diff {r['max_abs_diff']:.2g}").strip()
        lines.append(
            f"| {r['layout']} | {r['n']} | {r.get('batch', '-')} | {r['method']} | {fmt_ms(r.get('fwd_ms'))} | "
            f"{fmt_ms(r.get('bwd_ms'))} | {fmt_ms(r.get('fwd_bwd_ms'))} | {r.get('fwd_tflops', '-')} | "
            f"{r.get('bwd_tflops', '-')} | {ratio} | {note} |"
        )
    skipped = sum(r.get("error") == NOT_TIMED for r in rows)
    if skipped:
        lines += ["", f"Time budget spent: {skipped} of {len(rows)} timings above were not run "
                  "(`--budget-s`, or fewer `--lengths`, to time them)."]
    lines += variants_markdown(rows)
    lines += gap_markdown(rows)
    lines += kernel_breakdown.breakdown_markdown(list(kernels))
    if recompiles:
        lines += ["", "FlexAttention (compiled, dynamic=False) first call per new length, fwd+bwd:", "",
                  "| N | first call s | steady ms |", "|---|---|---|"]
        lines += [f"| {r['n']} | {r['first_call_s']:.1f} | {r['steady_ms']:.3f} |" for r in recompiles]
    if packing:
        lines += packing_markdown(packing)
    return "\n".join(lines) + "\n"


def timings(lengths, layouts, repeat_ms, budget: "Budget" = Budget(0)):
    """(timing rows, per-kernel rows): the first length is timed, then profiled kernel by kernel,
    before the other lengths, so a budget spent on the shorter lengths still leaves the profile."""
    rows = benchmark(lengths[:1], layouts, repeat_ms, budget)
    kernels = kernel_breakdowns(lengths[0], layouts, budget)
    return rows + benchmark(lengths[1:], layouts, repeat_ms, budget), kernels


def default_lengths(quick: bool) -> list:
    """Longest first: the targets are judged at 2k-16k, and a spent budget then cuts the shortest."""
    return sorted((4096, 8192) if quick else bench.SHAPE.seq_lens, reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="markdown file to append the report to")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON here")
    parser.add_argument("--quick", action="store_true", help="N=4k and 8k only, shorter timing")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths to time, in this order (default: 16k, 8k, 4k, 2k)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds after which no new timing starts and the report is written with what was measured "
                             f"(default {DEFAULT_BUDGET_S}: the lent GPU machines stop a command at 600 s; 0: no limit)")
    args = parser.parse_args(argv)
    if not args.budget_s >= 0:  # also refuses nan
        parser.error(f"--budget-s must be 0 (no limit) or a positive number of seconds; got {args.budget_s}")
    budget = Budget(args.budget_s)
    if not torch.cuda.is_available():
        print("gpu-report needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: gpu-report times compiled kernels", file=sys.stderr)
        return 2
    info = versions()
    print(json.dumps(info), flush=True)
    tests = {"returncode": None, "summary": "skipped (--skip-tests)", "seconds": 0.0}
    if not args.skip_tests:
        tests = run_cuda_tests(budget)
    lengths = args.lengths or default_lengths(args.quick)
    rows, kernels = timings(lengths, bench.LAYOUT_NAMES, QUICK_REPEAT_MS if args.quick else REPEAT_MS, budget)
    recompiles = flex_recompile_times("single", (3000, 5000, 7000), budget)
    packing = run_packing_step(budget)
    report = markdown(info, tests, rows, recompiles, packing, kernels)
    report += "\nConfigs the autotuner chose for `livr` (`livr_table` is the static table):\n\n" + "".join(
        f"- {line}\n" for line in tuned_configs())
    print(report, flush=True)
    with open(args.results, "a", encoding="utf-8") as fh:
        fh.write("\n" + report)
    if args.json:
        args.json.write_text(json.dumps({"versions": info, "tests": tests, "rows": rows, "recompiles": recompiles,
                                               "packing": packing, "kernels": kernels}, indent=1))
    return 0 if tests["returncode"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
