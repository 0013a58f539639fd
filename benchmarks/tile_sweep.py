"""Time the kernels over a grid of tile configs on one LIVR layout (a GPU tool, for the config table).

    python3 benchmarks/tile_sweep.py [--n 8192] [--layout single] [--json out.json]

The forward is timed alone; the backward as forward+backward minus forward. The dK/dV tiles are
swept with the dQ tiles fixed, then the dQ tiles with the best dK/dV, so the grid stays small.
A config that does not compile or fit is reported with its error, not dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from layouts import LIVR_SPEC, make_layout  # noqa: E402
from livr_kernels import SegmentLayout, segment_attention  # noqa: E402
from livr_kernels.config import default_config  # noqa: E402

RULE = "bottleneck"
HEAD_DIM, Q_HEADS, KV_HEADS, TOKENS = 128, 16, 2, 16384
WARMUP_MS, REPEAT_MS = 25, 100
# (block_m, block_n, warps, stages)
FWD_GRID = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
    (128, 128, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4),
]
DKV_GRID = [
    (32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
    (64, 128, 4, 3), (128, 128, 8, 2), (32, 128, 4, 3), (16, 128, 4, 3),
]
DQ_GRID = [(128, 32, 8), (128, 64, 8), (64, 64, 4), (64, 32, 4), (128, 64, 4), (64, 128, 8), (128, 128, 8)]


def make_inputs(n: int, layout_name: str):
    torch.manual_seed(0)
    batch = max(1, TOKENS // n)
    layout = make_layout(layout_name, n, batch, LIVR_SPEC)
    seg = layout.segment_ids.cuda()
    doc = None if layout.doc_ids is None else layout.doc_ids.cuda()
    q = torch.randn(batch, Q_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    return SegmentLayout(seg, doc), q, k, v, do


def time_config(inputs, config) -> dict:
    layout, q, k, v, do = inputs

    def fwd():
        with torch.no_grad():
            return segment_attention(q, k, v, layout, RULE, backend="triton", config=config)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        segment_attention(q, k, v, layout, RULE, backend="triton", config=config).backward(do)

    try:
        f = do_bench(fwd, warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="median")
        fb = do_bench(fwd_bwd, warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="median")
        return {"fwd_ms": f, "bwd_ms": fb - f}
    except Exception as exc:  # a config that does not fit is a result too
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--layout", default="single", choices=("single", "packed"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    inputs = make_inputs(args.n, args.layout)
    base = default_config(HEAD_DIM, torch.cuda.get_device_capability(), torch.bfloat16)
    rows = [{"part": "default", "config": dataclasses.asdict(base), **time_config(inputs, base)}]
    print(json.dumps(rows[-1]), flush=True)
    for bm, bn, warps, stages in FWD_GRID:
        cfg = dataclasses.replace(base, fwd_block_m=bm, fwd_block_n=bn, fwd_warps=warps, num_stages=stages)
        rows.append({"part": "fwd", "tile": f"{bm}x{bn} w{warps} s{stages}", **time_config(inputs, cfg)})
        print(json.dumps(rows[-1]), flush=True)
    best_dkv, best_ms = None, float("inf")
    for bm, bn, warps, stages in DKV_GRID:
        cfg = dataclasses.replace(base, dkv_block_m=bm, dkv_block_n=bn, bwd_warps=warps, num_stages=stages)
        row = {"part": "dkv", "tile": f"{bm}x{bn} w{warps} s{stages}", **time_config(inputs, cfg)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row.get("bwd_ms", float("inf")) < best_ms:
            best_dkv, best_ms = cfg, row["bwd_ms"]
    for bm, bn, warps in DQ_GRID:
        cfg = dataclasses.replace(best_dkv, dq_block_m=bm, dq_block_n=bn, bwd_warps=warps)
        rows.append({"part": "dq", "tile": f"{bm}x{bn} w{warps} (dkv {best_dkv.dkv_block_m}x{best_dkv.dkv_block_n})", **time_config(inputs, cfg)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| part | tile | fwd ms | bwd ms | note |\n|---|---|---|---|---|")
    for r in rows:
        fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "-"
        bwd = f"{r['bwd_ms']:.3f}" if "bwd_ms" in r else "-"
        print(f"| {r['part']} | {r.get('tile', 'table')} | {fwd} | {bwd} | {r.get('error', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
