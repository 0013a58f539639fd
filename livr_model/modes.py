"""The comparison modes of the LIVR paper, one ``Mode`` object each, in one registry.

A mode owns everything that differs between the runs it compares:

* its prompt transform (``prepare``: e.g. every image given twice);
* where its latent tokens come from (``latents``): K new tokens added to the vocabulary
  (``LATENTS_NEW``), K existing vocabulary tokens appended in the same place (``LATENTS_VOCAB``,
  chosen by ``livr_model.latents.vocabulary_latent_ids``), or none;
* its stage plan: the attention rule of each stage; two rules run the configured epochs (E1, E2),
  one rule runs a single stage of E1 + E2 epochs (or ``sft_epochs``);
* which parameters train: LoRA on the language model and/or the K latent rows;
* which probes apply at evaluation.

Adding a mode is one ``Mode(...)`` entry in ``MODES`` (or ``register_mode``); the trainer, the
prompt encoder and the evaluator read only these fields. The README's mode table lists them.

========================  ==============================  ===================================  ==============
mode                      prompt                          stages (rule, epochs)                trains
========================  ==============================  ===================================  ==============
``livr``                  question + K new latents        bottleneck E1, standard E2           LoRA + K rows
``livr-answer-only``      question + K new latents        bottleneck_answer_only E1,           LoRA + K rows
                                                          standard E2
``latents-only``          question + K new latents        standard E1, standard E2             LoRA + K rows
``mask-only``             question + K existing           bottleneck E1, standard E2           LoRA + K rows
                          vocabulary tokens
``prompt-tuning``         question + K new soft tokens    standard, E1 + E2 (one stage)        K rows only
``sft``                   question                        standard, E1 + E2 (one stage)        LoRA
``image-twice``           every image given twice         standard, E1 + E2 (one stage)        LoRA
========================  ==============================  ===================================  ==============
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

LATENTS_NEW = "new"
LATENTS_VOCAB = "vocab"
LATENTS_NONE = "none"
LATENT_SOURCES = (LATENTS_NEW, LATENTS_VOCAB, LATENTS_NONE)

TRAIN_LORA = "lora"
TRAIN_LATENT_ROWS = "latent_rows"
TRAINABLE = (TRAIN_LORA, TRAIN_LATENT_ROWS)

PROBE_ANSWER_ATTENTION = "answer_to_latent_attention"
PROBE_LATENTS_REMOVED = "latents_removed"
PROBE_BOTTLENECK_FORCED = "bottleneck_forced"
PROBE_HEATMAP = "heatmap"
PROBES = (PROBE_ANSWER_ATTENTION, PROBE_LATENTS_REMOVED, PROBE_BOTTLENECK_FORCED, PROBE_HEATMAP)

TWO_STAGE_NAMES = ("stage1", "stage2")


@dataclass(frozen=True)
class Stage:
    name: str
    rule: str
    epochs: int


def unchanged(example):
    return example


def images_twice(example):
    """Every image of the prompt given twice (the paper's "image twice" ablation)."""
    return dataclasses.replace(example, images=list(example.images) * 2)


@dataclass(frozen=True)
class Mode:
    """One comparison mode (see the module docstring for each field's role)."""

    name: str
    latents: str
    stage_rules: tuple
    trains: tuple = (TRAIN_LORA,)
    probes: tuple = (PROBE_BOTTLENECK_FORCED,)
    prepare: Callable = unchanged
    description: str = ""

    def __post_init__(self):
        if self.latents not in LATENT_SOURCES:
            raise ValueError(f"Mode {self.name!r}: latents must be one of {LATENT_SOURCES}; got {self.latents!r}")
        if len(self.stage_rules) not in (1, len(TWO_STAGE_NAMES)):
            raise ValueError(f"Mode {self.name!r}: stage_rules must name one or two rules; got {self.stage_rules!r}")
        if not self.trains or set(self.trains) - set(TRAINABLE):
            raise ValueError(f"Mode {self.name!r}: trains must be a non-empty selection of {TRAINABLE}; got {self.trains!r}")
        if TRAIN_LATENT_ROWS in self.trains and self.latents == LATENTS_NONE:
            raise ValueError(f"Mode {self.name!r}: {TRAIN_LATENT_ROWS!r} needs latent tokens (latents 'new' or 'vocab')")
        if self.latents == LATENTS_NEW and TRAIN_LATENT_ROWS not in self.trains:
            # New rows start as random draws; frozen, they would be noise in every prompt.
            raise ValueError(f"Mode {self.name!r}: new latent tokens must train their rows ({TRAIN_LATENT_ROWS!r})")
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"Mode {self.name!r}: unknown probes {sorted(unknown)}; known are {PROBES}")

    @property
    def new_latents(self) -> bool:
        """Adds K latent tokens to the vocabulary (and trains their embedding rows)."""
        return self.latents == LATENTS_NEW

    @property
    def vocab_latents(self) -> bool:
        """Appends K existing vocabulary tokens as the latents (marked LATENT by position)."""
        return self.latents == LATENTS_VOCAB

    @property
    def has_latents(self) -> bool:
        return self.latents != LATENTS_NONE

    @property
    def trains_lora(self) -> bool:
        return TRAIN_LORA in self.trains

    def stage_plan(self, stage_epochs: Sequence[int], sft_epochs: Optional[int] = None) -> List[Stage]:
        """The stages this mode runs (rule and epochs of each); empty stages are dropped."""
        e1, e2 = (int(e) for e in stage_epochs)
        if len(self.stage_rules) == 1:
            return [Stage(self.name, self.stage_rules[0], sft_epochs if sft_epochs is not None else e1 + e2)]
        stages = [Stage(name, rule, epochs) for name, rule, epochs in zip(TWO_STAGE_NAMES, self.stage_rules, (e1, e2))]
        return [s for s in stages if s.epochs > 0]


