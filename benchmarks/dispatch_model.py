"""A dispatch model of the kernels' launch order: how long the last wave runs after the rest (no GPU).

    python3 benchmarks/dispatch_model.py [--sms 132] [--lengths 2048 8192 16384] [--markdown]

Each kernel launches one program per (row block, head); a program costs its tiles (a partial tile
``PARTIAL_TILE_COST`` full ones, plus ``PROGRAM_OVERHEAD`` for loading its block and storing the
result) and the GPU starts the programs in launch order, each on the first SM that is free. The
model reports the time the last SM finishes over the ideal (total cost / SMs, or the longest
program when that is more), for rows in row order (``longest_first=False``) and longest first
(``TileSchedule.order``). It ignores memory effects and assumes one resident program per SM, as
the D=128 tiles on the H100 have (255 registers x 8 warps fill the register file). It predicts
which order loses less to the tail, not a time: ``make gpu-report`` measures both.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from layouts import LAYOUT_NAMES, LIVR_SPEC, make_layout  # noqa: E402
from livr_kernels import SegmentLayout, resolve_rule  # noqa: E402
from livr_kernels.config import HOPPER, default_config, group_split  # noqa: E402
from livr_kernels.tiles import TileSchedule  # noqa: E402

H100_SMS = 132
# A partial tile runs the mask arithmetic too: its SASS loop is ~1.5x the full one's at D=128 on sm_90.
PARTIAL_TILE_COST = 1.5
# Loading a program's own block (Q or K/V) and storing its result, in full tiles.
PROGRAM_OVERHEAD = 2.0
HEAD_DIM, Q_HEADS, KV_HEADS, TOKENS_PER_BATCH = 128, 16, 2, 16384
DEFAULT_LENGTHS = (2048, 8192, 16384)
RULE = "bottleneck"
# The tiles the autotuner chose on the H100 (benchmarks/RESULTS.md): the table's, dK/dV 64 x 128.
H100_TUNED = dataclasses.replace(default_config(HEAD_DIM, HOPPER, torch.bfloat16), dkv_block_m=64)


def finish_time(costs: Sequence[float], slots: int) -> float:
    """When the last of ``costs`` ends if each starts, in order, on the first free one of ``slots``."""
    free = [0.0] * slots
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


ORDERS = ("head-major", "row order", "longest first")


def program_costs(schedule: TileSchedule, programs_per_row: int, heads_per_program: int, order: str) -> List[float]:
    """Program costs in launch ``order``: "longest first" and "row order" launch ``programs_per_row``
    consecutive programs per row block (the kernels' 1-D grid with ``longest_first`` True or False);
    "head-major" launches every row block of one head before the next head (the 2-D grid the
    kernels had before, measured on the H100 on 2026-11-25)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    per_row = schedule.full_count.double() + PARTIAL_TILE_COST * schedule.partial_count.double()
    per_row = per_row * heads_per_program + PROGRAM_OVERHEAD  # (B, R)
    if order == "head-major":
        batch, rows = per_row.shape
        return per_row[:, None, :].expand(batch, programs_per_row, rows).flatten().tolist()
    per_row = per_row.flatten()
    rows = schedule.order if order == "longest first" else torch.arange(per_row.numel())
    return per_row[rows].repeat_interleave(programs_per_row).tolist()


def kernel_launches(layout: SegmentLayout, config, n: int, sms: int) -> Dict[str, tuple]:
    """(schedule, programs per row, heads per program) of each kernel, as the wrappers launch them."""
    rule = resolve_rule(RULE)
    forward = layout.schedule(rule, config.fwd_block_m, config.fwd_block_n, n)
    dkv = layout.schedule(rule, config.dkv_block_m, config.dkv_block_n, n, by_key=True)
    dq = layout.schedule(rule, config.dq_block_m, config.dq_block_n, n)
    group = Q_HEADS // KV_HEADS
    split = group_split(dkv.order.numel() * KV_HEADS, group, sms)
    return {
        "forward": (forward, Q_HEADS, 1),
        "dK/dV": (dkv, KV_HEADS * split, group // split),
        "dQ": (dq, Q_HEADS, 1),
    }


def model_rows(lengths: Sequence[int], sms: int, config=H100_TUNED) -> List[List[str]]:
    rows = []
    for name in LAYOUT_NAMES:
        for n in lengths:
            batch = max(1, TOKENS_PER_BATCH // n)
            drawn = make_layout(name, n, batch, LIVR_SPEC)
            layout = SegmentLayout(drawn.segment_ids, drawn.doc_ids)
            for kernel, (schedule, per_row, heads) in kernel_launches(layout, config, n, sms).items():
                costs = {order: program_costs(schedule, per_row, heads, order) for order in ORDERS}
                some = costs[ORDERS[0]]
                ideal = max(sum(some) / sms, max(some))
                ends = [finish_time(costs[order], sms) / ideal for order in ORDERS]
                rows.append([name, n, batch, kernel, len(some)] + [f"{end:.3f}" for end in ends]
                            + [f"{ends[0] / ends[-1]:.2f}x"])
    return rows


HEADER = ["layout", "N", "B", "kernel", "programs"] + [f"{order} / ideal" for order in ORDERS] + [
    "modelled gain over head-major"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=H100_SMS, help="streaming multiprocessors (132 on an H100 SXM)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.sms < 1 or min(args.lengths) < 1:
        parser.error("--sms and --lengths must be positive")
    rows = model_rows(args.lengths, args.sms)
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
        return
    widths = [max(len(str(c)) for c in column) for column in zip(HEADER, *rows)]
    for row in [HEADER] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
