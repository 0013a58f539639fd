"""BLINK (BLINK-Benchmark/BLINK on the Hugging Face hub) through the ``datasets`` library.

BLINK publishes answers for its ``val`` split only, and that split is what ``livr-eval --data
blink:<Subtask>`` scores. Training on it therefore needs a split file naming disjoint ``train``
and ``eval`` item ids per subtask (``write_blink_split``, or ``python -m
livr_model.app.data.blink``); ``blink:`` then trains on the ``train`` ids only and evaluates on the
``eval`` ids only. Without a split file ``blink:`` refuses to train.

Split file (JSON)::

    {"format": "livr-blink-split", "seed": 42,
     "tasks": {"Counting": {"train": ["val_Counting_1", ...], "eval": ["val_Counting_2", ...]}}}
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from livr_model.prompts import Example

from ..cli_errors import add_debug_flag, run_command, user_input
from ..files import atomic_write_json

BLINK_REPO = "BLINK-Benchmark/BLINK"
BLINK_SPLITS = ("val", "test")
BLINK_SUBTASKS = (
    "Art_Style",
    "Counting",
    "Forensic_Detection",
    "Functional_Correspondence",
    "IQ_Test",
    "Jigsaw",
    "Multi-view_Reasoning",
    "Object_Localization",
    "Relative_Depth",
    "Relative_Reflectance",
    "Semantic_Correspondence",
    "Spatial_Relation",
    "Visual_Correspondence",
    "Visual_Similarity",
)
# The nine BLINK-derived tasks of the LIVR paper.
PAPER_TASKS = (
    "Counting",
    "Jigsaw",
    "Object_Localization",
    "Visual_Correspondence",
    "Art_Style",
    "Semantic_Correspondence",
    "Functional_Correspondence",
    "Relative_Reflectance",
    "Visual_Similarity",
)
BLINK_MAX_IMAGES = 4


def _resolve_blink_subtask(subtask: str) -> str:
    by_lower = {name.lower(): name for name in BLINK_SUBTASKS}
    if not isinstance(subtask, str) or subtask.lower() not in by_lower:
        raise ValueError(f"subtask must be one of the BLINK subtasks {list(BLINK_SUBTASKS)}; got {subtask!r}")
    return by_lower[subtask.lower()]


def load_blink(subtask: str, split: str = "val", cache_dir=None) -> List[Example]:
    """One BLINK subtask (``BLINK_SUBTASKS``, case-insensitive) through the ``datasets`` library.

    Needs the Hugging Face hub (or a filled ``cache_dir``); answers are public for ``val`` only."""
    name = _resolve_blink_subtask(subtask)
    if split not in BLINK_SPLITS:
        raise ValueError(f"split must be one of {BLINK_SPLITS}; got {split!r}")
    rows = load_rows(name, split, cache_dir)
    examples = []
    for index, row in enumerate(rows):
        images = [row[f"image_{i}"] for i in range(1, BLINK_MAX_IMAGES + 1) if row.get(f"image_{i}") is not None]
        try:
            examples.append(
                Example(
                    images=[image.convert("RGB") for image in images],
                    question=row["question"],
                    choices=list(row["choices"]),
                    answer=row["answer"],
                    task=name,
                    meta={"idx": str(row.get("idx", index))},
                )
            )
        except ValueError as error:
            raise ValueError(f"BLINK {name} {split} item {index}: {error} (test-split answers are hidden)") from None
    return examples


class BlinkUnavailable(OSError, RuntimeError):
    """BLINK cannot be read here (no ``datasets``, no hub, no cache). An OSError, so the tools report
    it in one line as they do an unreachable model hub; a RuntimeError, as it was before."""


def load_rows(name: str, split: str, cache_dir=None):
    """The raw rows of one BLINK subtask from the hub (or the ``datasets`` cache)."""
    try:
        # Optional heavy dependency (the `blink` extra): imported only when BLINK is asked for.
        import datasets
    except ImportError as error:
        raise BlinkUnavailable("load_blink needs the `datasets` library: pip install 'livr[blink]'") from error
    try:
        return datasets.load_dataset(BLINK_REPO, name, split=split, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many types (offline, HTTP, missing cache)
        raise BlinkUnavailable(
            f"could not load BLINK subtask {name!r} (split {split!r}) from the Hugging Face hub "
            f"({BLINK_REPO}): {type(error).__name__}: {' '.join(str(error).split())}. BLINK needs a reachable hub or a cache "
            "already holding it (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE block downloads); offline, use a "
            "JSONL file or the built-in synthetic tasks instead."
        ) from error


SPLIT_FORMAT = "livr-blink-split"
SPLIT_PARTS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.5


def parse_subtasks(argument: str) -> List[str]:
    """``"Counting,Jigsaw"`` -> canonical subtask names, in order, without repeats."""
    names = [part.strip() for part in argument.split(",") if part.strip()]
    if not names:
        raise ValueError(f"blink: needs at least one subtask, e.g. blink:Counting,Jigsaw; one of {list(BLINK_SUBTASKS)}")
    return list(dict.fromkeys(_resolve_blink_subtask(n) for n in names))


def make_blink_split(ids_by_task: Dict[str, Sequence[str]], eval_fraction: float = DEFAULT_EVAL_FRACTION,
                     seed: int = 42) -> dict:
    """A split of each subtask's item ids into disjoint ``train`` and ``eval`` lists (seeded)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction!r}")
    tasks = {}
    for task, ids in ids_by_task.items():
        ids = sorted(str(i) for i in ids)
        if len(ids) < 2:
            raise ValueError(f"BLINK {task} has {len(ids)} item(s); a split needs at least 2")
        shuffled = random.Random(f"{seed}:{task}").sample(ids, len(ids))
        n_eval = min(len(ids) - 1, max(1, round(eval_fraction * len(ids))))
        tasks[_resolve_blink_subtask(task)] = {"train": sorted(shuffled[n_eval:]), "eval": sorted(shuffled[:n_eval])}
    return {"format": SPLIT_FORMAT, "seed": seed, "eval_fraction": eval_fraction, "tasks": tasks}


