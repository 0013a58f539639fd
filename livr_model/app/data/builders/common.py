"""What every builder shares: split assignment by source image, balanced answer letters, image
loading with named errors, and the writer of BLINK-format JSONL files.

A build directory holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one object per line in
the format livr's ``load_jsonl`` reads, plus the fields ``split``, ``sources`` and ``meta``),
their images under ``images/<split>/`` (PNG, or JPEG on request; paths relative to the JSONL
files), ``splits.json`` (the split of every source image) and ``manifest.json`` (task, seed,
sizes asked and written, answer-letter counts).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image

from livr_model.prompts import LETTERS, Example

SPLITS = ("train", "val", "test")
DEFAULT_SIZE = 1000
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# Source photos are shrunk to this longer side before use: BLINK-sized images, and a 1k-question
# build of 12-megapixel photos would otherwise write gigabytes of PNG. None keeps the originals.
DEFAULT_MAX_SIDE = 1024
# How far the split fractions may sum away from 1 (they are typed by hand).
FRACTION_TOLERANCE = 1e-6
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Hex digits of the split hash read as a fraction (60 bits: far finer than any split).
HASH_DIGITS = 15
# zlib level 1: encoding at the default level took 0.3 s per 640x480 photo, 95% of a build's
# time; level 1 is several times faster for somewhat larger files. PNG stays lossless either way.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 95
IMAGE_FORMATS = {"png": {"compress_level": PNG_COMPRESS_LEVEL}, "jpg": {"quality": JPEG_QUALITY}}
MANIFEST_NAME = "manifest.json"
SPLITS_NAME = "splits.json"


class BuildError(ValueError):
    """A source the builders cannot use; the message names the file and the entry."""


@dataclass
class Built:
    """One generated question before it is written: PIL images, the question, lettered choices,
    the answer letter, the ids of the source images it was made from, and what was drawn."""

    images: list
    question: str
    choices: List[str]
    answer: str
    task: str
    sources: List[str]
    meta: dict = field(default_factory=dict)

    def validated(self) -> "Built":
        # The library's own schema check: a bad letter or empty choice fails here, not at training.
        Example(images=self.images, question=self.question, choices=self.choices, answer=self.answer, task=self.task)
        return self


def parse_fractions(text) -> Tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> train, val, test fractions (non-negative, summing to 1, train > 0)."""
    if isinstance(text, str):
        parts = [part.strip() for part in text.split(",")]
        try:
            values = tuple(float(part) for part in parts)
        except ValueError:
            raise BuildError(f"splits must be three numbers 'train,val,test' such as 0.8,0.1,0.1; got {text!r}") from None
    else:
        values = tuple(float(value) for value in text)
    if len(values) != len(SPLITS):
        raise BuildError(f"splits must give {len(SPLITS)} fractions (train,val,test); got {text!r}")
    if any(value < 0 for value in values) or abs(sum(values) - 1.0) > FRACTION_TOLERANCE:
        raise BuildError(f"splits must be non-negative fractions summing to 1; got {text!r}")
    if values[0] <= 0:
        raise BuildError(f"splits must give the train split a positive fraction; got {text!r}")
    return values


def split_sizes(size: int, fractions: Sequence[float]) -> Dict[str, int]:
    """``size`` is the number of TRAINING examples (the paper's 1k per task); val and test get the
    same ratio to train as their fractions: 1000 with 0.8,0.1,0.1 -> 1000 / 125 / 125."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise BuildError(f"size must be a positive int (training examples per task); got {size!r}")
    train = fractions[0]
    return {name: (size if name == "train" else round(size * fraction / train)) for name, fraction in zip(SPLITS, fractions)}


def split_key(image_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the image id and the seed alone."""
    digest = hashlib.sha256(f"livr-data-splits-{seed}-{image_id}".encode("utf-8")).hexdigest()
    return int(digest[:HASH_DIGITS], 16) / 16 ** HASH_DIGITS


def assign_splits(ids: Iterable[str], fractions: Sequence[float], seed: int, minimum: int = 1) -> Dict[str, str]:
    """Every source image id -> its split, so no source image is in two splits.

    An image's split depends only on its id and the seed (its ``split_key`` against the cumulative
    fractions): two tasks built from overlapping sources with the same seed put a shared image in
    the same split, so multi-task training never sees another task's test images. Only when a
    split would get fewer than ``minimum`` images (tiny sources; tasks that pair two photos of a
    split need two) are the images nearest its range moved into it from the largest split."""
    keys = {image_id: split_key(image_id, seed) for image_id in set(ids)}
    wanted = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0]
    if len(keys) < minimum * len(wanted):
        raise BuildError(f"the source has {len(keys)} usable image(s); splits {wanted} need at least "
                         f"{minimum * len(wanted)} ({minimum} each)")
    bounds, low = {}, 0.0
    for name, fraction in zip(SPLITS, fractions):
        bounds[name] = (low, low + fraction)
        low += fraction
    split_of = {}
    for image_id, key in keys.items():
        split_of[image_id] = next((name for name in wanted if key < bounds[name][1]), wanted[-1])
    for name in wanted:
        members = sorted(i for i, split in split_of.items() if split == name)
        while len(members) < minimum:
            counts = {other: sum(1 for v in split_of.values() if v == other) for other in wanted if other != name}
            donor = max(counts, key=lambda other: (counts[other], other))
            low, high = bounds[name]
            moved = min((i for i, split in split_of.items() if split == donor),
                        key=lambda i: (min(abs(keys[i] - low), abs(keys[i] - high)), i))
            split_of[moved] = name
            members.append(moved)
    return split_of


