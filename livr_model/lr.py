"""The learning-rate shape every LIVR stage uses: linear warmup, then cosine decay.

One formula for ``livr-train`` (``livr_model.app.schedule``), the tiny base's pre-training and the
TRL / Trainer callback (``livr_model.integrations``).
"""
from __future__ import annotations

import math

# The first update of a stage must not have lr 0: warmup factor is (s + 1) / (W + 1).
WARMUP_OFFSET = 1


def warmup_cosine(step: int, total: int, warmup: int, *, warmup_extra: int = 0, floor: float = 0.0) -> float:
    """LR factor of ``step`` in a phase of ``total`` steps: linear warmup ``(step + 1) / (warmup +
    warmup_extra)`` over the first ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + warmup_extra)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