def write_blink_split(path, subtasks: Sequence[str], eval_fraction: float = DEFAULT_EVAL_FRACTION, seed: int = 42,
                      cache_dir=None) -> dict:
    """Load the subtasks' ``val`` items and write a split file (format in the module docstring)."""
    ids = {name: [e.meta["idx"] for e in load_blink(name, "val", cache_dir)] for name in subtasks}
    split = make_blink_split(ids, eval_fraction, seed)
    atomic_write_json(Path(path), split)
    return split


def read_blink_split(path) -> dict:
    """A split file, checked: known subtasks, both parts present, no id in both."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"blink_split: {str(path)!r} is not a file; write one with write_blink_split "
                         "(python -m livr_model.app.data.blink --tasks Counting --out split.json)")
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"blink_split {path}: not valid JSON ({error})") from None
    if not isinstance(split, dict) or split.get("format") != SPLIT_FORMAT or not isinstance(split.get("tasks"), dict):
        raise ValueError(f"blink_split {path}: expected {{'format': {SPLIT_FORMAT!r}, 'tasks': {{subtask: {{'train': [...], 'eval': [...]}}}}}}")
    tasks = {}
    for task, parts in split["tasks"].items():
        name = _resolve_blink_subtask(task)
        if not isinstance(parts, dict) or any(not isinstance(parts.get(p), list) for p in SPLIT_PARTS):
            raise ValueError(f"blink_split {path}: task {task!r} must hold 'train' and 'eval' lists of item ids")
        both = set(map(str, parts["train"])) & set(map(str, parts["eval"]))
        if both:
            raise ValueError(f"blink_split {path}: {len(both)} {task} item(s) are in both train and eval, e.g. {sorted(both)[:3]}")
        tasks[name] = {p: set(map(str, parts[p])) for p in SPLIT_PARTS}
    return tasks


def _part_of_split(examples: List[Example], ids: set, name: str, part: str, path) -> List[Example]:
    chosen = [e for e in examples if e.meta["idx"] in ids]
    missing = len(ids) - len(chosen)
    if missing:
        raise ValueError(f"blink_split {path}: {missing} {name} {part} id(s) are not BLINK val items")
    return chosen


def load_spec(argument: str, cfg, split: str) -> List[Example]:
    """``blink:<Subtask>[,<Subtask>...]``: BLINK's val items; with ``cfg.blink_split`` the split
    file's ``train`` ids for training and its ``eval`` ids otherwise. Training without a split file
    is refused: it would train on the items ``livr-eval --data blink:...`` scores."""
    names = parse_subtasks(argument)
    split_path = getattr(cfg, "blink_split", None)
    if split_path is None:
        if split == "train":
            raise ValueError(
                "training would use BLINK's val split, the only one with answers and the one "
                "livr-eval scores. Name a split file with disjoint train/eval item ids: --blink-split split.json "
                "(write one with: python -m livr_model.app.data.blink --tasks "
                f"{','.join(names)} --out split.json), or train on other data (JSONL, livr-data builders)"
            )
        return [e for name in names for e in load_blink(name, "val")]
    tasks = read_blink_split(split_path)
    part = "train" if split == "train" else "eval"
    examples = []
    for name in names:
        if name not in tasks:
            raise ValueError(f"blink_split {split_path} has no entry for {name}; it covers {sorted(tasks)}")
        examples += _part_of_split(load_blink(name, "val"), tasks[name][part], name, part, split_path)
    return examples


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m livr_model.app.data.blink",
                                description="Write a BLINK split file: disjoint train/eval item ids per subtask.")
    p.add_argument("--tasks", required=True, help="comma-separated BLINK subtasks, e.g. Counting,Jigsaw")
    p.add_argument("--out", required=True, help="where the JSON split file goes")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION, help="share of each subtask kept for evaluation")
    p.add_argument("--seed", type=int, default=42)
    add_debug_flag(p)
    return run_command(p, _write_split, argv)


def _write_split(args: argparse.Namespace) -> int:
    with user_input():
        split = write_blink_split(args.out, parse_subtasks(args.tasks), args.eval_fraction, args.seed)
    for task, parts in split["tasks"].items():
        print(f"{task}: {len(parts['train'])} train, {len(parts['eval'])} eval", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