def balanced_positions(n: int, num_choices: int, rng: random.Random) -> List[int]:
    """``n`` answer positions, each of the ``num_choices`` letters used n/num_choices times (+-1), in random order."""
    positions = [index % num_choices for index in range(n)]
    rng.shuffle(positions)
    return positions


def split_rng(task: str, seed: int, split: str) -> random.Random:
    return random.Random(f"livr-data-{task}-{seed}-{split}")


def load_image(path: Path, where: str, max_side: Optional[int] = None) -> Image.Image:
    """An RGB copy of the image at ``path``, its longer side shrunk to ``max_side`` when given.
    ``where`` names the annotation entry that points at it, for the error."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"image {str(path)!r} not found ({where})")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise BuildError(f"image {str(path)!r} cannot be read ({where}): {error}") from None
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
    return image


def list_images(folder) -> List[Path]:
    """Image files under ``folder`` (recursively, sorted), by extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BuildError(f"source must be an existing image folder; {str(folder)!r} is not a directory")
    paths = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise BuildError(f"image folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def write_build(out_dir, task: str, by_split: Dict[str, Iterable[Built]], split_of: Dict[str, str],
                requested: Dict[str, int], settings: dict, image_format: str = "png") -> dict:
    """Write the JSONL files, images (``png``, lossless, or ``jpg``, a fraction of the disk space),
    ``splits.json`` and ``manifest.json``; return the manifest. ``by_split`` may hold generators:
    each question is written as it comes, so memory stays at one question's images."""
    if image_format not in IMAGE_FORMATS:
        raise BuildError(f"image_format must be one of {sorted(IMAGE_FORMATS)}; got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write(out_dir, task, by_split, split_of, requested, settings, image_format)
    except BaseException:
        # A failed build leaves the folder as empty as prepare_out_dir found or made it.
        shutil.rmtree(out_dir / "images", ignore_errors=True)
        for name in [f"{split}.jsonl{suffix}" for split in SPLITS for suffix in ("", ".partial")]:
            (out_dir / name).unlink(missing_ok=True)
        raise


def prepare_out_dir(out_dir, overwrite: bool) -> None:
    """Refuse to write into a folder that holds anything, except a previous build when
    ``overwrite`` is set (its files are removed first, so no stale image outlives it)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"out must be a folder; {str(out_dir)!r} is a file")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST_NAME).is_file():
        raise BuildError(f"out folder {str(out_dir)!r} is not empty and holds no livr-data build; choose an empty folder")
    if not overwrite:
        raise BuildError(f"out folder {str(out_dir)!r} holds a previous build; pass --overwrite to replace it")
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    for name in [f"{split}.jsonl" for split in SPLITS] + [SPLITS_NAME, MANIFEST_NAME]:
        (out_dir / name).unlink(missing_ok=True)


def _write(out_dir: Path, task: str, by_split, split_of, requested, settings, image_format) -> dict:
    written: Dict[str, int] = {}
    letters: Dict[str, Dict[str, int]] = {}
    for split in SPLITS:
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{split}.jsonl"
        partial = path.with_suffix(".jsonl.partial")
        counts: Dict[str, int] = {}
        index = 0
        with open(partial, "w", encoding="utf-8") as handle:
            for index, example in enumerate(by_split.get(split, ()), start=1):
                names = []
                for image_index, image in enumerate(example.images):
                    image_path = image_dir / f"{index - 1:06d}_{image_index}.{image_format}"
                    image.save(image_path, **IMAGE_FORMATS[image_format])
                    names.append(os.path.relpath(image_path, out_dir))
                record = {"images": names, "question": example.question, "choices": example.choices,
                          "answer": example.answer, "task": example.task, "split": split,
                          "sources": example.sources, "meta": example.meta}
                handle.write(json.dumps(record) + "\n")
                counts[example.answer] = counts.get(example.answer, 0) + 1
        # Renamed only when complete: a crashed build leaves no truncated split behind.
        os.replace(partial, path)
        written[split], letters[split] = index, dict(sorted(counts.items()))
    with open(out_dir / SPLITS_NAME, "w", encoding="utf-8") as handle:
        json.dump({"task": task, "seed": settings.get("seed"), "images": dict(sorted(split_of.items()))}, handle, indent=1)
    manifest = {
        "task": task,
        **settings,
        "requested": requested,
        "written": written,
        "source_images": {split: sum(1 for value in split_of.values() if value == split) for split in SPLITS},
        "answer_letters": letters,
    }
    with open(out_dir / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
                     "skis": "skis", "scissors": "scissors"}


def plural(name: str) -> str:
    """English plural of a category name ("bus" -> "buses", "person" -> "people")."""
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and len(name) > 1 and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def letter(position: int) -> str:
    return LETTERS[position]
