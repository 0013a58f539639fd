"""Tile-skipping statistics of the livr kernels on LIVR layouts (pure torch, runs on CPU in seconds).

For each layout and kernel (forward, dK/dV, dQ, with the tile sizes ``default_config`` gives for
the GPU generation), the share of tiles that are empty (never loaded), partial (mask computed) and
full (no mask arithmetic), and how many of a plain causal kernel's tiles the rule skips. "Pair
efficiency" is the share of the (query, key) pairs inside visited tiles that the mask allows:
the useful fraction of the work the kernel actually does.

    python benchmarks/tile_stats.py                 # the tables in benchmarks/RESULTS.md
    python benchmarks/tile_stats.py --seq-len 4096 --seeds 2
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Sequence

import torch

from layouts import LAYOUT_NAMES, LIVR_SPEC, allowed_pairs, make_layout
from livr_kernels import SegmentLayout, TileMask, resolve_rule
from livr_kernels.blocks import TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from livr_kernels.config import default_config

TARGET_SEQ_LEN = 8192
TARGET_HEAD_DIM = 128
# As in the benchmarks: the batch holds this many tokens.
TOKENS_PER_BATCH = 16384
SWEEP_SEQ_LENS = (2048, 4096, 8192, 16384)
ARCHS = {"sm_90": (9, 0), "sm_80": (8, 0)}
RULE_NAMES = ("bottleneck", "standard")
DEFAULT_SEEDS = 4


@dataclass
class TileCounts:
    empty: int = 0
    partial: int = 0
    full: int = 0
    causal: int = 0
    allowed_pairs: int = 0
    causal_pairs: int = 0
    visited_pairs: int = 0

    def add(self, tiles: TileMask, allowed_pairs: int) -> None:
        classes = tiles.to_dense()
        self.empty += int((classes == TILE_EMPTY).sum())
        self.partial += int((classes == TILE_PARTIAL).sum())
        self.full += int((classes == TILE_FULL).sum())
        self.causal += tiles.causal_tiles()
        self.allowed_pairs += allowed_pairs
        n, batch = tiles.num_keys, classes.shape[0]
        self.causal_pairs += batch * n * (n + 1) // 2
        self.visited_pairs += int(((classes != TILE_EMPTY).sum())) * tiles.block_m * tiles.block_n

    @property
    def total(self) -> int:
        return self.empty + self.partial + self.full

    def row(self) -> List[str]:
        visited = self.partial + self.full
        return [
            f"{100 * self.empty / self.total:.1f}%",
            f"{100 * self.partial / self.total:.1f}%",
            f"{100 * self.full / self.total:.1f}%",
            f"{100 * (1 - visited / self.causal):.1f}%",
            f"{100 * self.allowed_pairs / max(1, self.visited_pairs):.1f}%",
        ]


def kernel_tiles(capability) -> List[tuple]:
    """(kernel name, block_m, block_n) of each kernel; tiles are (query block, key block) pairs."""
    config = default_config(TARGET_HEAD_DIM, capability)
    return [
        ("forward", config.fwd_block_m, config.fwd_block_n),
        ("dK/dV", config.dkv_block_m, config.dkv_block_n),
        ("dQ", config.dq_block_m, config.dq_block_n),
    ]


def collect(n: int, seeds: int, layout_name: str, rule: str, tiles: Sequence[tuple]) -> List[TileCounts]:
    counts = [TileCounts() for _ in tiles]
    batch = max(1, TOKENS_PER_BATCH // n)
    for seed in range(seeds):
        layout = make_layout(layout_name, n, batch, LIVR_SPEC, seed=seed)
        seg_layout = SegmentLayout(layout.segment_ids, layout.doc_ids)
        pairs = allowed_pairs(layout.segment_ids, layout.doc_ids, rule)
        for count, (_, bm, bn) in zip(counts, tiles):
            count.add(TileMask(seg_layout, resolve_rule(rule), bm, bn, n), pairs)
    return counts


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


STAT_COLUMNS = ["empty", "partial", "full", "causal tiles skipped", "pair efficiency"]


def target_table(n: int, seeds: int) -> str:
    rows = []
    for arch, capability in ARCHS.items():
        tiles = kernel_tiles(capability)
        for layout_name in LAYOUT_NAMES:
            for rule in RULE_NAMES:
                for (kernel, bm, bn), count in zip(tiles, collect(n, seeds, layout_name, rule, tiles)):
                    rows.append([arch, layout_name, rule, kernel, f"{bm}x{bn}", count.total] + count.row())
    return markdown(["arch", "layout", "rule", "kernel", "tile", "tiles"] + STAT_COLUMNS, rows)


def sweep_table(seq_lens: Sequence[int], seeds: int) -> str:
    rows = []
    tiles = kernel_tiles(ARCHS["sm_90"])[:1]
    for n in seq_lens:
        for layout_name in LAYOUT_NAMES:
            (count,) = collect(n, seeds, layout_name, "bottleneck", tiles)
            allowed_of_causal = count.allowed_pairs / count.causal_pairs
            rows.append([n, max(1, TOKENS_PER_BATCH // n), layout_name, f"{100 * allowed_of_causal:.1f}%"] + count.row())
    return markdown(["N", "batch", "layout", "allowed pairs of causal"] + STAT_COLUMNS, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=TARGET_SEQ_LEN, help="N of the per-kernel table")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="layouts drawn per configuration")
    parser.add_argument("--sweep", type=int, nargs="*", default=list(SWEEP_SEQ_LENS), help="N of the forward sweep table")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.seeds < 1:
        parser.error("--seq-len and --seeds must be positive")
    torch.manual_seed(0)
    print(f"Per kernel, N={args.seq_len}, batch {max(1, TOKENS_PER_BATCH // args.seq_len)}, "
          f"bf16 D={TARGET_HEAD_DIM} tiles from default_config, {args.seeds} layouts per row:\n")
    print(target_table(args.seq_len, args.seeds))
    if args.sweep:
        print(f"\nForward (sm_90 tiles), bottleneck rule, {args.seeds} layouts per row:\n")
        print(sweep_table(args.sweep, args.seeds))


if __name__ == "__main__":
    main()
