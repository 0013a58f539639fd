"""JSONL data: one visual question per line, images as files next to it.

Format, one object per line::

    {"images": ["imgs/0.png"], "question": "How many dogs?", "choices": ["1", "2"], "answer": "B", "task": "count"}

``images`` are paths relative to the file's folder (or ``image_root``); a path that is absolute
or climbs out of that folder with ``..`` is refused unless ``allow_outside_paths`` is set (the
check is on the written path, so a symlinked image folder inside the data folder works).
``answer`` is a string: a letter ("B" or "(B)") when there are ``choices``, else the exact answer
text (``"7"``, not ``7``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Sequence

from PIL import Image

from livr_model.prompts import Example

# What PIL raises on a file it cannot decode: truncated or corrupt data, not an image, an empty
# file (UnidentifiedImageError is an OSError), or more pixels than Image.MAX_IMAGE_PIXELS allows.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _load_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except IMAGE_ERRORS as error:
        raise ValueError(f"{where}: image {str(path)!r} cannot be read: {type(error).__name__}: {error}") from None


def _is_outside(image_path: str) -> bool:
    """True for an absolute path or one whose ``..`` parts climb out of its base folder."""
    if Path(image_path).is_absolute() or os.path.isabs(image_path):
        return True
    return os.path.normpath(image_path).split(os.sep)[0] == os.pardir


def _check_record(record: dict, where: str) -> None:
    """Refuse what Example would otherwise turn into text silently: a non-string answer (null,
    NaN, a number) and choices given twice."""
    answer = record["answer"]
    if not isinstance(answer, str):
        raise ValueError(f"{where}: answer must be a string (a letter, or the answer text in quotes); "
                         f"got {json.dumps(answer)} ({type(answer).__name__})")
    choices = record.get("choices")
    if isinstance(choices, list):
        seen = set()
        for choice in choices:
            key = choice.strip() if isinstance(choice, str) else choice
            if isinstance(key, str) and key in seen:
                raise ValueError(f"{where}: choice {choice!r} is given twice in {choices!r}; choices must differ")
            seen.add(key)


def load_jsonl(path, image_root=None, *, allow_outside_paths: bool = False) -> List[Example]:
    """Examples from a JSONL file (format in the module docstring). Image paths are relative to
    ``image_root`` when given, else to the file's folder. Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing JSONL file; {str(path)!r} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object; got {type(record).__name__}")
            missing = [key for key in ("images", "question", "answer") if key not in record]
            if missing:
                raise ValueError(f"{where}: missing required field(s) {missing}")
            _check_record(record, where)
            image_paths = record["images"]
            if isinstance(image_paths, str):
                image_paths = [image_paths]
            if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
                raise ValueError(f"{where}: images must be a list of file paths; got {record['images']!r}")
            images = []
            for image_path in image_paths:
                if not allow_outside_paths and _is_outside(image_path):
                    raise ValueError(f"{where}: image path {image_path!r} is absolute or leaves the data folder {str(root)!r}; "
                                     "allow such paths with --allow-outside-paths (allow_outside_paths: true)")
                full = root / image_path
                if not full.is_file():
                    raise ValueError(f"{where}: image {image_path!r} not found (looked for {full})")
                images.append(_load_image(full, where))
            try:
                examples.append(
                    Example(
                        images=images,
                        question=record["question"],
                        choices=record.get("choices") or [],
                        answer=record["answer"],
                        task=record.get("task") or "custom",
                    )
                )
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def save_jsonl(examples: Sequence[Example], path, image_dir) -> None:
    """Write ``examples`` as JSONL at ``path``, their images as PNG files in ``image_dir``
    (referenced relative to the JSONL file's folder)."""
    path = Path(path)
    image_dir = Path(image_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for index, example in enumerate(examples):
            if not isinstance(example, Example):
                raise ValueError(f"examples[{index}] must be an Example; got {type(example).__name__}")
            names = []
            for image_index, image in enumerate(example.images):
                image_path = image_dir / f"{index:06d}_{image_index}.png"
                image.save(image_path)
                names.append(os.path.relpath(image_path, path.parent))
            record = {"images": names, "question": example.question, "choices": example.choices,
                      "answer": example.answer, "task": example.task}
            handle.write(json.dumps(record) + "\n")


def load_spec(argument: str, cfg, split: str) -> List[Example]:
    """A JSONL path (the fallback when a data spec names no other source)."""
    return load_jsonl(argument, allow_outside_paths=getattr(cfg, "allow_outside_paths", False))
