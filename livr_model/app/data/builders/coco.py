"""Counting and object localization from COCO-format instance annotations
(``instances_*.json`` with ``images``, ``annotations``, ``categories``, and a folder of images).

Counting asks how many instances of a category an image holds; the answer is the number of
annotated instances. Image-category pairs with a crowd annotation or a tiny instance are skipped
(their true count is not what a viewer can check). A share of the questions ask about a category
the image does not hold (answer 0): without them "never zero" is a rule a model learns from the
text alone. Their categories are drawn as often as each category is counted elsewhere, so a
category's name does not tell whether it is absent, and their images are images with at least one
annotation (an image with none may be one nobody annotated). Object localization draws the annotated box of
an object whose category appears once in the image and a perturbed box, labelled A and B, and asks
which one localizes the object.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .common import Built, BuildError, balanced_positions, letter, load_image, plural
from .marks import box_iou, box_label_rect, draw_box, rects_overlap

COUNT_CHOICES = 4
MAX_COUNT = 10
# Questions whose answer is 0 (absent category). Answer 0 always sits at letter A, so this is half
# the A questions. Options 0-3 are also those of a count c at letter c; with this share the answer 0
# is about a quarter of the questions offering 0-3 (8 of 31 in the test fixture's builds), so
# neither "never 0" nor "0 when offered" is a text-only rule.
ZERO_COUNT_FRACTION = 1 / 8
# Random (category, image) draws tried for each absent-category question before giving it up.
ZERO_DRAW_TRIES = 100
# Instances smaller than this fraction of the image are too small to count reliably by eye.
MIN_COUNT_AREA_FRACTION = 0.001
# Objects to localize cover between these fractions of the image.
LOCALIZATION_AREA_RANGE = (0.01, 0.6)
# The wrong box overlaps the object (IoU at least the first) but clearly worse (below the second).
DISTRACTOR_IOU_RANGE = (0.1, 0.5)
DISTRACTOR_SHIFT_RANGE = (0.2, 0.7)
DISTRACTOR_SCALE_RANGE = (0.6, 1.5)
DISTRACTOR_TRIES = 200
BOX_CHOICES = ("Box A", "Box B")


@dataclass
class _Instance:
    index: int  # position in the file's "annotations" list, for error messages
    category: int
    bbox: Tuple[float, float, float, float]
    crowd: bool


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise BuildError(f"{where}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CocoSource:
    """A parsed, checked COCO instances file and its image folder."""

    def __init__(self, annotations, images_dir, max_side: Optional[int] = None):
        self.path = Path(annotations)
        if not self.path.is_file():
            raise BuildError(f"annotations must be an existing COCO instances JSON file; {str(self.path)!r} does not exist")
        if images_dir is None:
            raise BuildError("COCO builders need --images, the folder holding the annotated images' file_name paths")
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise BuildError(f"images must be an existing folder; {str(self.images_dir)!r} is not a directory")
        self.max_side = max_side
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise BuildError(f"{self.path}:{error.lineno}: not valid JSON ({error.msg})") from None
        _require(isinstance(data, dict), str(self.path), "must hold a JSON object with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            _require(isinstance(data.get(key), list), str(self.path), f"missing the list {key!r} of a COCO instances file")
        self.categories: Dict[int, str] = {}
        for index, category in enumerate(data["categories"]):
            where = f"{self.path}: categories[{index}]"
            _require(isinstance(category, dict) and isinstance(category.get("id"), int)
                     and isinstance(category.get("name"), str) and category["name"].strip(),
                     where, f"needs an int 'id' and a non-empty 'name'; got {category!r}")
            self.categories[category["id"]] = category["name"].strip()
        self.images: Dict[int, dict] = {}
        for index, image in enumerate(data["images"]):
            where = f"{self.path}: images[{index}]"
            _require(isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str),
                     where, f"needs an int 'id' and a 'file_name'; got {image!r}")
            _require(all(_is_number(image.get(key)) and image[key] > 0 for key in ("width", "height")),
                     where, f"needs positive 'width' and 'height'; got {image!r}")
            self.images[image["id"]] = dict(image, index=index)
        self.instances: Dict[int, List[_Instance]] = {}
        for index, annotation in enumerate(data["annotations"]):
            where = f"{self.path}: annotations[{index}] (id {annotation.get('id') if isinstance(annotation, dict) else '?'})"
            _require(isinstance(annotation, dict), where, "must be an object")
            _require(annotation.get("image_id") in self.images, where, f"image_id {annotation.get('image_id')!r} is not in 'images'")
            _require(annotation.get("category_id") in self.categories, where,
                     f"category_id {annotation.get('category_id')!r} is not in 'categories'")
            bbox = annotation.get("bbox")
            _require(isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox) and bbox[2] > 0 and bbox[3] > 0,
                     where, f"bbox must be [x, y, width, height] with a positive width and height; got {bbox!r}")
            self.instances.setdefault(annotation["image_id"], []).append(
                _Instance(index, annotation["category_id"], tuple(float(v) for v in bbox), bool(annotation.get("iscrowd", 0))))

    def load(self, image_id: int):
        """The image and the factor its annotations' coordinates must be multiplied by."""
        entry = self.images[image_id]
        where = f"images[{entry['index']}] id {image_id} in {self.path}"
        image = load_image(self.images_dir / entry["file_name"], where, self.max_side)
        return image, image.width / entry["width"]

    def counting_units(self) -> List[Tuple[int, int, int]]:
        """(image id, category id, count) for every countable pair."""
        units = []
        for image_id, instances in sorted(self.instances.items()):
            entry = self.images[image_id]
            min_area = MIN_COUNT_AREA_FRACTION * entry["width"] * entry["height"]
            by_category: Dict[int, List[_Instance]] = {}
            for instance in instances:
                by_category.setdefault(instance.category, []).append(instance)
            for category, group in sorted(by_category.items()):
                if len(group) > MAX_COUNT or any(i.crowd or i.bbox[2] * i.bbox[3] < min_area for i in group):
                    continue
                units.append((image_id, category, len(group)))
        return units

    def present_categories(self, image_id: int) -> set:
        """Categories with any annotation (crowd and tiny ones included) in the image."""
        return {instance.category for instance in self.instances.get(image_id, ())}

    def localization_units(self) -> List[Tuple[int, _Instance]]:
        """(image id, instance) for objects alone of their category in their image, of a visible size."""
        units = []
        low, high = LOCALIZATION_AREA_RANGE
        for image_id, instances in sorted(self.instances.items()):
            entry = self.images[image_id]
            area = entry["width"] * entry["height"]
            for instance in instances:
                same = [other for other in instances if other.category == instance.category]
                if len(same) == 1 and not instance.crowd and low * area <= instance.bbox[2] * instance.bbox[3] <= high * area:
                    units.append((image_id, instance))
        return units


