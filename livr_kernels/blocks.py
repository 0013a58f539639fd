"""Per-block summaries of a segment layout and the classification of attention tiles.

Nothing here builds an N x N mask. Every block of ``g`` tokens is summarised by a bit mask of the
segment kinds it holds (and, with document ids, the smallest and largest one): O(N) in all. From a
query block's and a key block's summaries and their positions a tile is

* EMPTY: no (query, key) pair in it is allowed: never visited, K and V never loaded;
* FULL: every pair is allowed: computed without any mask arithmetic;
* PARTIAL: anything else: the mask is computed from the per-token ids.

The three kernels tile differently (forward 128 x 64, dK/dV 32 x 128, dQ 128 x 32, say). All their
``TileSchedule`` lists come from ONE classification at the common fine granularity ``g`` (the gcd
of every block size): a coarse tile is EMPTY when all its fine tiles are, FULL when all are, else
PARTIAL. The fine classification is a single gather from a per-rule table indexed by the
(position class, query kinds, key kinds) of each fine tile, so a layout's three schedules cost a
fixed handful of tensor ops (no Python loop over kinds, no host-device synchronisation).

A ``TileSchedule`` lists, per query block (or per key block, for dK/dV), the full and the partial
tiles to visit, like FlexAttention's BlockMask: the kernels run one branch-free loop over each
list, which the compiler can software-pipeline. It takes (N/BM) x (N/BN) int32 per list and batch
row, e.g. 0.25 MiB at N = 16k with 128 x 64 tiles, against 256 MiB for a dense boolean mask, and is
built once per layout, rule and tile shape, then shared by every layer and head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import triton

from .segments import NUM_SEGMENTS, AttentionRule, RuleLike, Segment, resolve_rule

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
# Position classes of fine tiles are cached per shape (training repeats a handful of lengths).
_POSITION_CACHE_SIZE = 4

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


def _concat_summaries(head: BlockSummary, tail: BlockSummary) -> BlockSummary:
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
    Only the first ``count`` entries of an index row are meaningful.
    """

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> "TileSchedule":
        """From (2, B, R, C) int8 keys: [0] marks the full tiles, [1] the partial ones."""
        # A stable descending sort puts the marked columns first, in ascending order.
        index = torch.sort(keys, dim=-1, descending=True, stable=True).indices.to(torch.int32)
        count = keys.sum(-1, dtype=torch.int32)
        return cls(count[0], index[0], count[1], index[1])

    @classmethod
    def from_classes(cls, classes: torch.Tensor) -> "TileSchedule":
        """From (B, R, C) TILE_* classes."""
        return cls.from_keys(torch.stack([classes == TILE_FULL, classes == TILE_PARTIAL]).to(torch.int8))


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
        """(2, window * _PARTIAL_WEIGHT + 1) int8: [full?, partial?] of a coarse tile by its weight sum."""
        key = (window, device)
        if key not in self._keys:
            total = torch.arange(window * _PARTIAL_WEIGHT + 1)
            full = total == window
            self._keys[key] = torch.stack([full, (total > 0) & ~full]).to(torch.int8).to(device)
        return self._keys[key]

    def positions(self, rows: int, cols: int, g: int, offset: int, device: torch.device) -> torch.Tensor:
        """(rows, cols) int32 position class of fine tiles: FULL where every key precedes every query,
        EMPTY where every key follows every query, else PARTIAL (queries start at ``offset``)."""
        key = (rows, cols, g, offset, device)
        if key not in self._positions:
            if len(self._positions) >= _POSITION_CACHE_SIZE:
                self._positions.pop(next(iter(self._positions)))
            # Tile (i, j) holds queries offset + [i g, i g + g) and keys [j g, j g + g).
            last_full = (offset + 1) // g - 1  # largest j - i with the whole key block <= the first query
            last_live = (offset + g - 1) // g  # largest j - i with a key <= the last query
            classes = torch.full((rows, cols), TILE_FULL, dtype=torch.int32, device=device).tril_(last_full)
            for diagonal in range(last_full + 1, last_live + 1):
                classes.diagonal(diagonal).fill_(TILE_PARTIAL)
            self._positions[key] = classes
        return self._positions[key]


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
    """(B, Pq, Pk) int32: EMPTY where the blocks' document ranges are disjoint, FULL where both hold
    one and the same document, else PARTIAL."""
    q_min, q_max = q.doc_min[:, :, None], q.doc_max[:, :, None]
    k_min, k_max = k.doc_min[:, None, :], k.doc_max[:, None, :]
    overlap = (q_max >= k_min) & (k_max >= q_min)
    same = torch.maximum(q_max, k_max) == torch.minimum(q_min, k_min)
    return overlap.to(torch.int32) + same


