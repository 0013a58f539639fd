"""BLINK (BLINK-Benchmark/BLINK on the Hugging Face hub) through the ``datasets`` library."""
from __future__ import annotations

from typing import List

from livr_model.prompts import Example

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
    try:
        # Optional heavy dependency (the `blink` extra): imported only when BLINK is asked for.
        import datasets
    except ImportError as error:
        raise RuntimeError("load_blink needs the `datasets` library: pip install 'livr[blink]'") from error

    try:
        rows = datasets.load_dataset(BLINK_REPO, name, split=split, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many types (offline, HTTP, missing cache)
        raise RuntimeError(
            f"could not load BLINK subtask {name!r} (split {split!r}) from the Hugging Face hub "
            f"({BLINK_REPO}): {type(error).__name__}: {error}. BLINK needs a reachable hub or a cache "
            "already holding it (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE block downloads); offline, use a "
            "JSONL file or the built-in synthetic tasks instead."
        ) from error
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
                    meta={"idx": row.get("idx", index)},
                )
            )
        except ValueError as error:
            raise ValueError(f"BLINK {name} {split} item {index}: {error} (test-split answers are hidden)") from None
    return examples


def load_spec(argument: str, cfg, split: str) -> List[Example]:
    """``blink:<Subtask>``. BLINK publishes answers for its val split only; a training run holds part of it out."""
    return load_blink(argument, "val")