MODES: Dict[str, Mode] = {}


def register_mode(mode: Mode, *, overwrite: bool = False) -> Mode:
    if not isinstance(mode, Mode):
        raise ValueError(f"mode must be a Mode; got {type(mode).__name__}")
    if mode.name in MODES and not overwrite:
        raise ValueError(f"mode {mode.name!r} is already registered; pass overwrite=True to replace it")
    MODES[mode.name] = mode
    return mode


def get_mode(name) -> Mode:
    if isinstance(name, Mode):
        return name
    if name not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}; got {name!r}")
    return MODES[name]


for _mode in (
    Mode("sft", LATENTS_NONE, ("standard",), description="plain supervised fine-tuning, one stage"),
    Mode("livr", LATENTS_NEW, ("bottleneck", "standard"), trains=TRAINABLE, probes=PROBES,
         description="K new latents; stage 1 under the visual bottleneck, stage 2 standard"),
    Mode("livr-answer-only", LATENTS_NEW, ("bottleneck_answer_only", "standard"), trains=TRAINABLE, probes=PROBES,
         description="K new latents; stage 1 blocks only the answer tokens from the image, stage 2 standard"),
    Mode("latents-only", LATENTS_NEW, ("standard", "standard"), trains=TRAINABLE, probes=PROBES,
         description="K new latents, no bottleneck in either stage"),
    Mode("mask-only", LATENTS_VOCAB, ("bottleneck", "standard"), trains=TRAINABLE, probes=PROBES,
         description="the bottleneck with K appended existing vocabulary tokens as latents (their rows train), no new tokens"),
    Mode("prompt-tuning", LATENTS_NEW, ("standard",), trains=(TRAIN_LATENT_ROWS,), probes=PROBES,
         description="K new soft tokens after the question, only their rows train (no LoRA), standard rule, one stage"),
    Mode("image-twice", LATENTS_NONE, ("standard",), prepare=images_twice, description="every image given twice, one stage"),
):
    register_mode(_mode)
del _mode
