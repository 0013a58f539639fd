"""``SegmentLayout``: a batch's segment (and document) ids with their block summaries and tile
schedules cached, built once and shared by every layer; ``TileMask`` to inspect a classification.

The summaries, the classification and the schedules themselves live in ``tiles.py``.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import triton

from .segments import NUM_SEGMENTS, AttentionRule, RuleLike, Segment, resolve_rule
from .tiles import (  # noqa: F401  (re-exported: the historical home of these names)
    PAST_END,
    TILE_EMPTY,
    TILE_FULL,
    TILE_NAMES,
    TILE_PARTIAL,
    BlockSummary,
    TileSchedule,
    TileShape,
    coarse_classes,
    coarse_schedules,
    concat_summaries,
    fine_weights,
    relabel_docs,
    summarize_blocks,
    summary_prefix,
)


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
        self._padded: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
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
        new._summaries, new._schedules, new._padded = {}, {}, {}
        carried = dict(self._prefix)
        for (block_size, offset, _), summary in self._summaries.items():
            if offset == 0:
                carried[block_size] = (summary, n_old // block_size)
        # New document ids relabel the whole row (an id that sorts before the cached ones shifts
        # their labels), so the carried summaries' document ranges move to the new labels.
        labels = None if doc_ids is None or n_old == 0 else _label_map(self.doc_ids, new.doc_ids[:, :n_old])
        new._prefix = {}
        for block_size, (summary, done) in carried.items():
            if labels is not None and done > 0:
                summary = relabel_docs(summary_prefix(summary, done), labels)
            new._prefix[block_size] = (summary, done)
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
        # cat promotes to a dtype that holds both: a cast to the cached ids' dtype would wrap
        # (an int64 id of 2**32 after int32 ids became document 0).
        raw = torch.cat([self.raw_doc_ids, doc_ids], 1)
        return dense_doc_ids(raw), raw

    @property
    def raw_doc_ids(self) -> Optional[torch.Tensor]:
        """The document ids as given (before relabelling), for extending the layout."""
        return self._raw_doc_ids

    def padded_ids(self, multiple: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(segment ids, document ids or None), each (B, N') int32 with rows padded to a multiple
        of ``multiple`` tokens: kind PAD and document -1 past the end. The forward reads a whole key
        tile's ids without a bounds mask (a PAD key is never allowed), from rows that start aligned."""
        if multiple not in self._padded:
            pad = triton.cdiv(self.shape[1], multiple) * multiple - self.shape[1]
            segment_ids = torch.nn.functional.pad(self.segment_ids, (0, pad), value=int(Segment.PAD))
            doc_ids = None if self.doc_ids is None else torch.nn.functional.pad(self.doc_ids, (0, pad), value=-1)
            self._padded[multiple] = (segment_ids, doc_ids)
        return self._padded[multiple]

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
                self._summaries[key] = concat_summaries(summary_prefix(head, done), tail)
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
        # Keyed by tile shape, so kernels with the same tiles (the forward and dQ, often) share one schedule.
        missing = {key: tiles[name] for name, key in keys.items() if key not in self._schedules}
        if missing:
            sizes = [size for bm, bn, _ in missing.values() for size in (bm, bn)]
            g, span = math.gcd(*sizes), math.lcm(*sizes)
            weights = self.fine_weights(rule, g, num_queries, span)
            self._schedules.update(coarse_schedules(weights, g, missing, num_queries, self.shape[1]))
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


def _label_map(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(B, N) int32 table: per row, the new dense label of each old dense label, from the labels
    the same tokens have before (``old``) and after (``new``) a relabelling."""
    return torch.zeros_like(old).scatter_(1, old.to(torch.int64), new)


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
            self._classes = coarse_classes(weights, g, self.block_m, self.block_n, self.num_queries, self.num_keys)
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
