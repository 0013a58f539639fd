"""Runs trained with TRL's SFTTrainer or transformers' Trainer and ``LivrStageCallback``: where their
checkpoint is and the run config it implies, so ``livr-eval`` scores them like livr-train runs.

Such a run's output directory holds ``checkpoint-N/`` directories (the trainer's), each with peft's
adapter and the callback's ``livr_model.integrations.RUN_FILES``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from livr_model.integrations import RUN_FILE

from .config import TrainConfig


def find_trainer_checkpoint(path) -> Optional[Path]:
    """``path`` itself when it is such a checkpoint, else its newest ``checkpoint-N`` that is one, else None."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return path
    found = [p.parent for p in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{RUN_FILE}")]
    steps = {d: d.name.rsplit("-", 1)[-1] for d in found}
    found = [d for d in found if steps[d].isdigit()]
    return max(found, key=lambda d: int(steps[d])) if found else None


def trainer_run_config(checkpoint_dir) -> Optional[TrainConfig]:
    """The TrainConfig a trainer checkpoint's ``livr_run.json`` describes; None for any other directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / RUN_FILE).is_file():
        return None
    run = json.loads((checkpoint_dir / RUN_FILE).read_text())
    if not (checkpoint_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{checkpoint_dir} has no {ADAPTER_CONFIG}: livr-eval scores LoRA (peft) runs")
    if not run.get("base_model"):
        raise ValueError(f"{checkpoint_dir / RUN_FILE} names no base model; train with "
                         "LivrStageCallback(..., base_model='<hub id or folder>')")
    return TrainConfig(model=run["base_model"], mode=run["mode"], latents=run["num_latents"] or TrainConfig.latents,
                       stage_epochs=tuple(run["stage_epochs"]), eval_rule=run["eval_rule"], output_dir=str(checkpoint_dir))
