"""Data sources and the ``--data`` specs that name them.

A spec is ``<prefix><argument>`` for a registered source (``synthetic:counting,jigsaw``,
``blink:Counting``) or else a JSONL path. Adding a source is one module here exposing
``load_spec(argument, cfg, split)`` and one ``DataSource`` line in ``SOURCES``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

from . import benchmarks, blink, jsonl, synthetic
from .checks import DataWarning, warn_about_overlap
from .blink import BLINK_SUBTASKS, PAPER_TASKS, load_blink
from .jsonl import load_jsonl, save_jsonl
from .synthetic import SYNTHETIC_TASKS, make_synthetic_dataset

SPLITS = ("train", "val")
VAL_SPLIT_SALT = 7919


@dataclass(frozen=True)
class DataSource:
    prefix: str
    load_spec: Callable
    usage: str
    # Without --val-data the source draws its own validation split instead of holding examples out.
    draws_validation: bool = False


SOURCES: Dict[str, DataSource] = {
    s.prefix: s
    for s in (
        DataSource("synthetic:", synthetic.load_spec, "synthetic:<task>[,<task>]", draws_validation=True),
        DataSource("blink:", blink.load_spec, "blink:<Subtask>"),
        *(DataSource(f"{name}:", benchmarks.spec_loader(name), benchmarks.SPEC_USAGE[name]) for name in benchmarks.BENCHMARKS),
    )
}

JSONL_SOURCE = DataSource("", jsonl.load_spec, "a JSONL path")


def source_of(spec: str):
    """(source, argument) of a spec; the JSONL fallback when no prefix matches."""
    for prefix, source in SOURCES.items():
        if spec.startswith(prefix):
            return source, spec[len(prefix):]
    return JSONL_SOURCE, spec


def load_examples(spec: str, cfg, *, split: str) -> list:
    """Examples of one data spec (``SOURCES``, else a JSONL path) for the train or val split."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data must be a JSONL path, {' or '.join(s.usage for s in SOURCES.values())}; got an empty value")
    source, argument = source_of(spec)
    if source is JSONL_SOURCE and not Path(spec).is_file():
        raise ValueError(f"data {spec!r} is not a file, nor {', nor '.join(s.usage for s in SOURCES.values())}")
    return source.load_spec(argument, cfg, split)


def prepare_data(cfg) -> tuple:
    """(train, validation) examples. Without ``val_data`` a source that draws its own validation
    set does so; other data hold out ``val_fraction`` (a fixed, seeded choice). Duplicates and
    validation examples that are also training examples are warned about (``DataWarning``)."""
    train_examples, val_examples = _split_data(cfg)
    warn_about_overlap(train_examples, val_examples, cfg.data, cfg.val_data)
    return train_examples, val_examples


def _split_data(cfg) -> tuple:
    train_examples = load_examples(cfg.data, cfg, split="train")
    if cfg.val_data:
        return train_examples, load_examples(cfg.val_data, cfg, split="val")
    if source_of(cfg.data)[0].draws_validation:
        return train_examples, load_examples(cfg.data, cfg, split="val")
    if cfg.val_fraction <= 0:
        return train_examples, []
    order = random.Random(cfg.seed + VAL_SPLIT_SALT).sample(range(len(train_examples)), len(train_examples))
    n_val = max(1, round(cfg.val_fraction * len(train_examples)))
    if n_val >= len(train_examples):
        raise ValueError(f"val_fraction={cfg.val_fraction} leaves no training examples out of {len(train_examples)}")
    held = set(order[:n_val])
    return [e for i, e in enumerate(train_examples) if i not in held], [train_examples[i] for i in sorted(held)]


__all__ = ["BLINK_SUBTASKS", "PAPER_TASKS", "SOURCES", "SYNTHETIC_TASKS", "DataSource", "DataWarning", "load_blink", "load_examples",
           "load_jsonl", "make_synthetic_dataset", "prepare_data", "save_jsonl"]