def counting_choices(count: int, position: int) -> List[str]:
    """Four consecutive counts, ascending, with ``count`` at ``position`` (needs count >= position)."""
    start = count - position
    return [str(start + offset) for offset in range(COUNT_CHOICES)]


def zero_count_pairs(source: CocoSource, image_ids: Sequence[int], weights: Counter, n: int,
                     rng: random.Random) -> List[Tuple[int, int]]:
    """Up to ``n`` distinct (image id, category) pairs whose category has no annotation in the image.
    Images come from ``image_ids`` that have annotations; categories are drawn in proportion to ``weights``."""
    images = sorted(i for i in image_ids if i in source.instances)
    categories = sorted(weights)
    if not images or not categories:
        return []
    chosen: List[Tuple[int, int]] = []
    taken = set()
    for _ in range(n):
        for _ in range(ZERO_DRAW_TRIES):
            category = rng.choices(categories, weights=[weights[c] for c in categories])[0]
            pair = (rng.choice(images), category)
            if pair not in taken and category not in source.present_categories(pair[0]):
                taken.add(pair)
                chosen.append(pair)
                break
    return chosen


def build_counting(source: CocoSource, image_ids: List[str], n: int, rng: random.Random, task: str) -> Iterator[Built]:
    """Up to ``n`` counting questions on the given images; answer letters balanced. Options are
    consecutive and ascending, so a count c can sit at positions 0..min(c, 3): each position is
    filled from the shuffled pool with the first pair whose count allows it. ``ZERO_COUNT_FRACTION``
    of the questions (rounded) ask about an absent category; their answer, 0, takes A slots."""
    allowed = {int(i) for i in image_ids}
    pool = [unit for unit in source.counting_units() if unit[0] in allowed]
    rng.shuffle(pool)
    weights = Counter(category for _, category, _ in pool)
    zeros = zero_count_pairs(source, sorted(allowed), weights, round(ZERO_COUNT_FRACTION * n), rng)
    for position in balanced_positions(min(n, len(pool) + len(zeros)), COUNT_CHOICES, rng):
        if position == 0 and zeros:
            image_id, category = zeros.pop()
            count = 0
        else:
            pick = next((k for k, unit in enumerate(pool) if unit[2] >= position), None)
            if pick is None:
                continue
            image_id, category, count = pool.pop(pick)
        image, _ = source.load(image_id)
        name = source.categories[category]
        question = f"How many {plural(name)} are in the image?"
        meta = {"image_id": image_id, "category_id": category, "category": name, "count": count}
        yield Built([image], question, counting_choices(count, position), letter(position), task,
                    [str(image_id)], meta).validated()


