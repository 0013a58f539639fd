"""LIVR-like segment layouts for the kernel benchmarks and the tile statistics.

One sample, as a Qwen-style chat template lays it out (``Segment`` kinds):

    TEXT x prefix (system turn, user header)
    per image: TEXT (vision start), IMAGE x tokens, TEXT (vision end)
    TEXT x prompt, LATENT x 16, TEXT x assistant header, ANSWER x answer

Two layouts per length N:

* ``single``: one sample per batch row, right-padded. Row 0 fills N exactly; the other rows are
  shorter (up to ``MAX_PAD_FRACTION`` of N is padding), with 1-4 images cycling over the rows.
  Image sizes are drawn in the spec's range and scaled so the sample fills its row, so at large N
  (above ~4 x 1600 image tokens) images are bigger than the range: high-resolution inputs.
* ``packed``: independent samples back to back in each row with per-token document ids, the last
  one shrunk to fit when possible; what is left at the end of the row is padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from livr_kernels import Segment, resolve_rule
from livr_kernels.segments import NUM_SEGMENTS, RuleLike

LAYOUT_NAMES = ("single", "packed")
# Share of the row left as padding on the shortest row of a ``single`` batch.
MAX_PAD_FRACTION = 0.125


@dataclass(frozen=True)
class LayoutSpec:
    """Token counts of one LIVR sample; ``(lo, hi)`` ranges are inclusive and drawn uniformly."""

    image_tokens: Tuple[int, int] = (256, 1600)
    images: Tuple[int, int] = (1, 4)
    prompt_tokens: Tuple[int, int] = (40, 60)
    latents: int = 16
    answer_tokens: Tuple[int, int] = (1, 20)
    prefix_tokens: int = 20
    assistant_header_tokens: int = 5

    def text_tokens(self, num_images: int, prompt: int, answer: int) -> int:
        """Every token of a sample except the image tokens."""
        return (self.prefix_tokens + 2 * num_images + prompt + self.latents
                + self.assistant_header_tokens + answer)


# The paper's setting (Qwen2.5-VL image tokens at BLINK resolutions).
LIVR_SPEC = LayoutSpec()
# The same shape with images 16x smaller, for CPU-sized sequences.
SMALL_SPEC = LayoutSpec(image_tokens=(16, 100))


@dataclass
class Layout:
    name: str
    segment_ids: torch.Tensor
    doc_ids: Optional[torch.Tensor]

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.segment_ids.shape)

    def describe(self) -> str:
        seg = self.segment_ids
        share = {s.name.lower(): float((seg == int(s)).float().mean()) for s in Segment}
        text = ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
        docs = "" if self.doc_ids is None else f", {_docs_per_row(self):.1f} docs/row"
        return f"{self.name} B={seg.shape[0]} N={seg.shape[1]}: {text}{docs}"


def _docs_per_row(layout: Layout) -> float:
    live = layout.segment_ids != int(Segment.PAD)
    counts = [len(torch.unique(layout.doc_ids[b][live[b]])) for b in range(layout.segment_ids.shape[0])]
    return sum(counts) / len(counts)


def _draw(gen: torch.Generator, bounds: Tuple[int, int]) -> int:
    lo, hi = bounds
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _sample(spec: LayoutSpec, image_sizes: List[int], prompt: int, answer: int) -> List[int]:
    kinds = [int(Segment.TEXT)] * spec.prefix_tokens
    for size in image_sizes:
        kinds += [int(Segment.TEXT)] + [int(Segment.IMAGE)] * size + [int(Segment.TEXT)]
    kinds += [int(Segment.TEXT)] * prompt + [int(Segment.LATENT)] * spec.latents
    kinds += [int(Segment.TEXT)] * spec.assistant_header_tokens + [int(Segment.ANSWER)] * answer
    return kinds


def _fit_images(spec: LayoutSpec, gen: torch.Generator, num_images: int, image_budget: int) -> List[int]:
    """``num_images`` sizes drawn from the spec's range, rescaled to sum to ``image_budget``."""
    drawn = [_draw(gen, spec.image_tokens) for _ in range(num_images)]
    scale = image_budget / sum(drawn)
    sizes = [max(1, int(s * scale)) for s in drawn]
    sizes[-1] += image_budget - sum(sizes)
    return sizes


