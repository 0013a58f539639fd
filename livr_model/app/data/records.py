"""What a run records about its data, and the checks that read it back.

``train_fingerprints.json``: the fingerprint (images' pixels, question, choices; no answer) of
every training example, so ``livr-eval`` can refuse evaluation items the run was trained on.
``validation_split.json``: how the validation set was made (held-out indices into the loaded
training data, or a separate source) and its items' fingerprints, so a resumed or evaluated run
uses exactly the same validation items, and notices when the data under it changed.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from ..files import atomic_write_json
from .fingerprint import dataset_fingerprint, example_fingerprint

TRAIN_FINGERPRINTS = "train_fingerprints.json"
VALIDATION_SPLIT = "validation_split.json"
# Where validation examples came from.
HELD_OUT = "held_out"
SEPARATE = "separate"
# Examples handed to train() in memory: the run cannot rebuild them from its config.
GIVEN = "given"
NONE = "none"
# Checkpoint folders sit at <run>/checkpoints/step-N: look this many levels up for the run's records.
RUN_DIR_DEPTH = 2


@dataclass
class DataSplit:
    """Training and validation examples and how the validation set was drawn."""

    train: list
    val: list
    source: str
    held_out: Optional[List[int]] = None
    pool_size: int = 0
    extra: dict = field(default_factory=dict)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def item_fingerprints(examples: Sequence) -> List[str]:
    return [example_fingerprint(e, with_answer=False) for e in examples]


def write_data_records(output_dir, split: DataSplit) -> None:
    """Both record files into ``output_dir`` (atomically)."""
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / TRAIN_FINGERPRINTS, {
        "num_examples": len(split.train),
        "dataset_fingerprint": dataset_fingerprint(split.train),
        "tasks": dict(sorted(Counter(e.task for e in split.train).items())),
        "items": item_fingerprints(split.train),
    })
    atomic_write_json(output_dir / VALIDATION_SPLIT, {
        "source": split.source,
        "held_out_indices": split.held_out,
        "pool_size": split.pool_size,
        "num_examples": len(split.val),
        "dataset_fingerprint": dataset_fingerprint(split.val),
        "items": item_fingerprints(split.val),
        **split.extra,
    })


def find_run_dir(path) -> Optional[Path]:
    """The run directory holding the records, from the run itself or one of its checkpoints."""
    path = Path(path).resolve()
    for candidate in [path, *list(path.parents)[:RUN_DIR_DEPTH]]:
        if (candidate / TRAIN_FINGERPRINTS).is_file():
            return candidate
    return None


def read_validation_split(run_dir) -> Optional[dict]:
    path = Path(run_dir) / VALIDATION_SPLIT
    return read_json(path) if path.is_file() else None


def reuse_held_out(pool: list, recorded: dict, where) -> DataSplit:
    """The recorded held-out split of ``pool`` (the loaded training data)."""
    indices = recorded["held_out_indices"]
    if recorded["pool_size"] != len(pool) or any(not 0 <= i < len(pool) for i in indices):
        raise ValueError(f"{where}: the run held out {len(indices)} of {recorded['pool_size']} examples, but the data "
                         f"now holds {len(pool)}; it changed since the run started")
    held = set(indices)
    train = [e for i, e in enumerate(pool) if i not in held]
    return DataSplit(train, [pool[i] for i in indices], HELD_OUT, list(indices), len(pool))


def drop_trained_items(split: DataSplit) -> DataSplit:
    """Validation items identical to a training item (same images, question, choices) are dropped:
    they would measure memory, not skill. Synthetic generators and hand-made files both produce
    such repeats. The count is recorded."""
    trained = set(item_fingerprints(split.train))
    kept = [e for e, fp in zip(split.val, item_fingerprints(split.val)) if fp not in trained]
    dropped = len(split.val) - len(kept)
    if dropped:
        print(f"note: {dropped} of {len(split.val)} validation items repeat a training item and are left out", flush=True)
    split.val = kept
    split.extra["dropped_training_repeats"] = dropped
    return split


def check_recorded_validation(split: DataSplit, recorded: dict, where) -> None:
    if recorded["source"] == GIVEN:
        raise ValueError(f"{where}: the run's examples were passed to train() in memory, so its validation set cannot "
                         "be rebuilt from the run config; name the evaluation data (--data)")
    if recorded["source"] != split.source or dataset_fingerprint(split.val) != recorded["dataset_fingerprint"]:
        raise ValueError(f"{where}: the validation items differ from the {recorded['num_examples']} the run recorded "
                         f"({VALIDATION_SPLIT}); the data changed since the run started")


def overlap_with_training(run_dir, examples: Sequence) -> Counter:
    """Per task, how many of ``examples`` the run was trained on (same images, question, choices)."""
    trained = set(read_json(Path(run_dir) / TRAIN_FINGERPRINTS)["items"])
    return Counter(e.task for e, fp in zip(examples, item_fingerprints(examples)) if fp in trained)


def check_overlap(checkpoint, examples: Sequence, *, allow: bool) -> dict:
    """Refuse (``allow=False``) or report evaluation items the run was trained on.

    Returns ``{"checked": bool, "overlap": n, "overlap_per_task": {...}}`` for the metrics."""
    run_dir = find_run_dir(checkpoint)
    if run_dir is None:
        message = (f"{checkpoint}: no {TRAIN_FINGERPRINTS} in the run, so overlap between training and evaluation "
                   "data cannot be checked")
        if not allow:
            raise ValueError(message + "; pass --allow-overlap to evaluate anyway")
        print(f"warning: {message}", flush=True)
        return {"checked": False, "overlap": None, "overlap_per_task": None}
    counts = overlap_with_training(run_dir, examples)
    total = sum(counts.values())
    if total and not allow:
        raise ValueError(
            f"{total} of {len(examples)} evaluation items were in the training data of {run_dir} "
            f"(per task: {dict(sorted(counts.items()))}); evaluate on held-out data, or pass --allow-overlap to "
            "evaluate anyway and report the count"
        )
    if total:
        print(f"warning: {total} of {len(examples)} evaluation items were trained on (per task: "
              f"{dict(sorted(counts.items()))})", flush=True)
    return {"checked": True, "overlap": total, "overlap_per_task": dict(sorted(counts.items()))}
