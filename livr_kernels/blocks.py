"""Per-block summaries of a segment layout and the classification of attention tiles.

Nothing here builds an N x N mask. Every block of ``block_size`` tokens is summarised by three
int32 numbers: a bit mask of the segment kinds present, and the smallest and largest document
id (O(N) in all). From a query block's and a key block's summaries (plus their positions) a tile is

* EMPTY: no (query, key) pair in it is allowed: never visited, K and V never loaded;
* FULL: every pair is allowed: computed without any mask arithmetic;
* PARTIAL: anything else: the mask is computed from the per-token ids.

A ``TileSchedule`` lists, per query block (or per key block, for dK/dV), the full and the partial
tiles to visit, like FlexAttention's BlockMask: the kernels run one branch-free loop over each
list, which the compiler can software-pipeline. It takes (N/BM) x (N/BN) int32 per list and batch
row, e.g. 0.25 MiB at N = 16k with 128 x 64 tiles, against 256 MiB for a dense boolean mask, and is
built once per layout, rule and tile shape, then shared by every layer and head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton

from .segments import NUM_SEGMENTS, AttentionRule, RuleLike, Segment, resolve_rule

TILE_EMPTY = 0
TILE_PARTIAL = 1
TILE_FULL = 2
TILE_NAMES = {TILE_EMPTY: "empty", TILE_PARTIAL: "partial", TILE_FULL: "full"}

# Kind value for positions past the end of the sequence while blocks are summarised.
_OUT_OF_RANGE = NUM_SEGMENTS
_INT32_MAX = torch.iinfo(torch.int32).max
_INT32_MIN = torch.iinfo(torch.int32).min
_KIND_BITS = (1 << NUM_SEGMENTS) - 1


@dataclass(frozen=True)
class BlockSummary:
    """Per-block summaries at one block size, each (B, num_blocks) int32.

    ``kinds``: bit k set when the block holds a token of kind k. ``doc_min`` / ``doc_max``: the
    document-id range of its non-PAD tokens (INT32_MAX / INT32_MIN when it has none).
    """

    block_size: int
    kinds: torch.Tensor
    doc_min: torch.Tensor
    doc_max: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.kinds.shape[-1]


def summarize_blocks(
    segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], block_size: int
) -> BlockSummary:
    """O(N) summaries on the ids' device; ``segment_ids`` and ``doc_ids`` are (B, N)."""
    batch, n = segment_ids.shape
    num_blocks = triton.cdiv(n, block_size)
    tail = num_blocks * block_size - n
    seg = torch.nn.functional.pad(segment_ids.long(), (0, tail), value=_OUT_OF_RANGE)
    seg = seg.view(batch, num_blocks, block_size)
    present = torch.nn.functional.one_hot(seg, NUM_SEGMENTS + 1)[..., :NUM_SEGMENTS].any(dim=2)
    weights = 1 << torch.arange(NUM_SEGMENTS, device=seg.device)
    kinds = (present.long() * weights).sum(-1).to(torch.int32)
    if doc_ids is None:
        doc_min = torch.zeros(batch, num_blocks, dtype=torch.int32, device=seg.device)
        doc_max = doc_min
    else:
        doc = torch.nn.functional.pad(doc_ids.long(), (0, tail)).view(batch, num_blocks, block_size)
        live = seg < int(Segment.PAD)
        doc_min = torch.where(live, doc, _INT32_MAX).amin(dim=2).to(torch.int32)
        doc_max = torch.where(live, doc, _INT32_MIN).amax(dim=2).to(torch.int32)
    return BlockSummary(block_size, kinds.contiguous(), doc_min.contiguous(), doc_max.contiguous())


@dataclass(frozen=True)
class TileSchedule:
    """Tiles to visit per row block: ``*_count`` (B, R) and ``*_index`` (B, R, C) int32, ascending.

    Rows are query blocks (forward, dQ) or key blocks (dK/dV, built from the transposed classes).
    Only the first ``count`` entries of an index row are meaningful.
    """

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor

    @classmethod
    def from_classes(cls, classes: torch.Tensor) -> "TileSchedule":
        def listing(selected):
            count = selected.sum(-1, dtype=torch.int32)
            # A stable sort puts the selected columns first, in ascending order.
            index = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
            return count.contiguous(), index.contiguous()

        full_count, full_index = listing(classes == TILE_FULL)
        partial_count, partial_index = listing(classes == TILE_PARTIAL)
        return cls(full_count, full_index, partial_count, partial_index)


