"""Where one forward + backward step spends its GPU time, kernel by kernel (torch.profiler).

``gpu_report`` times whole steps; this splits a step of ``livr_table`` and of ``triton_causal``
into the forward, the backward's preprocess, dK/dV and dQ kernels, and everything else (torch ops:
the dK/dV split's reduction, the yardstick's K/V repeat, copies). It tells which kernel the next
tuning step should look at.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel-name fragments of each part, livr's kernels and the yardstick's (first match wins).
PARTS = (
    ("forward", ("segment_attention_fwd_kernel", "causal_fwd_kernel")),
    ("preprocess", ("segment_attention_bwd_kernel_preprocess",)),
    ("dK/dV", ("segment_attention_bwd_kernel_dkv", "causal_bwd_dkv_kernel")),
    ("dQ", ("segment_attention_bwd_kernel_dq", "causal_bwd_dq_kernel")),
)
OTHER = "other"
COLUMNS = tuple(name for name, _ in PARTS) + (OTHER,)
# Steps profiled after one untimed step (compiles, autotuning, allocator warm-up).
PROFILED_STEPS = 5


def part_of(kernel_name: str) -> str:
    for part, fragments in PARTS:
        if any(fragment in kernel_name for fragment in fragments):
            return part
    return OTHER


def breakdown(kernels: Iterable[Tuple[str, float]], steps: int) -> Dict[str, float]:
    """Milliseconds per step of each part, from (kernel name, microseconds) pairs over ``steps`` steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    totals = dict.fromkeys(COLUMNS, 0.0)
    for name, micros in kernels:
        totals[part_of(name)] += micros / 1000.0 / steps
    return totals


def profile_kernels(step: Callable[[], object], steps: int = PROFILED_STEPS,
                    device_type: DeviceType = DeviceType.CUDA) -> List[Tuple[str, float]]:
    """(name, microseconds) of every event on ``device_type`` over ``steps`` calls of ``step``; an
    error if the profiler recorded none (a table of zeros would read as free kernels)."""
    step()
    # CPU activity also on a GPU: kernels recorded without it have gone missing (meta-pytorch/tritonbench#401).
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == DeviceType.CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device_type == DeviceType.CUDA:
            torch.cuda.synchronize()
    events = [(event.name, event.time_range.elapsed_us()) for event in prof.events() if event.device_type == device_type]
    if not events:
        raise RuntimeError(f"the profiler recorded no {device_type} events (is CUPTI available?)")
    return events


def breakdown_markdown(rows: List[dict]) -> List[str]:
    """Lines of the per-kernel table: each row has layout, n, method and one ms value per column."""
    if not rows:
        return []
    lines = ["", f"GPU time of one forward + backward step by kernel (torch.profiler, mean of {PROFILED_STEPS} steps, ms):",
             "", "| layout | N | method | " + " | ".join(COLUMNS) + " | total |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['n']} | {r['method']} | {r['error']} |" + " - |" * len(COLUMNS))
            continue
        cells = [f"{r[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {r['layout']} | {r['n']} | {r['method']} | " + " | ".join(cells)
                     + f" | {sum(r[c] for c in COLUMNS):.3f} |")
    return lines
