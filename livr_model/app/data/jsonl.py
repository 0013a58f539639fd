"""JSONL data: one visual question per line, images as files next to it.

Format, one object per line::

    {"images": ["imgs/0.png"], "question": "How many dogs?", "choices": ["1", "2"], "answer": "B", "task": "count"}

``images`` are paths relative to the file's folder (or ``image_root``); ``answer`` is a letter
("B" or "(B)") when there are ``choices``, else the exact answer text (``"7"``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Sequence

from PIL import Image

from livr_model.prompts import Example


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def load_jsonl(path, image_root=None) -> List[Example]:
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
            image_paths = record["images"]
            if isinstance(image_paths, str):
                image_paths = [image_paths]
            if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
                raise ValueError(f"{where}: images must be a list of file paths; got {record['images']!r}")
            images = []
            for image_path in image_paths:
                full = root / image_path
                if not full.is_file():
                    raise ValueError(f"{where}: image {image_path!r} not found (looked for {full})")
                images.append(_load_image(full))
            try:
                examples.append(
                    Example(
                        images=images,
                        question=record["question"],
                        choices=record.get("choices") or [],
                        answer=str(record["answer"]),
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
    return load_jsonl(argument)
