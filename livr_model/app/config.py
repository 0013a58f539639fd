"""The run configuration: every setting of a training run, validated when it is built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from livr_model.modes import Mode, Stage, get_mode

EVAL_METHODS = ("generate", "likelihood")
# Held-out fraction of the training data when no validation set is given.
DEFAULT_VAL_FRACTION = 0.1
# Training examples per synthetic task (the paper trains on 1k samples per task).
DEFAULT_SYNTHETIC_TRAIN = 1000
DEFAULT_SYNTHETIC_VAL = 200
DEFAULT_SYNTHETIC_IMAGE_SIZE = 56
# Image-resolution limits handed to the processor (pixels per image).
PIXEL_LIMITS = ("min_pixels", "max_pixels", "multi_image_max_pixels")
# The paper's multi-task schedule: 2 + 3 epochs, the last checkpoint evaluated.
MULTI_TASK_STAGE_EPOCHS = (2, 3)
# Run-config keys that must match for --resume to continue a run exactly.
RESUME_KEYS = ("model", "data", "val_data", "val_fraction", "mode", "latents", "stage_epochs", "sft_epochs", "lr",
               "weight_decay", "betas", "batch_size", "grad_accum", "warmup_ratio", "lora_r", "lora_alpha",
               "lora_dropout", "seed", "reset_optimizer_per_stage", "synthetic_train_size", "synthetic_image_size",
               "blink_split", "multi_task") + PIXEL_LIMITS


@dataclass
class TrainConfig:
    """Everything a run needs; defaults are the LIVR paper's (supplement) where it gives one."""

    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    data: str = ""
    val_data: Optional[str] = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    mode: str = "livr"
    latents: int = 16
    stage_epochs: tuple = (4, 6)
    sft_epochs: Optional[int] = None
    output_dir: str = "livr_output"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 1
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    max_grad_norm: Optional[float] = 1.0
    reset_optimizer_per_stage: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = True
    max_length: Optional[int] = None
    eval_method: str = "generate"
    eval_rule: str = "standard"
    eval_batch_size: int = 8
    max_new_tokens: int = 16
    val_limit: Optional[int] = None
    save_steps: Optional[int] = None
    keep_checkpoints: int = 2
    max_steps: Optional[int] = None
    resume: bool = False
    synthetic_train_size: int = DEFAULT_SYNTHETIC_TRAIN
    synthetic_val_size: int = DEFAULT_SYNTHETIC_VAL
    synthetic_image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE
    trust_remote_code: bool = False
    progress: bool = True
    # Paper-experiment settings (data splits, multi-task preset, image resolution).
    blink_split: Optional[str] = None
    multi_task: bool = False
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    multi_image_max_pixels: Optional[int] = None

    def __post_init__(self):
        self.stage_epochs = tuple(int(e) for e in self.stage_epochs)
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self) -> None:
        get_mode(self.mode)
        if len(self.stage_epochs) != 2 or any(e < 0 for e in self.stage_epochs) or sum(self.stage_epochs) == 0:
            raise ValueError(f"stage_epochs must be two non-negative epoch counts, not both 0; got {self.stage_epochs!r}")
        if self.sft_epochs is not None and self.sft_epochs < 1:
            raise ValueError(f"sft_epochs must be >= 1 or None; got {self.sft_epochs!r}")
        if self.latents < 1:
            raise ValueError(f"latents must be >= 1; got {self.latents!r}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "keep_checkpoints", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two floats; got {self.betas!r}")
        if self.eval_method not in EVAL_METHODS:
            raise ValueError(f"eval_method must be one of {EVAL_METHODS}; got {self.eval_method!r}")
        for name in ("save_steps", "max_steps", "val_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or None; got {value!r}")
        self.validate_paper_settings()

    def validate_paper_settings(self) -> None:
        for name in PIXEL_LIMITS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive pixel count or None; got {value!r}")
        if self.min_pixels is not None:
            for name in ("max_pixels", "multi_image_max_pixels"):
                value = getattr(self, name)
                if value is not None and value < self.min_pixels:
                    raise ValueError(f"{name}={value} is below min_pixels={self.min_pixels}")
        if self.blink_split is not None and (not isinstance(self.blink_split, str) or not self.blink_split):
            raise ValueError(f"blink_split must be the path of a BLINK split file or None; got {self.blink_split!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_epochs"] = list(self.stage_epochs)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    @property
    def mode_spec(self) -> Mode:
        """The registry entry of ``mode`` (``livr_model.modes``)."""
        return get_mode(self.mode)


def apply_multi_task_preset(settings: dict, levels: Optional[list] = None) -> dict:
    """``multi_task: true`` sets the paper's multi-task schedule (2 + 3 epochs); the last checkpoint
    is then the one evaluated (the trainer reads ``multi_task``).

    ``levels``: the dicts ``settings`` was merged from, lowest priority first (a config file, then
    the command line). Epochs given at the level that turns ``multi_task`` on, or a higher one,
    win over the preset; epochs from a lower level (a config file under ``--multi-task``) do not."""
    levels = [settings] if levels is None else levels
    if not settings.get("multi_task"):
        return settings
    turned_on = [i for i, level in enumerate(levels) if level.get("multi_task")]
    source = turned_on[-1] if turned_on else 0
    if any("stage_epochs" in level for level in levels[source:]):
        return settings
    return {**settings, "stage_epochs": MULTI_TASK_STAGE_EPOCHS}


def stage_plan(cfg: TrainConfig) -> list:
    """The stages a run goes through: its mode's rules with the configured epochs."""
    return cfg.mode_spec.stage_plan(cfg.stage_epochs, cfg.sft_epochs)


__all__ = ["apply_multi_task_preset", "EVAL_METHODS", "MULTI_TASK_STAGE_EPOCHS", "PIXEL_LIMITS", "RESUME_KEYS", "Stage", "TrainConfig", "stage_plan"]