def fine_weights(q: BlockSummary, k: BlockSummary, rule: AttentionRule, offset: int) -> torch.Tensor:
    """(B, Pq, Pk) int16 weight (``_FINE_WEIGHT``) of every fine tile; both summaries share one
    block size and the queries start at key position ``offset``."""
    g = q.block_size
    positions = _TABLES.positions(q.num_blocks, k.num_blocks, g, offset, q.kinds.device)
    documents = TILE_FULL if q.doc_min is None else _document_classes(q, k)
    return _TABLES.rule(rule, q.kinds.device)[positions, documents, q.kinds[:, :, None], k.kinds[:, None, :]]


def _coarse_sums(
    weights: torch.Tensor, g: int, block_m: int, block_n: int, num_queries: int, num_keys: int, by_key: bool = False
):
    """Per (block_m, block_n) tile, the sum of its fine weights, (B, R, C) or (B, C, R) ``by_key``
    (contiguous either way), and its number of fine tiles."""
    wm, wn = block_m // g, block_n // g
    if wm * wn >= _PARTIAL_WEIGHT:
        raise ValueError(f"tile {block_m} x {block_n} holds too many {g} x {g} fine tiles")
    rows, cols = triton.cdiv(num_queries, block_m), triton.cdiv(num_keys, block_n)
    # [B, R, wm, C, wn]
    tiles = weights[:, : rows * wm, : cols * wn].unflatten(2, (cols, wn)).unflatten(1, (rows, wm))
    if by_key:
        tiles = tiles.permute(0, 3, 4, 1, 2)
    # A reduction allocates its output contiguous, so the by-key lists need no extra copy.
    return tiles.sum(dim=(2, 4), dtype=torch.int32), wm * wn


