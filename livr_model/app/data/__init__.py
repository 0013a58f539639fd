"""Data sources and the ``--data`` specs that name them.

A spec is ``<prefix><argument>`` for a registered source (``synthetic:counting,jigsaw``,
``blink:Counting``) or else a JSONL path. ``--data`` takes several specs, separated by spaces or
commas: ``blink:Counting,Jigsaw a.jsonl,b.jsonl``. A comma-separated piece that is neither a
source prefix nor a file continues the source before it (``Jigsaw`` above is a BLINK subtask);
JSONL paths therefore cannot contain spaces or commas.
Examples keep their ``task``, and every report breaks accuracy down per task. Adding a source is
one module here exposing ``load_spec(argument, cfg, split)`` and one ``DataSource`` line in
``SOURCES``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import benchmarks, blink, jsonl, synthetic
from .records import (HELD_OUT, NONE, SEPARATE, DataSplit, check_recorded_validation, drop_trained_items, read_validation_split,
                      reuse_held_out)
from .checks import DataWarning, warn_about_overlap
from .blink import BLINK_SUBTASKS, PAPER_TASKS, load_blink
from .jsonl import load_jsonl, save_jsonl
from .synthetic import SYNTHETIC_TASKS, make_synthetic_dataset

SPLITS = ("train", "val")
BLINK_PREFIX = "blink:"
SPEC_SEPARATORS = re.compile(r"[\s,]+")
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
        DataSource(BLINK_PREFIX, blink.load_spec, "blink:<Subtask>[,<Subtask>]"),
        *(DataSource(f"{name}:", benchmarks.spec_loader(name), benchmarks.SPEC_USAGE[name]) for name in benchmarks.BENCHMARKS),
    )
}

JSONL_SOURCE = DataSource("", jsonl.load_spec, "a JSONL path")
# A spec ending so, or holding a path separator, was meant as a file.
JSONL_SUFFIXES = (".jsonl", ".json")


def source_of(spec: str):
    """(source, argument) of a spec; the JSONL fallback when no prefix matches."""
    for prefix, source in SOURCES.items():
        if spec.startswith(prefix):
            return source, spec[len(prefix):]
    return JSONL_SOURCE, spec


def split_specs(data: str) -> List[str]:
    """The single-source specs inside a ``--data`` value (module docstring)."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"data must be a JSONL path, {' or '.join(s.usage for s in SOURCES.values())}; got an empty value")
    specs: List[str] = []
    for piece in SPEC_SEPARATORS.split(data.strip()):
        if not piece:
            continue
        prefixed = any(piece.startswith(prefix) for prefix in SOURCES)
        if prefixed or Path(piece).is_file() or not specs or source_of(specs[-1])[0] is JSONL_SOURCE:
            specs.append(piece)
        else:
            specs[-1] += "," + piece
    return specs


def _load_one(spec: str, cfg, split: str, setting: str) -> list:
    source, argument = source_of(spec)
    if source is JSONL_SOURCE:
        if not Path(spec).is_file():
            raise ValueError(_not_a_jsonl_file(spec, setting))
        # Its errors name file:line.
        return source.load_spec(argument, cfg, split)
    try:
        return source.load_spec(argument, cfg, split)
    except ValueError as error:
        # A source says what is wrong; which setting held the spec (data or val_data) only the caller knows.
        raise ValueError(f"{setting} {spec!r}: {error}") from error


def _not_a_jsonl_file(spec: str, setting: str) -> str:
    """Why ``spec``, which names no registered source, is not data: a folder, a missing file, or neither."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.jsonl"))
        return (f"{setting} {spec!r} is not a file but a folder; name a JSONL file in it"
                + (f" (it holds {', '.join(found)})" if found else ""))
    if path.suffix in JSONL_SUFFIXES or "/" in spec or "\\" in spec:
        return f"{setting} {spec!r} is not a file: nothing is there"
    return f"{setting} {spec!r} is not a file, nor {', nor '.join(s.usage for s in SOURCES.values())}"


def load_examples(spec: str, cfg, *, split: str, setting: str = "data") -> list:
    """Examples of a ``--data`` value (one or several specs, concatenated in order) for the train
    or val split; errors name ``setting``, the option that held ``spec``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    return [e for one in split_specs(spec) for e in _load_one(one, cfg, split, setting)]


def draws_validation(data: str) -> bool:
    """Every source in ``data`` draws its own validation set."""
    return all(source_of(spec)[0].draws_validation for spec in split_specs(data))


def split_data(cfg, record_dir=None) -> DataSplit:
    """Training and validation examples. Without ``val_data`` a source that draws its own
    validation set does so; other data hold out ``val_fraction`` (a fixed, seeded choice). Validation
    items that repeat a training item are warned about (``DataWarning``, as are repeated training
    examples) and left out (``drop_trained_items``).

    ``record_dir``: a run directory whose ``validation_split.json`` is reused (a resumed or
    evaluated run): the same held-out indices, and an error if the items differ from the record."""
    recorded = read_validation_split(record_dir) if record_dir is not None else None
    split = _fresh_or_recorded_split(cfg, recorded, record_dir)
    warn_about_overlap(split.train, split.val, cfg.data, cfg.val_data)
    split = drop_trained_items(split)
    if recorded is not None:
        check_recorded_validation(split, recorded, record_dir)
    return split


def _fresh_or_recorded_split(cfg, recorded: Optional[dict], record_dir) -> DataSplit:
    if cfg.val_data and any(spec.startswith(BLINK_PREFIX) for spec in split_specs(cfg.val_data)):
        raise ValueError(
            f"val_data {cfg.val_data!r}: BLINK's answered items are what livr-eval scores (with a split file, its "
            "eval ids), so choosing checkpoints on them tunes on the test set; leave val_data out to hold out "
            "val_fraction of the training items instead"
        )
    train_examples = load_examples(cfg.data, cfg, split="train")
    if recorded is not None and recorded["source"] == HELD_OUT:
        return reuse_held_out(train_examples, recorded, record_dir)
    if cfg.val_data or draws_validation(cfg.data):
        val = load_examples(cfg.val_data or cfg.data, cfg, split="val", setting="val_data" if cfg.val_data else "data")
        return DataSplit(train_examples, val, SEPARATE, pool_size=len(train_examples))
    if cfg.val_fraction <= 0:
        return DataSplit(train_examples, [], NONE, pool_size=len(train_examples))
    order = random.Random(cfg.seed + VAL_SPLIT_SALT).sample(range(len(train_examples)), len(train_examples))
    n_val = max(1, round(cfg.val_fraction * len(train_examples)))
    if n_val >= len(train_examples):
        raise ValueError(f"val_fraction={cfg.val_fraction} leaves no training examples out of {len(train_examples)}")
    held = sorted(order[:n_val])
    held_set = set(held)
    return DataSplit([e for i, e in enumerate(train_examples) if i not in held_set], [train_examples[i] for i in held],
                     HELD_OUT, held, len(train_examples))


def prepare_data(cfg, record_dir=None) -> tuple:
    """(train, validation) examples of ``split_data``."""
    split = split_data(cfg, record_dir)
    return split.train, split.val


__all__ = ["BLINK_SUBTASKS", "PAPER_TASKS", "SOURCES", "SYNTHETIC_TASKS", "DataSource", "DataSplit", "DataWarning",
           "load_blink", "load_examples", "load_jsonl", "make_synthetic_dataset", "prepare_data", "save_jsonl", "split_data",
           "split_specs"]
