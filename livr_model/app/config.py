"""The run configuration: every setting of a training run, validated when it is built.

Each field has one line in ``FIELD_CHECKS`` (its type and range); ``TrainConfig`` refuses any value
that does not fit, naming the key, the value and what was expected. Nothing is converted silently:
``'12'`` is not an epoch count and ``'false'`` is not a bool. Float fields take ints and floats
(``lr: 1`` is 1.0) but not strings; ``load_yaml`` reads ``1e-3`` as a float (plain PyYAML reads it
as a string).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from livr_kernels import RULES
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
# numpy and python seeds must fit 32 bits.
MAX_SEED = 2**32 - 1
# Run-config keys that must match for --resume to continue a run exactly.
RESUME_KEYS = ("model", "data", "val_data", "val_fraction", "mode", "latents", "stage_epochs", "sft_epochs", "lr",
               "stage2_lr", "weight_decay", "betas", "batch_size", "grad_accum", "warmup_ratio", "lora_r", "lora_alpha",
               "lora_dropout", "seed", "reset_optimizer_per_stage", "synthetic_train_size", "synthetic_image_size",
               "blink_split", "multi_task") + PIXEL_LIMITS


@dataclass(frozen=True)
class Check:
    """What one config field accepts.

    ``kind``: "int", "float", "bool" or "str"; ``count`` > 0 makes it a list of that many.
    ``low``/``high`` bound numbers (``low_open``/``high_open``: that bound itself is excluded); ``optional``
    allows None; ``choices`` lists the allowed strings; ``nonempty`` refuses "".
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    count: int = 0
    choices: tuple = ()
    nonempty: bool = False

    def expected(self) -> str:
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[self.kind]
        if self.count:
            what = f"a list of {self.count} " + {"int": "integers", "float": "numbers"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low}"
        if self.choices:
            what = f"one of {list(self.choices)}"
        if self.nonempty:
            what = "a non-empty string"
        return what + (" or null" if self.optional else "")

    def _scalar_ok(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.nonempty or value.strip() != "") and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (lists become tuples, ints in float fields floats), or a ValueError."""
        if value is None and self.optional:
            return None
        if self.count:
            ok = isinstance(value, (list, tuple)) and len(value) == self.count and all(self._scalar_ok(v) for v in value)
        else:
            ok = self._scalar_ok(value)
        if not ok:
            hint = ""
            if isinstance(value, str) and self.kind == "float":
                hint = " (write the number unquoted; livr's YAML loader reads 1e-3 as a number)"
            raise ValueError(f"{name}: expected {self.expected()}; got {value!r} ({type(value).__name__}){hint}")
        if self.count:
            return tuple(float(v) if self.kind == "float" else v for v in value)
        return float(value) if self.kind == "float" else value


def _int(low=None, **kw) -> Check:
    return Check("int", low=low, **kw)


def _float(low=None, high=None, **kw) -> Check:
    return Check("float", low=low, high=high, **kw)


BOOL = Check("bool")

# One line per TrainConfig field: adding a field is adding its line here.
FIELD_CHECKS = {
    "model": Check("str", nonempty=True),
    "data": Check("str"),
    "val_data": Check("str", optional=True),
    "val_fraction": _float(0, 1, high_open=True),
    # Checked against the registry in validate(): register_mode may add modes after this import.
    "mode": Check("str", nonempty=True),
    "latents": _int(1),
    "stage_epochs": _int(0, count=2),
    "sft_epochs": _int(1, optional=True),
    "output_dir": Check("str", nonempty=True),
    "lr": _float(0, low_open=True),
    "stage2_lr": _float(0, low_open=True, optional=True),
    "weight_decay": _float(0),
    "betas": _float(0, 1, high_open=True, count=2),
    "adam_eps": _float(0, low_open=True),
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "warmup_ratio": _float(0, 1, high_open=True),
    "max_grad_norm": _float(0, optional=True),
    "reset_optimizer_per_stage": BOOL,
    "lora_r": _int(1),
    "lora_alpha": _int(1),
    "lora_dropout": _float(0, 1, high_open=True),
    "seed": _int(0, high=MAX_SEED),
    "gradient_checkpointing": BOOL,
    "bf16": BOOL,
    "max_length": _int(1, optional=True),
    "packing": BOOL,
    "eval_method": Check("str", choices=EVAL_METHODS),
    "eval_rule": Check("str", choices=tuple(RULES)),
    "eval_batch_size": _int(1),
    "max_new_tokens": _int(1),
    "val_limit": _int(1, optional=True),
    "save_steps": _int(1, optional=True),
    "keep_checkpoints": _int(1),
    "max_steps": _int(1, optional=True),
    "resume": BOOL,
    "overwrite": BOOL,
    "allow_outside_paths": BOOL,
    "synthetic_train_size": _int(1),
    "synthetic_val_size": _int(1),
    "synthetic_image_size": _int(1),
    "trust_remote_code": BOOL,
    "progress": BOOL,
    "blink_split": Check("str", optional=True, nonempty=True),
    "multi_task": BOOL,
    "min_pixels": _int(1, optional=True),
    "max_pixels": _int(1, optional=True),
    "multi_image_max_pixels": _int(1, optional=True),
}


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
    # Peak learning rate of stage 2 (the standard-mask stage of a two-stage mode); None: lr.
    stage2_lr: Optional[float] = None
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
    # Pack each micro-batch's examples into rows of at most max_length tokens (one row when None).
    packing: bool = False
    eval_method: str = "generate"
    eval_rule: str = "standard"
    eval_batch_size: int = 8
    max_new_tokens: int = 16
    val_limit: Optional[int] = None
    save_steps: Optional[int] = None
    keep_checkpoints: int = 2
    max_steps: Optional[int] = None
    resume: bool = False
    # Start afresh in an output directory that holds another run (its checkpoints are deleted).
    overwrite: bool = False
    # JSONL image paths may be absolute or climb out of the data file's folder with "..".
    allow_outside_paths: bool = False
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
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) every field, then the rules that tie fields together."""
        for f in dataclasses.fields(self):
            if f.name not in FIELD_CHECKS:
                raise TypeError(f"TrainConfig.{f.name} has no line in FIELD_CHECKS (livr_model/app/config.py): add its type and range")
            setattr(self, f.name, FIELD_CHECKS[f.name].check(f.name, getattr(self, f.name)))
        get_mode(self.mode)
        if sum(self.stage_epochs) == 0:
            raise ValueError(f"stage_epochs: the two epoch counts must not both be 0; got {list(self.stage_epochs)}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in output_dir, or replace it")
        if self.min_pixels is not None:
            for name in ("max_pixels", "multi_image_max_pixels"):
                value = getattr(self, name)
                if value is not None and value < self.min_pixels:
                    raise ValueError(f"{name}={value} is below min_pixels={self.min_pixels}")

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


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key given twice is an error (plain PyYAML keeps the last
    one silently), and ``1e-3`` is a float as in YAML 1.2 (PyYAML's YAML 1.1 rules need a dot)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # "<<: *defaults" then an explicit key is an override, not a duplicate.
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ValueError(f"key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed with ``ConfigLoader``; errors name ``source`` (and the line, for a syntax error)."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.MarkedYAMLError as error:
        raise ValueError(f"{source}: {_yaml_syntax_error(error)}") from None
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"{source}: {error}") from None


def _yaml_syntax_error(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's several-line report (carets drawn under excerpts) as one line: where, what, and
    where the construct it was reading began."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, context = error.problem or error.context or "not valid YAML", error.context if error.problem else None
    mark = error.problem_mark or error.context_mark
    text = f"{at(mark)}: {problem}" if mark is not None else problem
    if context:
        text += f" ({context}" + (f" that starts at {at(error.context_mark)}" if error.context_mark is not None else "") + ")"
    return text


def stage_plan(cfg: TrainConfig) -> list:
    """The stages a run goes through: its mode's rules with the configured epochs."""
    return cfg.mode_spec.stage_plan(cfg.stage_epochs, cfg.sft_epochs)


__all__ = ["EVAL_METHODS", "FIELD_CHECKS", "MULTI_TASK_STAGE_EPOCHS", "PIXEL_LIMITS", "RESUME_KEYS", "Check", "ConfigLoader",
           "apply_multi_task_preset", "load_yaml", "Stage", "TrainConfig", "stage_plan"]
