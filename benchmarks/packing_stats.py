"""Padding and attention tiles of packed vs padded training batches (pure torch, CPU, about a minute).

Micro-batches of ``B`` examples in training order are laid out two ways: ``padded`` (one example
per row, right-padded to the longest in the micro-batch, what ``livr-train`` does without
``--packing``) and ``packed`` (``livr_model.packing.plan_packing`` into rows of at most
``max_length`` tokens, per-example document ids). For each: the share of tokens that are padding
(every layer's projections and MLP run on them), and the forward kernel's visited tiles (sm_90
tiles from ``default_config``, bottleneck rule); "tiles skipped" compares packed with padded.

Length mixes: the synthetic tasks encoded for real (tiny Qwen2.5-VL processor at 224 px: 256
tokens per image, Qwen2.5-VL's count for a 448 px image; 16 latents), each task alone and all
mixed, and a BLINK-like mix drawn from ``layouts.LIVR_SPEC`` (1-4 images of 256-1600 tokens).

    python benchmarks/packing_stats.py
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Sequence

import torch

from layouts import LIVR_SPEC, _draw, _sample
from livr_kernels import Segment, SegmentLayout, TileMask, resolve_rule
from livr_kernels.blocks import TILE_EMPTY
from livr_kernels.config import default_config
from livr_model.latents import add_latent_tokens
from livr_model.packing import plan_packing
from livr_model.prompts import PromptEncoder

SYNTHETIC_IMAGE_SIZE = 224
SYNTHETIC_PER_TASK = 48
BLINK_SAMPLES = 192
NUM_LATENTS = 16
BATCH_SIZES = (4, 8)
RULE = "bottleneck"
HEAD_DIM = 128
SM90 = (9, 0)
SEED = 0


@dataclass
class Totals:
    real: int = 0
    tokens: int = 0
    visited_tiles: int = 0
    causal_tiles: int = 0

    @property
    def pad_share(self) -> float:
        return 1 - self.real / self.tokens


def synthetic_kinds(image_size: int = SYNTHETIC_IMAGE_SIZE, per_task: int = SYNTHETIC_PER_TASK) -> dict:
    """{task: [segment kinds of each example]} from the real prompt encoder (mode livr)."""
    from livr_model.app.data.synthetic import SYNTHETIC_TASKS, make_synthetic_dataset
    from livr_model.app.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor(image_size)
    model = build_tiny_model(processor, text_hidden=32, vision_hidden=32, layers=1)
    latent_ids = add_latent_tokens(model, processor, NUM_LATENTS)
    encoder = PromptEncoder.for_model("livr", model, processor, latent_ids, NUM_LATENTS)
    out = {}
    for task in SYNTHETIC_TASKS:
        kinds = []
        for example in make_synthetic_dataset(task, per_task, seed=SEED, image_size=image_size):
            _, _, segment_ids = encoder.collate([encoder.encode(example, with_answer=True)], padding_side="right")
            kinds.append(segment_ids[0].tolist())
        out[task] = kinds
    return out


def blink_like_kinds(n: int = BLINK_SAMPLES, seed: int = SEED) -> List[list]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        sizes = [_draw(gen, LIVR_SPEC.image_tokens) for _ in range(_draw(gen, LIVR_SPEC.images))]
        samples.append(_sample(LIVR_SPEC, sizes, _draw(gen, LIVR_SPEC.prompt_tokens), _draw(gen, LIVR_SPEC.answer_tokens)))
    return samples


def _rows(samples: Sequence[list], rows: Sequence[Sequence[int]]) -> tuple:
    width = max(sum(len(samples[i]) for i in row) for row in rows)
    seg = torch.full((len(rows), width), int(Segment.PAD), dtype=torch.int32)
    doc = torch.zeros((len(rows), width), dtype=torch.int32)
    for r, row in enumerate(rows):
        pos = 0
        for slot, i in enumerate(row):
            seg[r, pos:pos + len(samples[i])] = torch.tensor(samples[i], dtype=torch.int32)
            doc[r, pos:pos + len(samples[i])] = slot
            pos += len(samples[i])
        doc[r, pos:] = len(row)
    return seg, doc


def _add(totals: Totals, seg: torch.Tensor, doc, tile) -> None:
    totals.real += int((seg != int(Segment.PAD)).sum())
    totals.tokens += seg.numel()
    tiles = TileMask(SegmentLayout(seg, doc), resolve_rule(RULE), tile[0], tile[1], seg.shape[1])
    totals.visited_tiles += int((tiles.to_dense() != TILE_EMPTY).sum())
    totals.causal_tiles += tiles.causal_tiles()


def compare(samples: Sequence[list], batch_size: int, max_length: int, tile) -> tuple:
    """(padded, packed) totals over the micro-batches of one shuffled epoch."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(SEED)).tolist()
    padded, packed = Totals(), Totals()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        micro = [samples[i] for i in order[start:start + batch_size]]
        seg, _ = _rows(micro, [[i] for i in range(len(micro))])
        _add(padded, seg, None, tile)
        seg, doc = _rows(micro, plan_packing([len(s) for s in micro], max_length))
        _add(packed, seg, doc, tile)
    return padded, packed


def table(mixes: dict, tile) -> str:
    header = ["length mix", "examples", "B", "max_length", "tokens padded -> packed", "padding padded", "padding packed",
              "tokens removed", "tiles padded", "tiles packed", "tiles skipped by packing", "causal tiles skipped (padded / packed)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, samples in mixes.items():
        max_length = max(len(s) for s in samples)
        for batch_size in BATCH_SIZES:
            padded, packed = compare(samples, batch_size, max_length, tile)
            lines.append("| " + " | ".join([
                name, str(len(samples)), str(batch_size), str(max_length),
                f"{padded.tokens} -> {packed.tokens}",
                f"{100 * padded.pad_share:.1f}%", f"{100 * packed.pad_share:.1f}%",
                f"{100 * (1 - packed.tokens / padded.tokens):.1f}%",
                str(padded.visited_tiles), str(packed.visited_tiles),
                f"{100 * (1 - packed.visited_tiles / padded.visited_tiles):.1f}%",
                f"{100 * (1 - padded.visited_tiles / padded.causal_tiles):.1f}% / "
                f"{100 * (1 - packed.visited_tiles / packed.causal_tiles):.1f}%",
            ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=SYNTHETIC_PER_TASK, help="synthetic examples per task")
    parser.add_argument("--blink", type=int, default=BLINK_SAMPLES, help="BLINK-like samples")
    args = parser.parse_args(argv)
    config = default_config(HEAD_DIM, SM90)
    tile = (config.fwd_block_m, config.fwd_block_n)
    synthetic = synthetic_kinds(per_task=args.per_task)
    mixes = {f"synthetic {task}": kinds for task, kinds in synthetic.items()}
    mixes["synthetic, all tasks mixed"] = [k for kinds in synthetic.values() for k in kinds]
    mixes["BLINK-like (LIVR_SPEC)"] = blink_like_kinds(args.blink)
    print(f"Forward tiles {tile[0]}x{tile[1]} (sm_90, D={HEAD_DIM}), rule {RULE}; max_length = the mix's longest example.\n")
    print(table(mixes, tile))


if __name__ == "__main__":
    main()
