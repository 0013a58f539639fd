"""Learning-rate schedules and the data order of the training loop."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from livr_model.lr import WARMUP_OFFSET, warmup_cosine
from livr_model.modes import TWO_STAGE_NAMES

from .config import TrainConfig

STAGE2 = TWO_STAGE_NAMES[1]

class StageSchedule:
    """LR factor per optimizer step: per stage, linear warmup over ``warmup_ratio`` of its steps then
    cosine decay to 0, restarted at each stage boundary, peaking at that stage's ``peaks`` factor
    (default 1 for every stage). A plain object (not a closure) so LambdaLR can save it in its state dict."""

    def __init__(self, stage_steps: Sequence[int], warmup_ratio: float, peaks: Optional[Sequence[float]] = None):
        if any(int(s) < 0 for s in stage_steps):
            raise ValueError(f"stage_steps must be non-negative; got {list(stage_steps)}")
        peaks = [1.0] * len(stage_steps) if peaks is None else [float(p) for p in peaks]
        if len(peaks) != len(stage_steps) or any(p <= 0 for p in peaks):
            raise ValueError(f"peaks must hold one positive factor per stage ({len(stage_steps)}); got {peaks}")
        self.stage_steps = [int(s) for s in stage_steps]
        self.warmup_ratio = float(warmup_ratio)
        self.peaks = peaks

    def locate(self, step: int) -> tuple:
        """(stage index, step inside that stage) of a global optimizer step."""
        start = 0
        for index, n in enumerate(self.stage_steps):
            if step < start + n:
                return index, step - start
            start += n
        return len(self.stage_steps) - 1, step - (start - self.stage_steps[-1])

    def __call__(self, step: int) -> float:
        index, local = self.locate(step)
        total = self.stage_steps[index]
        if total <= 0:
            return 0.0
        peak = self.peaks[index]
        return peak * warmup_cosine(local, total, math.ceil(self.warmup_ratio * total), warmup_extra=WARMUP_OFFSET)


def stage_peaks(cfg: TrainConfig, plan: Sequence) -> list:
    """Per stage of ``plan``, its peak learning rate as a factor of ``cfg.lr`` (``stage2_lr`` for stage 2)."""
    return [cfg.stage2_lr / cfg.lr if stage.name == STAGE2 and cfg.stage2_lr is not None else 1.0 for stage in plan]


def epoch_order(num_examples: int, seed: int, epoch: int) -> list:
    """The example order of one epoch; depends only on (seed, epoch), never on global RNG state."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_examples, generator=generator).tolist()


def rank_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> list:
    """This rank's micro-batches of one epoch. A global micro-batch holds ``batch_size`` examples per
    rank; the order wraps around so every rank gets the same number of micro-batches (DDP needs it)."""
    if not order:
        raise ValueError("order must hold at least one example")
    global_batch = batch_size * world_size
    num_micro = math.ceil(len(order) / global_batch)
    padded = list(order) + [order[i % len(order)] for i in range(num_micro * global_batch - len(order))]
    return [padded[m * global_batch + rank * batch_size: m * global_batch + (rank + 1) * batch_size] for m in range(num_micro)]


def accumulation_groups(micro_batches: Sequence, grad_accum: int) -> list:
    """Micro-batches grouped into optimizer steps; the last group of an epoch may be shorter."""
    return [list(micro_batches[i:i + grad_accum]) for i in range(0, len(micro_batches), grad_accum)]


def steps_per_epoch(num_examples: int, cfg: TrainConfig, world_size: int) -> int:
    micro = math.ceil(num_examples / (cfg.batch_size * world_size))
    return math.ceil(micro / cfg.grad_accum)