def _distractor_box(bbox, size, rng: random.Random, labels: Tuple[str, str]) -> Optional[Tuple[float, float, float, float]]:
    """A box shifted and rescaled from ``bbox``, inside the image, overlapping it only partly, whose
    label (``labels[1]``) stays clear of the true box's (``labels[0]``)."""
    x, y, w, h = bbox
    low, high = DISTRACTOR_IOU_RANGE
    true_label = box_label_rect(size, bbox, labels[0])
    for _ in range(DISTRACTOR_TRIES):
        nw, nh = w * rng.uniform(*DISTRACTOR_SCALE_RANGE), h * rng.uniform(*DISTRACTOR_SCALE_RANGE)
        nx = x + rng.choice((-1, 1)) * rng.uniform(*DISTRACTOR_SHIFT_RANGE) * w
        ny = y + rng.choice((-1, 1)) * rng.uniform(*DISTRACTOR_SHIFT_RANGE) * h
        nx, ny = min(max(0.0, nx), size[0] - nw), min(max(0.0, ny), size[1] - nh)
        candidate = (nx, ny, nw, nh)
        if (nx >= 0 and ny >= 0 and low <= box_iou(candidate, bbox) < high
                and not rects_overlap(true_label, box_label_rect(size, candidate, labels[1]))):
            return candidate
    return None


def build_localization(source: CocoSource, image_ids: List[str], n: int, rng: random.Random, task: str) -> Iterator[Built]:
    """Up to ``n`` two-box localization questions; the true box is A or B in balanced proportion."""
    allowed = {int(i) for i in image_ids}
    pool = [unit for unit in source.localization_units() if unit[0] in allowed]
    rng.shuffle(pool)
    positions = balanced_positions(min(n, len(pool)), len(BOX_CHOICES), rng)
    for (image_id, instance), position in zip(pool, positions):
        image, scale = source.load(image_id)
        truth = tuple(v * scale for v in instance.bbox)
        wrong = _distractor_box(truth, image.size, rng, (letter(position), letter(1 - position)))
        if wrong is None:
            continue
        boxes = [truth, wrong] if position == 0 else [wrong, truth]
        for index, box in enumerate(boxes):
            draw_box(image, box, letter(index))
        name = source.categories[instance.category]
        question = (f"Two boxes, labelled A and B, are drawn on the image. A good bounding box encloses the whole "
                    f"object and touches its outermost pixels. Which box localizes the {name} more accurately?")
        meta = {"image_id": image_id, "annotation_index": instance.index, "category": name,
                "boxes": [[round(v, 3) for v in box] for box in boxes], "iou_wrong": round(box_iou(wrong, truth), 4)}
        yield Built([image], question, list(BOX_CHOICES), letter(position), task, [str(image_id)], meta).validated()


def usable_image_ids(source: CocoSource, kind: str) -> List[str]:
    units = source.counting_units() if kind == "counting" else source.localization_units()
    return sorted({str(unit[0]) for unit in units})