def _sample_to_length(spec: LayoutSpec, gen: torch.Generator, length: int, num_images: int) -> Optional[List[int]]:
    """A sample of exactly ``length`` tokens, or None if even one small image does not fit."""
    prompt, answer = _draw(gen, spec.prompt_tokens), _draw(gen, spec.answer_tokens)
    for k in range(num_images, 0, -1):
        budget = length - spec.text_tokens(k, prompt, answer)
        if budget >= k * spec.image_tokens[0]:
            return _sample(spec, _fit_images(spec, gen, k, budget), prompt, answer)
    return None


def single_layout(n: int, batch: int, spec: LayoutSpec = LIVR_SPEC, seed: int = 0) -> Layout:
    gen = torch.Generator().manual_seed(seed)
    seg = torch.full((batch, n), int(Segment.PAD), dtype=torch.int32)
    lo_images, hi_images = spec.images
    for b in range(batch):
        pad = int(n * MAX_PAD_FRACTION * b / max(1, batch - 1))
        num_images = lo_images + b % (hi_images - lo_images + 1)
        kinds = _sample_to_length(spec, gen, n - pad, num_images)
        if kinds is None:
            raise ValueError(f"n={n} is too short for a LIVR sample with spec {spec}")
        seg[b, : len(kinds)] = torch.tensor(kinds, dtype=torch.int32)
    return Layout("single", seg, None)


def packed_layout(n: int, batch: int, spec: LayoutSpec = LIVR_SPEC, seed: int = 0) -> Layout:
    gen = torch.Generator().manual_seed(seed)
    seg = torch.full((batch, n), int(Segment.PAD), dtype=torch.int32)
    doc = torch.zeros((batch, n), dtype=torch.int32)
    for b in range(batch):
        pos, doc_id = 0, 0
        while True:
            num_images = _draw(gen, spec.images)
            sizes = [_draw(gen, spec.image_tokens) for _ in range(num_images)]
            kinds = _sample(spec, sizes, _draw(gen, spec.prompt_tokens), _draw(gen, spec.answer_tokens))
            if pos + len(kinds) > n:
                kinds = _sample_to_length(spec, gen, n - pos, num_images)
                if kinds is None:
                    break
            seg[b, pos: pos + len(kinds)] = torch.tensor(kinds, dtype=torch.int32)
            doc[b, pos: pos + len(kinds)] = doc_id
            pos, doc_id = pos + len(kinds), doc_id + 1
            if pos >= n:
                break
        doc[b, pos:] = doc_id
    return Layout("packed", seg, doc)


def make_layout(name: str, n: int, batch: int, spec: LayoutSpec = LIVR_SPEC, seed: int = 0) -> Layout:
    if name == "single":
        return single_layout(n, batch, spec, seed)
    if name == "packed":
        return packed_layout(n, batch, spec, seed)
    raise ValueError(f"layout name must be one of {LAYOUT_NAMES}; got {name!r}")


def allowed_pairs(segment_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], rule: RuleLike) -> int:
    """Number of allowed (query, key) pairs, summed over the batch, in O(N) memory.

    Query i may see, per key kind, the tokens of that kind at positions <= i in its document, so
    the count comes from running per-kind counts. Documents must be contiguous runs of equal ids
    (as ``packed_layout`` makes them); ``segment_mask(...).sum()`` gives the same number densely.
    """
    seg = segment_ids.long()
    counts = torch.nn.functional.one_hot(seg, NUM_SEGMENTS).cumsum(dim=1)
    if doc_ids is not None:
        positions = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        run_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        before = torch.nn.functional.pad(counts, (0, 0, 1, 0))[:, :-1]
        counts = counts - before.gather(1, run_start[..., None].expand_as(counts))
    table = resolve_rule(rule).table(seg.device).long()
    return int((counts * table[seg]).sum())
