"""Jigsaw, visual correspondence and visual similarity from any folder of images.

- Jigsaw: the first image is a photo with its lower-right corner blanked; the candidates are the
  cut-out corner and the same corner of another photo of the same split.
- Visual correspondence: the second image is the photo under a random homography (a camera
  move) and a lighting change. A point is circled on the first image (REF); four circled points
  on the second are labelled A-D, one of them where the homography sends the reference point.
- Visual similarity: the reference photo and two augmented photos (random crop, flip, colour
  change); one of them was made from the reference.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageEnhance

from .common import Built, BuildError, balanced_positions, letter, list_images, load_image
from .marks import draw_point, point_margin, point_spacing, random_homographies, relight, warp

# Photos smaller than this (either side) are skipped: marks and pieces would not fit.
MIN_SOURCE_SIDE = 64
PIECE_FRACTION = 1 / 3
HOLE_COLOR = (255, 255, 255)
CANDIDATE_CHOICES = ("the second image", "the third image")
POINT_CHOICES = ("Point A", "Point B", "Point C", "Point D")
# Visual correspondence keeps the most textured of this many acceptable draws of its four points,
# trying up to POINT_TRIES draws, DRAW_BATCH at a time.
TEXTURE_CANDIDATES = 16
POINT_TRIES = 8192
DRAW_BATCH = 512
CROP_AREA_RANGE = (0.5, 0.9)
FLIP_PROBABILITY = 0.5
SATURATION_RANGE = (0.6, 1.4)
AUG_BRIGHTNESS_RANGE = (0.75, 1.25)
AUG_CONTRAST_RANGE = (0.75, 1.25)


class ImageFolderSource:
    """Every readable image under a folder, identified by its path relative to the folder."""

    def __init__(self, folder, max_side: Optional[int] = None):
        self.folder = Path(folder)
        self.max_side = max_side
        self.paths = {}
        self.skipped_small = []
        for path in list_images(self.folder):
            name = path.relative_to(self.folder).as_posix()
            try:
                with Image.open(path) as image:
                    size = image.size
            except OSError as error:
                raise BuildError(f"image {str(path)!r} cannot be read: {error}") from None
            if min(size) < MIN_SOURCE_SIDE:
                self.skipped_small.append(name)
                continue
            self.paths[name] = path
        if not self.paths:
            raise BuildError(f"image folder {str(self.folder)!r} holds no image of at least {MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE} pixels")

    def image_ids(self) -> List[str]:
        return sorted(self.paths)

    def load(self, name: str) -> Image.Image:
        return load_image(self.paths[name], f"image folder {self.folder}", self.max_side)


def _cycle(image_ids: List[str], n: int, rng: random.Random) -> List[str]:
    """``n`` image ids: each image once per round, rounds shuffled independently."""
    order: List[str] = []
    while len(order) < n:
        round_ids = list(image_ids)
        rng.shuffle(round_ids)
        order.extend(round_ids)
    return order[:n]


def _other(image_ids: List[str], name: str, rng: random.Random, task: str) -> str:
    others = [other for other in image_ids if other != name]
    if not others:
        raise BuildError(f"{task} needs at least two source images in every split; a split holds only {name!r}")
    return rng.choice(others)


def piece_box(size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """The lower-right corner cut from a ``size`` image: (left, top, right, bottom)."""
    width, height = size
    return width - round(width * PIECE_FRACTION), height - round(height * PIECE_FRACTION), width, height


def _corner_of(photo: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """The lower-right ``size`` corner of another photo: cut without resampling when the photo is
    large enough, so sharpness does not tell the true piece from the wrong one."""
    width, height = size
    if photo.width < width or photo.height < height:
        photo = photo.resize((max(photo.width, width), max(photo.height, height)), Image.Resampling.BICUBIC)
    return photo.crop((photo.width - width, photo.height - height, photo.width, photo.height))


def build_jigsaw(source: ImageFolderSource, image_ids: List[str], n: int, rng: random.Random, task: str) -> Iterator[Built]:
    for name, position in zip(_cycle(image_ids, n, rng), balanced_positions(n, len(CANDIDATE_CHOICES), rng)):
        other = _other(image_ids, name, rng, task)
        photo = source.load(name)
        box = piece_box(photo.size)
        true_piece = photo.crop(box)
        wrong_piece = _corner_of(source.load(other), true_piece.size)
        puzzle = photo.copy()
        puzzle.paste(HOLE_COLOR, box)
        pieces = [true_piece, wrong_piece] if position == 0 else [wrong_piece, true_piece]
        question = ("The first image is missing its lower-right corner. Which of the second and third images is the "
                    "missing piece? Picture each one in the gap and compare the edges it would meet.")
        meta = {"piece_box": list(box), "distractor_source": other}
        yield Built([puzzle] + pieces, question, list(CANDIDATE_CHOICES), letter(position), task,
                    [name, other], meta).validated()


def _texture(gray: np.ndarray, point, radius: int) -> float:
    x, y = int(point[0]), int(point[1])
    window = gray[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
    return float(window.std()) if window.size else 0.0


def _views(photo: Image.Image, position: int, rng: random.Random):
    """The reference point, the true view and the four marked points. Each draw takes a random
    point and four random homographies sending it to four places; the one at ``position`` becomes
    the real warp, so the answer is placed exactly like the decoys (nearness to REF's position
    gives nothing away). A draw is kept when every point stays in the frame, apart from the
    others, and on photo content whichever view were the real one (a condition that treats the
    four alike). Of a few kept draws, the one whose four points sit on the most texture wins (flat
    sky is ambiguous), again alike for answer and decoys. Returns (reference, matrix, points) or None."""
    size = photo.size
    margin, spacing = point_margin(size), point_spacing(size)
    gray = np.asarray(photo.convert("L"), dtype=np.float64)
    generator = np.random.default_rng(rng.getrandbits(64))
    count = len(POINT_CHOICES)
    draws = []
    for _ in range(POINT_TRIES // DRAW_BATCH):
        references = generator.uniform((margin, margin), (size[0] - margin, size[1] - margin), (DRAW_BATCH, 2))
        matrices = random_homographies(size, DRAW_BATCH * count, generator).reshape(DRAW_BATCH, count, 3, 3)
        homogeneous = np.concatenate([references, np.ones((DRAW_BATCH, 1))], axis=1)
        mapped = np.einsum("bkij,bj->bki", matrices, homogeneous)
        points = mapped[..., :2] / mapped[..., 2:]  # (B, 4, 2)
        # sources[b, i, j]: where point j comes from if view i is the real one.
        inverses = np.linalg.inv(matrices)
        lifted = np.concatenate([points, np.ones((DRAW_BATCH, count, 1))], axis=-1)
        back = np.einsum("bkij,bnj->bkni", inverses, lifted)
        sources = back[..., :2] / back[..., 2:]
        low, high = np.array([margin, margin]), np.array(size) - margin
        in_frame = np.all((points >= low) & (points <= high), axis=(1, 2))
        on_content = np.all((sources >= low) & (sources <= high), axis=(1, 2, 3))
        gaps = np.linalg.norm(points[:, :, None] - points[:, None], axis=-1) + np.eye(count) * spacing
        spaced = np.all(gaps >= spacing, axis=(1, 2))
        for index in np.nonzero(in_frame & on_content & spaced)[0]:
            texture = min(_texture(gray, source, spacing // 4) for source in sources[index, position])
            draws.append((texture, index, references[index], matrices[index, position], points[index]))
            if len(draws) == TEXTURE_CANDIDATES:
                break
        if len(draws) == TEXTURE_CANDIDATES:
            break
    if not draws:
        return None
    _, _, reference, matrix, points = max(draws, key=lambda draw: draw[:2])
    return tuple(float(v) for v in reference), matrix, [tuple(float(v) for v in p) for p in points]


def build_visual_correspondence(source: ImageFolderSource, image_ids: List[str], n: int, rng: random.Random, task: str,
                                lighting: bool = True) -> Iterator[Built]:
    view = "from another camera position and under other lighting" if lighting else "from another camera position"
    question = (f"A point is circled on the first image and labelled REF. The second image shows the same scene {view}; "
                "four points on it are circled and labelled A, B, C and D. Which of them is the same scene point as REF?")
    for name, position in zip(_cycle(image_ids, n, rng), balanced_positions(n, len(POINT_CHOICES), rng)):
        photo = source.load(name)
        views = _views(photo, position, rng)
        if views is None:
            raise BuildError(f"could not place {len(POINT_CHOICES)} separated points on {name!r} "
                             f"({photo.width}x{photo.height}); use larger images")
        reference, matrix, points = views
        second = warp(photo, matrix)
        light = {}
        if lighting:
            second, light = relight(second, rng)
        first = photo.copy()
        draw_point(first, reference, "REF")
        for index, point in enumerate(points):
            draw_point(second, point, letter(index))
        meta = {"homography": [[round(v, 9) for v in row] for row in matrix.tolist()],
                "reference": [round(v, 3) for v in reference], "points": [[round(v, 3) for v in p] for p in points],
                "lighting": light}
        yield Built([first, second], question, list(POINT_CHOICES), letter(position), task, [name], meta).validated()


def random_augmentation(size: Tuple[int, int], rng: random.Random) -> dict:
    """Parameters of one augmentation of a ``size`` image: crop box, flip, colour factors."""
    width, height = size
    scale = rng.uniform(*CROP_AREA_RANGE) ** 0.5
    crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    return {"crop": [left, top, left + crop_w, top + crop_h], "flip": rng.random() < FLIP_PROBABILITY,
            "brightness": round(rng.uniform(*AUG_BRIGHTNESS_RANGE), 4), "contrast": round(rng.uniform(*AUG_CONTRAST_RANGE), 4),
            "saturation": round(rng.uniform(*SATURATION_RANGE), 4)}


def augment(image: Image.Image, params: dict, out_size: Tuple[int, int]) -> Image.Image:
    """Apply ``random_augmentation`` parameters, then resize to ``out_size``."""
    result = image.crop(tuple(params["crop"]))
    if params["flip"]:
        result = result.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    result = ImageEnhance.Brightness(result).enhance(params["brightness"])
    result = ImageEnhance.Contrast(result).enhance(params["contrast"])
    result = ImageEnhance.Color(result).enhance(params["saturation"])
    return result.resize(out_size, Image.Resampling.BICUBIC)


def build_visual_similarity(source: ImageFolderSource, image_ids: List[str], n: int, rng: random.Random, task: str) -> Iterator[Built]:
    for name, position in zip(_cycle(image_ids, n, rng), balanced_positions(n, len(CANDIDATE_CHOICES), rng)):
        other = _other(image_ids, name, rng, task)
        reference = source.load(name)
        other_photo = source.load(other)
        params = [random_augmentation(reference.size, rng), random_augmentation(other_photo.size, rng)]
        same = augment(reference, params[0], reference.size)
        different = augment(other_photo, params[1], reference.size)
        candidates = [same, different] if position == 0 else [different, same]
        question = ("The second and third images were each made from a photo by cropping it, perhaps mirroring it, "
                    "and changing its colours. Which of them was made from the first image?")
        meta = {"augmentations": params if position == 0 else params[::-1],
                "candidate_sources": [name, other] if position == 0 else [other, name]}
        yield Built([reference] + candidates, question, list(CANDIDATE_CHOICES), letter(position), task,
                    [name, other], meta).validated()