class SegmentLayout:
    """Segment ids (and optional document ids) with cached per-block summaries and tile schedules.

    Build it once per batch and pass it as ``segment_ids`` to every attention layer: summaries and
    schedules are then computed once, not once per layer.

    ``validate=True`` checks the ids, including their value range (which reads one number back
    from the device: do it where ids are built, once per batch). ``validate=False`` skips the range
    check, for ids livr built itself. Document ids are relabelled densely per row (equal ids stay
    equal), so any integer ids work, int64 hashes included.
    """

    def __init__(self, segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *, validate: bool = True):
        _check_segment_ids(segment_ids, check_range=validate)
        if doc_ids is not None:
            _check_doc_ids(doc_ids, segment_ids)
        self._segment_ids64 = segment_ids.to(torch.int64)
        self.segment_ids = segment_ids.to(torch.int32).contiguous()
        self.doc_ids = None if doc_ids is None else dense_doc_ids(doc_ids)
        self._raw_doc_ids = doc_ids
        self._summaries: Dict[Tuple[int, int, int], BlockSummary] = {}
        self._schedules: Dict[tuple, TileSchedule] = {}
        # Key summaries of a layout this one extends: (summary, blocks of it that are complete) per block size.
        self._prefix: Dict[int, Tuple[BlockSummary, int]] = {}

    @property
    def shape(self) -> torch.Size:
        return self.segment_ids.shape

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device

    @property
    def has_docs(self) -> bool:
        return self.doc_ids is not None

    def extend(self, segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *, validate: bool = True) -> "SegmentLayout":
        """This layout with ``segment_ids`` (B, M) appended: a decode step with a KV cache. Summaries
        of the complete key blocks carry over, so a step costs O(M + block) work, not O(N).

        Without ``doc_ids`` the new tokens continue the last token's document; with them, (B, M)
        ids in the same numbering as this layout's original document ids."""
        _check_segment_ids(segment_ids, check_range=validate, batch=self.shape[0])
        if doc_ids is not None:
            _check_doc_ids(doc_ids, segment_ids)
        n_old = self.shape[1]
        new = SegmentLayout.__new__(SegmentLayout)
        new._segment_ids64 = torch.cat([self._segment_ids64, segment_ids.to(torch.int64)], 1)
        new.segment_ids = torch.cat([self.segment_ids, segment_ids.to(torch.int32)], 1)
        new.doc_ids, new._raw_doc_ids = self._extended_docs(segment_ids.shape[1], doc_ids)
        new._summaries, new._schedules = {}, {}
        new._prefix = dict(self._prefix)
        for (block_size, offset, _), summary in self._summaries.items():
            if offset == 0:
                new._prefix[block_size] = (summary, n_old // block_size)
        return new

    def _extended_docs(self, m: int, doc_ids: Optional[torch.Tensor]):
        batch = self.shape[0]
        if doc_ids is None:
            if not self.has_docs:
                return None, None
            last = self.doc_ids[:, -1:].expand(batch, m)
            raw = self.raw_doc_ids
            return torch.cat([self.doc_ids, last], 1), torch.cat([raw, raw[:, -1:].expand(batch, m)], 1)
        if not self.has_docs:
            raise ValueError("doc_ids for new tokens need a layout that has document ids")
        raw = torch.cat([self.raw_doc_ids, doc_ids.to(self.raw_doc_ids.dtype)], 1)
        return dense_doc_ids(raw), raw

    @property
    def raw_doc_ids(self) -> Optional[torch.Tensor]:
        """The document ids as given (before relabelling), for extending the layout."""
        return self._raw_doc_ids

    def summary(self, block_size: int, num_queries: Optional[int] = None, num_blocks: Optional[int] = None) -> BlockSummary:
        """Summaries of key blocks, or of query blocks when ``num_queries`` (the last Nq positions) is given."""
        n = self.segment_ids.shape[1]
        offset = 0 if num_queries is None else n - num_queries
        num_blocks = triton.cdiv(n - offset, block_size) if num_blocks is None else num_blocks
        key = (block_size, offset, num_blocks)
        if key not in self._summaries:
            doc = None if self.doc_ids is None else self.doc_ids[:, offset:]
            prefix = self._prefix.get(block_size) if offset == 0 else None
            if prefix is not None and prefix[1] > 0:
                head, done = prefix
                start = done * block_size
                tail_doc = None if doc is None else doc[:, start:]
                tail = summarize_blocks(self._segment_ids64[:, start:], tail_doc, block_size, num_blocks - done)
                head = BlockSummary(block_size, head.kinds[:, :done],
                                    *(None if t is None else t[:, :done] for t in (head.doc_min, head.doc_max)))
                self._summaries[key] = _concat_summaries(head, tail)
            else:
                self._summaries[key] = summarize_blocks(self._segment_ids64[:, offset:], doc, block_size, num_blocks)
        return self._summaries[key]

    def fine_weights(self, rule: AttentionRule, g: int, num_queries: int, padded_to: int = 1) -> torch.Tensor:
        """Fine-tile weights at granularity ``g``, with rows and columns padded (as EMPTY) so the
        queries and keys cover a multiple of ``padded_to`` tokens."""
        n = self.shape[1]
        rows = triton.cdiv(num_queries, padded_to) * padded_to // g
        cols = triton.cdiv(n, padded_to) * padded_to // g
        return fine_weights(self.summary(g, num_queries, rows), self.summary(g, None, cols), rule, n - num_queries)

    def schedules(self, rule: RuleLike, tiles: Mapping[str, TileShape], num_queries: int) -> Dict[str, TileSchedule]:
        """The tile lists for several kernels' tile shapes, all from one fine classification."""
        rule = resolve_rule(rule)
        keys = {name: (rule.bits, bm, bn, num_queries, by_key) for name, (bm, bn, by_key) in tiles.items()}
        missing = {name: tiles[name] for name, key in keys.items() if key not in self._schedules}
        if missing:
            sizes = [size for bm, bn, _ in missing.values() for size in (bm, bn)]
            g, span = math.gcd(*sizes), math.lcm(*sizes)
            weights = self.fine_weights(rule, g, num_queries, span)
            for name, (bm, bn, by_key) in missing.items():
                sums, window = _coarse_sums(weights, g, bm, bn, num_queries, self.shape[1], by_key)
                table = _TABLES.keys(window, weights.device)
                self._schedules[keys[name]] = TileSchedule.from_keys(table[:, sums])
        return {name: self._schedules[key] for name, key in keys.items()}

    def schedule(self, rule: AttentionRule, block_m: int, block_n: int, num_queries: int, by_key: bool = False) -> TileSchedule:
        """The cached tile lists for one rule and tile shape; ``by_key`` lists query blocks per key block."""
        return self.schedules(rule, {"tiles": (block_m, block_n, by_key)}, num_queries)["tiles"]

    def tile_mask(self, rule: RuleLike, block_m: int = 128, block_n: int = 64, num_queries: Optional[int] = None) -> "TileMask":
        n = self.segment_ids.shape[1]
        n_q = n if num_queries is None else num_queries
        return TileMask(self, resolve_rule(rule), block_m, block_n, n_q)

    def __repr__(self) -> str:
        return f"SegmentLayout(batch={self.shape[0]}, seq_len={self.shape[1]}, docs={self.has_docs})"


def dense_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) int32: per row, each id's rank among the row's distinct ids. Attention compares
    documents by equality within a row, so this changes nothing but keeps int64 ids (2**32, say)
    from wrapping when the kernels read them as int32. No host-device synchronisation."""
    if doc_ids.shape[1] == 0:
        return doc_ids.to(torch.int32)
    values, order = torch.sort(doc_ids, dim=1)
    ranks = torch.nn.functional.pad((values[:, 1:] != values[:, :-1]).cumsum(1, dtype=torch.int32), (1, 0))
    return torch.empty_like(ranks).scatter_(1, order, ranks)


def _check_segment_ids(segment_ids, *, check_range: bool, batch: Optional[int] = None) -> None:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be a (batch, seq_len) integer tensor; got {_describe(segment_ids)}")
    if batch is not None and segment_ids.shape[0] != batch:
        raise ValueError(f"segment_ids must have batch size {batch}; got {_describe(segment_ids)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"segment_ids must have an integer dtype; got {segment_ids.dtype}")
    if check_range and segment_ids.numel():
        # One read-back for both bounds.
        lo, hi = torch.stack(torch.aminmax(segment_ids)).tolist()
        if lo < 0 or hi >= NUM_SEGMENTS:
            raise ValueError(
                f"segment_ids values must lie in 0..{NUM_SEGMENTS - 1} "
                f"({', '.join(f'{s.name}={int(s)}' for s in Segment)}); got values in {lo}..{hi}"
            )


def _check_doc_ids(doc_ids, segment_ids: torch.Tensor) -> None:
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != segment_ids.shape:
        raise ValueError(
            f"doc_ids must have the shape of segment_ids {tuple(segment_ids.shape)}; got {_describe(doc_ids)}"
        )
    if doc_ids.dtype.is_floating_point or doc_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
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
            g = math.gcd(self.block_m, self.block_n)
            span = math.lcm(self.block_m, self.block_n)
            weights = self.layout.fine_weights(self.rule, g, self.num_queries, span)
            sums, window = _coarse_sums(weights, g, self.block_m, self.block_n, self.num_queries, self.num_keys)
            classes = torch.where(sums == window, TILE_FULL, (sums > 0).to(torch.int64) * TILE_PARTIAL)
            self._classes = classes.to(torch.int8)
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
