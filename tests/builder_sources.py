"""Fixture sources for the livr-data builder tests, made on the spot: photo folders, a colour
ramp whose pixels say where they came from, a small COCO instances file with its images, and a
SPair-71k-like root; and the pixel reader that finds the drawn rings."""
import itertools
import json
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

from livr_model.app.data.builders.marks import MARK_COLOR

# Brightness 1.3 then contrast 1.2 keep a red of 150 below 255.
MAX_PHOTO_RED = 150


def photo_folder(root: Path, count=12, size=(240, 180), seed=0) -> Path:
    """Smooth random colour fields whose red stays low enough that no relighting makes it the
    marks' pure red."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        small = rng.integers(0, 250, (5, 6, 3)).astype(np.uint8)
        array = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)).copy()
        array[..., 0] = np.minimum(array[..., 0], MAX_PHOTO_RED)
        Image.fromarray(array).save(root / f"photo_{index:02d}.png")
    return root


def gradient_folder(root: Path, count=6, side=240) -> Path:
    """Red = x, green = y: a pixel's colour says where in the photo it came from (bilinear
    sampling of a linear ramp is exact), so a warped point can be traced back without the builder."""
    root.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(side, dtype=np.uint8)
    for index in range(count):
        array = np.zeros((side, side, 3), np.uint8)
        array[..., 0] = ramp[None, :]
        array[..., 1] = ramp[:, None]
        array[..., 2] = 20 + 10 * index
        Image.fromarray(array).save(root / f"ramp_{index}.png")
    return root


def ring_centres(image: Image.Image, color=MARK_COLOR):
    """Centres (continuous coordinates) of the connected regions of ``color`` (the rings)."""
    mask = np.all(np.asarray(image) == color, axis=-1)
    seen = np.zeros_like(mask)
    centres = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        pixels = np.array(pixels, dtype=np.float64)
        centres.append((pixels[:, 1].mean() + 0.5, pixels[:, 0].mean() + 0.5))
    return centres


COCO_CATEGORIES = [{"id": 1, "name": "dog"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "person"},
                   {"id": 4, "name": "cat"}]
# Images holding cats (two or three: never alone, so the localization objects stay as they were); the
# others have none, which is what zero-count questions ask about.
CAT_EVERY = 3
COCO_SIZE = (160, 120)


def coco_fixture(root: Path, count=30, seed=0):
    """Images with random numbers of coloured rectangles per category, and their COCO file: one
    'person' in most images (the localization objects), a crowd 'person' in image 1 and a tiny
    one in image 2 (neither countable); cats in every CAT_EVERY-th image only."""
    rng = np.random.default_rng(seed)
    # A stream of its own, so the other objects stay as they were before cats were added.
    cat_rng = np.random.default_rng(seed + 1)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        array = np.full((COCO_SIZE[1], COCO_SIZE[0], 3), 200, np.uint8)
        for category in (1, 2):
            for _ in range(int(rng.integers(1, 7))):
                w, h = int(rng.integers(12, 30)), int(rng.integers(12, 30))
                x, y = int(rng.integers(0, COCO_SIZE[0] - w)), int(rng.integers(0, COCO_SIZE[1] - h))
                array[y:y + h, x:x + w] = (40 * category, 90, 250 - 60 * category)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        if image_id > 2:
            w, h = int(rng.integers(25, 50)), int(rng.integers(25, 50))
            x, y = int(rng.integers(0, COCO_SIZE[0] - w)), int(rng.integers(0, COCO_SIZE[1] - h))
            array[y:y + h, x:x + w] = (250, 200, 40)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        if image_id % CAT_EVERY == 0:
            for _ in range(int(cat_rng.integers(2, 4))):
                w, h = int(cat_rng.integers(12, 30)), int(cat_rng.integers(12, 30))
                x, y = int(cat_rng.integers(0, COCO_SIZE[0] - w)), int(cat_rng.integers(0, COCO_SIZE[1] - h))
                array[y:y + h, x:x + w] = (120, 40, 40)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 4,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        if image_id == 1:
            annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 3,
                                "bbox": [5, 5, 60, 60], "area": 3600, "iscrowd": 1})
        if image_id == 2:
            annotations.append({"id": len(annotations) + 1, "image_id": 2, "category_id": 3,
                                "bbox": [5, 5, 2, 2], "area": 4, "iscrowd": 0})
        Image.fromarray(array).save(images_dir / f"{image_id:012d}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": COCO_SIZE[0], "height": COCO_SIZE[1]})
    path = root / "instances_fixture.json"
    data = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    path.write_text(json.dumps(data))
    return path, images_dir, data


SPAIR_SIZE = (200, 160)
SPAIR_KEYPOINTS = [(20, 20), (100, 25), (180, 20), (20, 140), (100, 135), (180, 140), (60, 80), (140, 80)]


def spair_fixture(root: Path, count=10, seed=0):
    """A SPair-71k-like root: JPEGImages/car/*.jpg and PairAnnotation/trn/*.json for every pair of
    images (as SPair pairs images within a category); keypoints jittered per image."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages" / "car").mkdir(parents=True, exist_ok=True)
    pair_dir = root / "PairAnnotation" / "trn"
    pair_dir.mkdir(parents=True, exist_ok=True)
    keypoints = {}
    for index in range(count):
        photo_folder(root / "tmp", count=1, size=SPAIR_SIZE, seed=seed + index)
        name = f"{index:04d}.jpg"
        Image.open(root / "tmp" / "photo_00.png").save(root / "JPEGImages" / "car" / name, quality=95)
        keypoints[name] = [[x + int(rng.integers(-6, 7)), y + int(rng.integers(-6, 7))] for x, y in SPAIR_KEYPOINTS]
    names = sorted(keypoints)
    for pair_id, (src, trg) in enumerate(itertools.combinations(names, 2)):
        pair = {"pair_id": pair_id, "src_imname": src, "trg_imname": trg, "category": "car",
                "src_kps": keypoints[src], "trg_kps": keypoints[trg], "kps_ids": list(range(len(SPAIR_KEYPOINTS)))}
        (pair_dir / f"{pair_id:06d}-{src[:-4]}-{trg[:-4]}:car.json").write_text(json.dumps(pair))
    return root, keypoints
