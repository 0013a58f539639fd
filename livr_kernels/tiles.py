"""Per-block summaries of a segment layout, the classification of attention tiles, tile schedules.

Nothing here builds an N x N mask. Every block of ``g`` tokens is summarised by a bit mask of the
segment kinds it holds (and, with document ids, the smallest and largest one): O(N) in all. From a
query block's and a key block's summaries and their positions a tile is

* EMPTY: no (query, key) pair in it is allowed: never visited, K and V never loaded;
* FULL: every pair is allowed: computed without any mask arithmetic;
* PARTIAL: anything else: the mask is computed from the per-token ids.

The three kernels tile differently (forward 128 x 64, dK/dV 32 x 128, dQ 128 x 32, say). All their
``TileSchedule`` lists come from ONE classification at the common fine granularity ``g`` (the gcd
of every block size): a coarse tile is EMPTY when all its fine tiles are, FULL when all are, else
PARTIAL. The fine classification is a single gather from a per-rule table indexed by each fine
tile's position class, document class, query kinds and key kinds, so a layout's three schedules cost a
fixed handful of tensor ops (no Python loop over kinds, no host-device synchronisation).

A ``TileSchedule`` lists, per query block (or per key block, for dK/dV), the full and the partial
tiles to visit, like FlexAttention's BlockMask: the kernels run one branch-free loop over each
list, which the compiler can software-pipeline. It takes (N/BM) x (N/BN) int32 per list and batch
row, e.g. 0.25 MiB at N = 16k with 128 x 64 tiles, against 256 MiB for a dense boolean mask, and is
built once per layout, rule and tile shape, then shared by every layer and head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Tuple

import torch
import triton

from .segments import NUM_SEGMENTS, AttentionRule, Segment

TILE_EMPTY = 0
TILE_PARTIAL = 1
TILE_FULL = 2
TILE_NAMES = {TILE_EMPTY: "empty", TILE_PARTIAL: "partial", TILE_FULL: "full"}

# Bit of a block's kind mask set when the block runs past the end of the sequence: the kernels need
# bounds masks there, so such a block is never FULL. Positions past the end get this "kind".
PAST_END = NUM_SEGMENTS
_NUM_KIND_MASKS = 1 << (NUM_SEGMENTS + 1)
_INT32_MAX = torch.iinfo(torch.int32).max
_INT32_MIN = torch.iinfo(torch.int32).min
# Weights of the fine classes when coarse tiles sum them: EMPTY 0, FULL 1, PARTIAL this much, so a
# coarse tile of W fine tiles sums to 0 (all empty), W (all full), or anything else (partial).
_PARTIAL_WEIGHT = 1 << 10
_FINE_WEIGHT = {TILE_EMPTY: 0, TILE_FULL: 1, TILE_PARTIAL: _PARTIAL_WEIGHT}
# Position classes of fine tiles are cached per shape (training repeats a handful of lengths), a few
# tables of at most this many entries (8 MiB each): larger ones cost more memory than their 3 ops.
_POSITION_CACHE_SIZE = 4
_POSITION_CACHE_MAX_ENTRIES = 1 << 20

# (block_m, block_n, by_key): one kernel's tile shape; by_key lists query blocks per key block.
TileShape = Tuple[int, int, bool]


@dataclass(frozen=True)
class BlockSummary:
    """Per-block summaries at one block size, each (B, num_blocks).

    ``kinds`` (int64): bit k set when the block holds a token of kind k; bit ``PAST_END`` when it
    runs past the end. ``doc_min`` / ``doc_max`` (int32, None without document ids): the range of
    its non-PAD tokens' (dense) document ids, INT32_MAX / INT32_MIN when it has none.
    """

    block_size: int
    kinds: torch.Tensor
    doc_min: Optional[torch.Tensor] = None
    doc_max: Optional[torch.Tensor] = None

    @property
    def num_blocks(self) -> int:
        return self.kinds.shape[-1]


def summarize_blocks(
    segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], block_size: int, num_blocks: Optional[int] = None
) -> BlockSummary:
    """O(N) summaries on the ids' device; ``segment_ids`` and ``doc_ids`` are (B, N). ``num_blocks``
    (at least cdiv(N, block_size)) appends blocks that lie wholly past the end."""
    batch, n = segment_ids.shape
    num_blocks = triton.cdiv(n, block_size) if num_blocks is None else num_blocks
    tail = num_blocks * block_size - n
    seg = segment_ids.to(torch.int64)
    if tail:
        seg = torch.nn.functional.pad(seg, (0, tail), value=PAST_END)
    seg = seg.view(batch, num_blocks, block_size)
    # Each token writes its kind's bit into its block's slot for that kind; the slots sum to the mask.
    slots = torch.zeros(batch, num_blocks, NUM_SEGMENTS + 1, dtype=torch.int64, device=seg.device)
    kinds = slots.scatter_(2, seg, 1 << seg).sum(-1)
    if doc_ids is None:
        return BlockSummary(block_size, kinds)
    doc = torch.nn.functional.pad(doc_ids, (0, tail)) if tail else doc_ids
    doc = doc.view(batch, num_blocks, block_size)
    dead = seg >= int(Segment.PAD)  # PAD, or past the end
    doc_min = doc.masked_fill(dead, _INT32_MAX).amin(dim=2)
    doc_max = doc.masked_fill(dead, _INT32_MIN).amax(dim=2)
    return BlockSummary(block_size, kinds, doc_min, doc_max)


def concat_summaries(head: BlockSummary, tail: BlockSummary) -> BlockSummary:
    if head.doc_min is None:
        return BlockSummary(head.block_size, torch.cat([head.kinds, tail.kinds], 1))
    return BlockSummary(
        head.block_size,
        torch.cat([head.kinds, tail.kinds], 1),
        torch.cat([head.doc_min, tail.doc_min], 1),
        torch.cat([head.doc_max, tail.doc_max], 1),
    )


@dataclass(frozen=True)
class TileSchedule:
    """Tiles to visit per row block: ``*_count`` (B, R) and ``*_index`` (B, R, C) int32, ascending.

    Rows are query blocks (forward, dQ) or key blocks (dK/dV, built from the transposed classes).
    Only the first ``count`` entries of an index row are meaningful. ``order`` (B * R,) int64 lists
    the rows ``b * R + r`` by decreasing number of tiles (ties in row order): the kernels launch
    the longest rows first, so the last wave on the GPU holds the shortest programs (the longest-
    processing-time-first rule; in row order a causal or packed layout ends on its longest rows).
    """

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    order: torch.Tensor

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> "TileSchedule":
        """From (3, B, R, C) int8 keys: [0] marks the full tiles, [1] the partial ones, [2] both."""
        return cls.batch_from_keys(keys[:, None])[0]

    @classmethod
    def batch_from_keys(cls, keys: torch.Tensor) -> List["TileSchedule"]:
        """S schedules from (3, S, B, R, C) int8 keys (as ``from_keys``), with one sort of the tile
        lists, one count and one sort of the launch orders for all of them."""
        # A stable descending sort puts the marked columns first, in ascending order.
        index = torch.sort(keys[:2], dim=-1, descending=True, stable=True).indices.to(torch.int32)
        count = keys.sum(-1, dtype=torch.int32)
        order = torch.sort(count[2].flatten(1), dim=-1, descending=True, stable=True).indices
        return [cls(count[0, s], index[0, s], count[1, s], index[1, s], order[s]) for s in range(keys.shape[1])]

    @property
    def tiles_per_row(self) -> torch.Tensor:
        """(B, R) int32: tiles each row visits."""
        return self.full_count + self.partial_count

    @classmethod
    def from_classes(cls, classes: torch.Tensor) -> "TileSchedule":
        """From (B, R, C) TILE_* classes."""
        full, partial = classes == TILE_FULL, classes == TILE_PARTIAL
        return cls.from_keys(torch.stack([full, partial, full | partial]).to(torch.int8))


class _DeviceTables:
    """Small constant tables, built once per device (a host-to-device copy per forward would make
    the host wait for the GPU)."""

    def __init__(self):
        self._rules: Dict[tuple, torch.Tensor] = {}
        self._keys: Dict[tuple, torch.Tensor] = {}
        self._positions: Dict[tuple, torch.Tensor] = {}

    def rule(self, rule: AttentionRule, device: torch.device) -> torch.Tensor:
        """(3, 3, 64, 64) int16: fine-tile weight by [position class, document class, query kind mask,
        key kind mask]."""
        key = (rule.bits, device)
        if key not in self._rules:
            self._rules[key] = _rule_table(rule).to(device)
        return self._rules[key]

    def keys(self, window: int, device: torch.device) -> torch.Tensor:
        """(3, window * _PARTIAL_WEIGHT + 1) int8: [full?, partial?, either?] of a coarse tile by its
        weight sum."""
        key = (window, device)
        if key not in self._keys:
            total = torch.arange(window * _PARTIAL_WEIGHT + 1)
            full, live = total == window, total > 0
            self._keys[key] = torch.stack([full, live & ~full, live]).to(torch.int8).to(device)
        return self._keys[key]

    def positions(self, rows: int, cols: int, g: int, offset: int, device: torch.device) -> torch.Tensor:
        """(rows, cols) int64 position class of fine tiles: FULL where every key precedes every query,
        EMPTY where every key follows every query, else PARTIAL (queries start at ``offset``)."""
        # Tile (i, j) holds queries offset + [i g, i g + g) and keys [j g, j g + g).
        last_full = (offset + 1) // g - 1  # largest j - i with the whole key block <= the first query
        last_live = (offset + g - 1) // g  # largest j - i with a key <= the last query
        # Keyed by the diagonals, not the offset, so decode steps reuse one table for g steps.
        key = (rows, cols, last_full, last_live, device)
        if key in self._positions:
            return self._positions[key]
        classes = torch.full((rows, cols), TILE_FULL, dtype=torch.int64, device=device).tril_(last_full)
        for diagonal in range(last_full + 1, last_live + 1):
            classes.diagonal(diagonal).fill_(TILE_PARTIAL)
        if rows * cols <= _POSITION_CACHE_MAX_ENTRIES:
            if len(self._positions) >= _POSITION_CACHE_SIZE:
                self._positions.pop(next(iter(self._positions)))
            self._positions[key] = classes
        return classes


_TABLES = _DeviceTables()


def _rule_table(rule: AttentionRule) -> torch.Tensor:
    allowed = rule.table()
    masks = torch.arange(_NUM_KIND_MASKS)
    # present[m, k]: kind k (or PAST_END) is in mask m.
    present = ((masks[:, None] >> torch.arange(NUM_SEGMENTS + 1)) & 1).bool()
    real = present[:, :NUM_SEGMENTS].float()
    pairs = real @ allowed.float() @ real.T  # allowed (query kind, key kind) pairs present
    total = real.sum(1)[:, None] * real.sum(1)[None, :]
    past_end = present[:, PAST_END]
    kind_class = torch.full((_NUM_KIND_MASKS, _NUM_KIND_MASKS), TILE_PARTIAL)
    kind_class[(pairs == total) & ~past_end[:, None] & ~past_end[None, :] & (total > 0)] = TILE_FULL
    kind_class[pairs == 0] = TILE_EMPTY
    weights = torch.tensor([_FINE_WEIGHT[c] for c in range(len(TILE_NAMES))], dtype=torch.int16)
    classes = torch.arange(len(TILE_NAMES))
    # A tile is as allowed as the least allowed of its position, document and kind classes.
    combined = torch.minimum(torch.minimum(classes[:, None, None, None], classes[None, :, None, None]), kind_class)
    return weights[combined]


def _document_classes(q: BlockSummary, k: BlockSummary) -> torch.Tensor:
    """(B, Pq, Pk) int64: EMPTY where the blocks' document ranges are disjoint, FULL where both hold
    one and the same document, else PARTIAL."""
    q_min, q_max = q.doc_min[:, :, None], q.doc_max[:, :, None]
    k_min, k_max = k.doc_min[:, None, :], k.doc_max[:, None, :]
    overlap = (q_max >= k_min) & (k_max >= q_min)
    same = torch.maximum(q_max, k_max) == torch.minimum(q_min, k_min)
    return overlap.to(torch.int64) + same


def fine_weights(q: BlockSummary, k: BlockSummary, rule: AttentionRule, offset: int) -> torch.Tensor:
    """(B, Pq, Pk) int16 weight (``_FINE_WEIGHT``) of every fine tile; both summaries share one
    block size and the queries start at key position ``offset``."""
    g = q.block_size
    positions = _TABLES.positions(q.num_blocks, k.num_blocks, g, offset, q.kinds.device)
    documents = TILE_FULL if q.doc_min is None else _document_classes(q, k)
    return _TABLES.rule(rule, q.kinds.device)[positions, documents, q.kinds[:, :, None], k.kinds[:, None, :]]


def _coarse_grid(g: int, tile: TileShape, num_queries: int, num_keys: int) -> Tuple[Tuple[int, int], int]:
    """(query blocks, key blocks) of a kernel's tiles and the number of fine tiles in each tile."""
    block_m, block_n, _ = tile
    window = (block_m // g) * (block_n // g)
    if window >= _PARTIAL_WEIGHT:
        raise ValueError(f"tile {block_m} x {block_n} holds too many {g} x {g} fine tiles")
    return (triton.cdiv(num_queries, block_m), triton.cdiv(num_keys, block_n)), window


def _coarse_sums(
    weights: torch.Tensor, g: int, tile: TileShape, grid: Tuple[int, int], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per tile of the (rows, cols) ``grid``, the sum of its fine weights: (B, R, C), or (B, C, R)
    by key (contiguous either way)."""
    block_m, block_n, by_key = tile
    (rows, cols), wm, wn = grid, block_m // g, block_n // g
    # [B, R, wm, C, wn]
    tiles = weights[:, : rows * wm, : cols * wn].unflatten(2, (cols, wn)).unflatten(1, (rows, wm))
    if by_key:
        tiles = tiles.permute(0, 3, 4, 1, 2)
    # A reduction allocates (or fills) its output contiguous, so the by-key lists need no extra copy.
    return torch.sum(tiles, dim=(2, 4), dtype=torch.int32, out=out)


def summary_prefix(summary: BlockSummary, blocks: int) -> BlockSummary:
    """The first ``blocks`` blocks of a summary."""
    cut = [None if t is None else t[:, :blocks] for t in (summary.doc_min, summary.doc_max)]
    return BlockSummary(summary.block_size, summary.kinds[:, :blocks], *cut)


def relabel_docs(summary: BlockSummary, labels: torch.Tensor) -> BlockSummary:
    """The summary with its document ranges moved to new dense labels: ``labels`` (B, L) maps
    each old label to its new one. Dense labels are ranks, so the map is increasing and takes a
    block's smallest and largest label to the new smallest and largest; blocks without documents
    keep their empty range."""
    live = summary.doc_min <= summary.doc_max
    top = labels.shape[1] - 1

    def move(doc: torch.Tensor) -> torch.Tensor:
        return torch.where(live, labels.gather(1, doc.clamp(0, top).to(torch.int64)), doc)

    return BlockSummary(summary.block_size, summary.kinds, move(summary.doc_min), move(summary.doc_max))


def coarse_schedules(
    weights: torch.Tensor, g: int, tiles: Mapping[Hashable, TileShape], num_queries: int, num_keys: int
) -> Dict[Hashable, TileSchedule]:
    """The tile lists of several kernels' tiles from the fine weights. Kernels whose lists have the
    same shape and fine tiles per tile (dK/dV's 32 x 128 by key and dQ's 128 x 32 on a square
    layout, say) are classified, sorted and counted together: fewer launches on the host path."""
    grids = {name: _coarse_grid(g, tile, num_queries, num_keys) for name, tile in tiles.items()}
    groups: Dict[tuple, List[Hashable]] = {}
    for name, ((rows, cols), window) in grids.items():
        groups.setdefault(((cols, rows) if tiles[name][2] else (rows, cols), window), []).append(name)
    schedules = {}
    for (shape, window), names in groups.items():
        if len(names) == 1:
            sums = _coarse_sums(weights, g, tiles[names[0]], grids[names[0]][0])[None]
        else:
            sums = weights.new_empty((len(names), weights.shape[0], *shape), dtype=torch.int32)
            for i, name in enumerate(names):
                _coarse_sums(weights, g, tiles[name], grids[name][0], out=sums[i])
        keys = _TABLES.keys(window, weights.device)[:, sums]
        schedules.update(zip(names, TileSchedule.batch_from_keys(keys)))
    return schedules


def coarse_classes(weights: torch.Tensor, g: int, block_m: int, block_n: int, num_queries: int, num_keys: int) -> torch.Tensor:
    """(B, R, C) int8 TILE_* classes of (block_m, block_n) tiles from the fine weights."""
    tile = (block_m, block_n, False)
    grid, window = _coarse_grid(g, tile, num_queries, num_keys)
    sums = _coarse_sums(weights, g, tile, grid)
    return torch.where(sums == window, TILE_FULL, (sums > 0).to(torch.int64) * TILE_PARTIAL).to(torch.int8)