def classify_tiles(
    q_summary: BlockSummary,
    k_summary: BlockSummary,
    rule: AttentionRule,
    num_queries: int,
    num_keys: int,
    has_docs: bool,
) -> torch.Tensor:
    """Classes of every tile: (B, num_q_blocks, num_k_blocks) int8 of TILE_EMPTY / TILE_PARTIAL / TILE_FULL.

    Out-of-range positions count as nothing; a block that runs past the end is never FULL, so the
    kernels only need bounds masks on partial tiles.
    """
    device = q_summary.kinds.device
    bm, bn = q_summary.block_size, k_summary.block_size
    offset = num_keys - num_queries
    q_start = torch.arange(q_summary.num_blocks, device=device) * bm
    k_start = torch.arange(k_summary.num_blocks, device=device) * bn
    q_lo = (offset + q_start)[:, None]
    q_hi = (offset + torch.clamp(q_start + bm, max=num_queries) - 1)[:, None]
    k_lo = k_start[None, :]
    k_hi = (torch.clamp(k_start + bn, max=num_keys) - 1)[None, :]
    q_edge = (q_start + bm > num_queries)[:, None]
    k_edge = (k_start + bn > num_keys)[None, :]

    qk = q_summary.kinds.long()[:, :, None]
    kk = k_summary.kinds.long()[:, None, :]
    kind_any = torch.zeros(qk.shape[0], qk.shape[1], kk.shape[2], dtype=torch.bool, device=device)
    kind_all = torch.ones_like(kind_any)
    for kind, row in enumerate(rule.row_bits):
        present = ((qk >> kind) & 1).bool()
        seen = row & kk
        kind_any |= present & (seen != 0)
        kind_all &= ~present | (seen == kk)
    empty = (k_lo > q_hi)[None] | ~kind_any
    full = (k_hi <= q_lo)[None] & kind_all & ~q_edge[None] & ~k_edge[None]
    if has_docs:
        qmin, qmax = q_summary.doc_min[:, :, None], q_summary.doc_max[:, :, None]
        kmin, kmax = k_summary.doc_min[:, None, :], k_summary.doc_max[:, None, :]
        empty |= (qmax < kmin) | (kmax < qmin)
        full &= (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    classes = torch.full(empty.shape, TILE_PARTIAL, dtype=torch.int8, device=device)
    classes[full] = TILE_FULL
    classes[empty] = TILE_EMPTY
    return classes


class SegmentLayout:
    """Validated segment ids (and optional document ids) with cached per-block summaries.

    Build it once per batch and pass it as ``segment_ids`` to every attention layer: the O(N)
    summaries are then computed once per block size, not once per layer.
    """

    def __init__(self, segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *, validate: bool = True):
        if validate:
            _check_ids(segment_ids, doc_ids)
        self.segment_ids = segment_ids.to(torch.int32).contiguous()
        self.doc_ids = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
        self._summaries: Dict[Tuple[int, int], BlockSummary] = {}
        self._schedules: Dict[tuple, TileSchedule] = {}

    @property
    def shape(self) -> torch.Size:
        return self.segment_ids.shape

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device

    @property
    def has_docs(self) -> bool:
        return self.doc_ids is not None

    def summary(self, block_size: int, num_queries: Optional[int] = None) -> BlockSummary:
        """Summaries of key blocks, or of query blocks when ``num_queries`` (the last Nq positions) is given."""
        n = self.segment_ids.shape[1]
        offset = 0 if num_queries is None else n - num_queries
        key = (block_size, offset)
        if key not in self._summaries:
            doc = None if self.doc_ids is None else self.doc_ids[:, offset:]
            self._summaries[key] = summarize_blocks(self.segment_ids[:, offset:], doc, block_size)
        return self._summaries[key]

    def schedule(self, rule: AttentionRule, block_m: int, block_n: int, num_queries: int, by_key: bool = False) -> TileSchedule:
        """The cached tile lists for one rule and tile shape; ``by_key`` lists query blocks per key block."""
        key = (rule.bits, block_m, block_n, num_queries, by_key)
        if key not in self._schedules:
            classes = TileMask(self, rule, block_m, block_n, num_queries).to_dense()
            if by_key:
                classes = classes.transpose(1, 2)
            self._schedules[key] = TileSchedule.from_classes(classes)
        return self._schedules[key]

    def tile_mask(self, rule: RuleLike, block_m: int = 128, block_n: int = 64, num_queries: Optional[int] = None) -> "TileMask":
        n = self.segment_ids.shape[1]
        n_q = n if num_queries is None else num_queries
        return TileMask(self, resolve_rule(rule), block_m, block_n, n_q)

    def __repr__(self) -> str:
        return f"SegmentLayout(batch={self.shape[0]}, seq_len={self.shape[1]}, docs={self.has_docs})"


def _check_ids(segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> None:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be a (batch, seq_len) integer tensor; got {_describe(segment_ids)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"segment_ids must have an integer dtype; got {segment_ids.dtype}")
    if segment_ids.numel():
        lo, hi = int(segment_ids.min()), int(segment_ids.max())
        if lo < 0 or hi >= NUM_SEGMENTS:
            raise ValueError(
                f"segment_ids values must lie in 0..{NUM_SEGMENTS - 1} "
                f"({', '.join(f'{s.name}={int(s)}' for s in Segment)}); got values in {lo}..{hi}"
            )
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != segment_ids.shape:
            raise ValueError(
                f"doc_ids must have the shape of segment_ids {tuple(segment_ids.shape)}; got {_describe(doc_ids)}"
            )
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must have an integer dtype; got {doc_ids.dtype}")
        if doc_ids.device != segment_ids.device:
            raise ValueError(f"doc_ids is on {doc_ids.device} but segment_ids is on {segment_ids.device}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class TileMask:
    """Inspectable tile classification (like FlexAttention's BlockMask) for one layout and rule."""

    def __init__(self, layout: SegmentLayout, rule: AttentionRule, block_m: int, block_n: int, num_queries: int):
        self.layout = layout
        self.rule = rule
        self.block_m = block_m
        self.block_n = block_n
        self.num_queries = num_queries
        self.num_keys = layout.shape[1]
        self._classes: Optional[torch.Tensor] = None

    def to_dense(self) -> torch.Tensor:
        """(B, num_q_blocks, num_k_blocks) int8 of TILE_EMPTY / TILE_PARTIAL / TILE_FULL."""
        if self._classes is None:
            self._classes = classify_tiles(
                self.layout.summary(self.block_m, self.num_queries),
                self.layout.summary(self.block_n),
                self.rule,
                self.num_queries,
                self.num_keys,
                self.layout.has_docs,
            )
        return self._classes

    def counts(self) -> Dict[str, int]:
        classes = self.to_dense()
        return {name: int((classes == c).sum()) for c, name in TILE_NAMES.items()}

    def sparsity(self) -> float:
        """Fraction of all tiles that are skipped (empty)."""
        classes = self.to_dense()
        return float((classes == TILE_EMPTY).float().mean()) if classes.numel() else 0.0

    def causal_tiles(self) -> int:
        """Tiles a plain causal kernel would compute: the yardstick for what the rule skips."""
        offset = self.num_keys - self.num_queries
        n_qb = triton.cdiv(self.num_queries, self.block_m)
        n_kb = triton.cdiv(self.num_keys, self.block_n)
        q_hi = offset + torch.clamp(torch.arange(n_qb) * self.block_m + self.block_m, max=self.num_queries) - 1
        k_lo = torch.arange(n_kb) * self.block_n
        return int((k_lo[None, :] <= q_hi[:, None]).sum()) * self.layout.shape[0]

    def __repr__(self) -> str:
        classes = self.to_dense()
        counts = self.counts()
        total = max(1, classes.numel())
        head = (
            f"TileMask(rule={self.rule.name!r}, batch={classes.shape[0]}, queries={self.num_queries}, "
            f"keys={self.num_keys}, block=({self.block_m}, {self.block_n}), "
            + ", ".join(f"{k}={v} ({100 * v / total:.1f}%)" for k, v in counts.items())
            + ")"
        )
        symbols = {TILE_EMPTY: ".", TILE_PARTIAL: "p", TILE_FULL: "#"}
        max_rows = 32
        rows = [
            "  " + "".join(symbols[int(c)] for c in row[: 2 * max_rows])
            for row in classes[0, :max_rows].tolist()
        ]
        return "\n".join([head] + rows)
