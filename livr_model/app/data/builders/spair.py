"""Semantic correspondence from SPair-71k-format keypoint annotations.

The source is a SPair-71k root (``PairAnnotation/<split>/*.json`` and
``JPEGImages/<category>/<image>``) or any folder of pair files in that format, with ``--images``
naming the folder of per-category image folders when it is not ``<root>/JPEGImages``. A pair file
holds ``src_imname``, ``trg_imname``, ``category``, ``src_kps`` and ``trg_kps`` (lists of [x, y],
the i-th source keypoint corresponding to the i-th target keypoint). SPair's own train/val/test
split is not used: splits are assigned per image like every other builder, and a pair whose two
images fall in different splits is left out.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from PIL import Image

from .common import Built, BuildError, balanced_positions, letter, load_image, plural
from .marks import draw_point, far_from, point_spacing

POINT_CHOICES = ("Point A", "Point B", "Point C", "Point D")
# Pairs share images; a few decoded images are kept to avoid re-reading them for every pair.
CACHE_IMAGES = 64
REQUIRED_KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps")


def _points(value, where: str, key: str) -> List[Tuple[float, float]]:
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            for p in value):
        raise BuildError(f"{where}: {key!r} must be a list of [x, y] keypoints; got {str(value)[:80]}")
    return [(float(p[0]), float(p[1])) for p in value]


class SpairSource:
    """Parsed, checked pair files and the images they name."""

    def __init__(self, root, images_dir=None, max_side: Optional[int] = None):
        root = Path(root)
        if not root.is_dir():
            raise BuildError(f"source must be a SPair-71k root or a folder of pair JSON files; {str(root)!r} is not a directory")
        pair_dir = root / "PairAnnotation" if (root / "PairAnnotation").is_dir() else root
        self.images_dir = Path(images_dir) if images_dir is not None else root / "JPEGImages"
        if not self.images_dir.is_dir():
            raise BuildError(f"images folder {str(self.images_dir)!r} not found: give --images, the folder holding "
                             "<category>/<image> files (SPair's JPEGImages)")
        self.max_side = max_side
        files = sorted(pair_dir.rglob("*.json"))
        if not files:
            raise BuildError(f"no pair annotation (*.json) under {str(pair_dir)!r}")
        self.pairs: List[dict] = []
        for path in files:
            try:
                with open(path, encoding="utf-8") as handle:
                    pair = json.load(handle)
            except json.JSONDecodeError as error:
                raise BuildError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
            where = str(path)
            if not isinstance(pair, dict):
                raise BuildError(f"{where}: a pair annotation must be a JSON object")
            missing = [key for key in REQUIRED_KEYS if key not in pair]
            if missing:
                raise BuildError(f"{where}: missing key(s) {missing} of a SPair-71k pair annotation")
            for key in ("src_imname", "trg_imname", "category"):
                if not isinstance(pair[key], str) or not pair[key]:
                    raise BuildError(f"{where}: {key!r} must be a non-empty string; got {pair[key]!r}")
            src, trg = _points(pair["src_kps"], where, "src_kps"), _points(pair["trg_kps"], where, "trg_kps")
            if len(src) != len(trg):
                raise BuildError(f"{where}: 'src_kps' has {len(src)} keypoints but 'trg_kps' has {len(trg)}; they must pair up")
            category = pair["category"]
            self.pairs.append({"file": where, "category": category, "src": f"{category}/{pair['src_imname']}",
                               "trg": f"{category}/{pair['trg_imname']}", "src_kps": src, "trg_kps": trg})

    def image_ids(self) -> List[str]:
        return sorted({pair[key] for pair in self.pairs for key in ("src", "trg")})

    def load(self, image_id: str, pair: dict) -> Tuple:
        """The image and the factor its keypoints must be multiplied by (after ``max_side``)."""
        path = self.images_dir / image_id
        image = load_image(path, f"named by {pair['file']}", self.max_side)
        if self.max_side is None:
            return image, 1.0
        with Image.open(path) as original:
            return image, image.width / original.width


def _inside_image(point, size) -> bool:
    return 0 <= point[0] < size[0] and 0 <= point[1] < size[1]


def _choose(pair: dict, sizes, scales, rng: random.Random) -> Optional[Tuple[int, List[int]]]:
    """A keypoint index k and three other target keypoints spaced from target k and each other."""
    src = [(x * scales[0], y * scales[0]) for x, y in pair["src_kps"]]
    trg = [(x * scales[1], y * scales[1]) for x, y in pair["trg_kps"]]
    valid = [k for k in range(len(src)) if _inside_image(src[k], sizes[0]) and _inside_image(trg[k], sizes[1])]
    spacing = point_spacing(sizes[1])
    rng.shuffle(valid)
    for k in valid:
        chosen: List[Tuple[float, float]] = [trg[k]]
        others = []
        for j in rng.sample(valid, len(valid)):
            if j != k and far_from(trg[j], chosen, spacing):
                chosen.append(trg[j])
                others.append(j)
                if len(others) == len(POINT_CHOICES) - 1:
                    return k, others
    return None


def build_semantic_correspondence(source: SpairSource, image_ids: List[str], n: int, rng: random.Random,
                                  task: str) -> Iterator[Built]:
    allowed = set(image_ids)
    pool = [pair for pair in source.pairs if pair["src"] in allowed and pair["trg"] in allowed]
    if not pool:
        return
    order: List[dict] = []
    while len(order) < n:
        batch = list(pool)
        rng.shuffle(batch)
        order.extend(batch)
    cache: Dict[str, Tuple] = {}
    for pair, position in zip(order[:n], balanced_positions(n, len(POINT_CHOICES), rng)):
        loaded = []
        for key in ("src", "trg"):
            if pair[key] not in cache:
                if len(cache) >= CACHE_IMAGES:
                    cache.clear()
                cache[pair[key]] = source.load(pair[key], pair)
            loaded.append(cache[pair[key]])
        (first, src_scale), (second, trg_scale) = loaded
        choice = _choose(pair, (first.size, second.size), (src_scale, trg_scale), rng)
        if choice is None:
            continue
        k, others = choice
        indices = others[:position] + [k] + others[position:]
        reference = (pair["src_kps"][k][0] * src_scale, pair["src_kps"][k][1] * src_scale)
        points = [(pair["trg_kps"][j][0] * trg_scale, pair["trg_kps"][j][1] * trg_scale) for j in indices]
        first, second = first.copy(), second.copy()
        draw_point(first, reference, "REF")
        for index, point in enumerate(points):
            draw_point(second, point, letter(index))
        name = plural(pair["category"])
        question = (f"The two images show different {name}. A point on the object in the first image is circled and "
                    "labelled REF; four points on the object in the second image are circled and labelled A, B, C "
                    "and D. Which of them marks the same part of the object as REF (the same ear tip, wheel or "
                    "corner, say)?")
        meta = {"pair_file": pair["file"], "keypoint": k, "candidate_keypoints": indices,
                "reference": [round(v, 3) for v in reference], "points": [[round(v, 3) for v in p] for p in points]}
        yield Built([first, second], question, list(POINT_CHOICES), letter(position), task,
                    [pair["src"], pair["trg"]], meta).validated()
