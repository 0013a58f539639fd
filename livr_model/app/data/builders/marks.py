"""Visual prompts drawn on images as BLINK draws them (red circles with letter labels, labelled
boxes) and the geometry the builders need (homographies, box overlap).

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), so its
centre is (i + 0.5, j + 0.5). PIL's PERSPECTIVE transform samples output pixel centres the same
way, which is what lets a warped point land within a pixel of ``apply_homography``'s answer.
"""
from __future__ import annotations

import math
import random
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

# The ring is drawn in a colour of its own and the label on a darker red box, so the two never mix.
MARK_COLOR = (255, 0, 0)
LABEL_FILL = (190, 0, 0)
LABEL_TEXT = (255, 255, 255)
RADIUS_FRACTION = 0.02
MIN_RADIUS = 5
RING_WIDTH_DIVISOR = 3
FONT_PER_RADIUS = 1.6
MIN_FONT = 10
LABEL_PADDING = 2
# The labels of the candidate points on the second image.
POINT_LABELS = ("A", "B", "C", "D")
BOX_WIDTH_FRACTION = 0.006
MIN_BOX_WIDTH = 2
# A random homography shifts the whole view by up to HOMOGRAPHY_SHIFT of the image side and moves
# each corner by up to HOMOGRAPHY_JITTER more (perspective, rotation, scale).
HOMOGRAPHY_SHIFT = 0.2
HOMOGRAPHY_JITTER = 0.15
BRIGHTNESS_RANGE = (0.7, 1.3)
CONTRAST_RANGE = (0.8, 1.2)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def marker_radius(size: Tuple[int, int]) -> int:
    return max(MIN_RADIUS, round(min(size) * RADIUS_FRACTION))


def _ring_width(radius: int) -> int:
    return max(2, radius // RING_WIDTH_DIVISOR)


def _point_font(size: Tuple[int, int]):
    return _font(max(MIN_FONT, round(marker_radius(size) * FONT_PER_RADIUS)))


def _label_size(text: str, font) -> Tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left + 2 * LABEL_PADDING, bottom - top + 2 * LABEL_PADDING


def point_spacing(size: Tuple[int, int], labels: Sequence[str] = POINT_LABELS) -> int:
    """The distance marked points keep from each other so that no label (one of ``labels``)
    covers another point's ring: the reach of the farthest label corner plus a ring."""
    radius = marker_radius(size)
    width = _ring_width(radius)
    gap = radius + width + LABEL_PADDING
    font = _point_font(size)
    label_w = max(_label_size(text, font)[0] for text in labels)
    label_h = max(_label_size(text, font)[1] for text in labels)
    return math.ceil(math.hypot(gap + label_w, gap + label_h) + radius + width + LABEL_PADDING)


def point_margin(size: Tuple[int, int]) -> int:
    """The distance a marked point keeps from the border so its whole ring is visible."""
    return 2 * marker_radius(size)


def _label_rect(anchor: Tuple[float, float], text: str, font, bounds: Tuple[int, int],
                prefer_left: bool = False) -> Tuple[Tuple[int, int, int, int], Tuple[int, int]]:
    """Where a label goes: its box (inclusive pixels, nearest corner at ``anchor``, above it when
    there is room, kept inside the image) and the text origin."""
    left, top, _, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    width, height = _label_size(text, font)
    x, y = anchor
    x0 = x - width if prefer_left or x + width > bounds[0] else x
    y0 = y - height if y - height >= 0 else y
    x0 = int(min(max(0, x0), bounds[0] - width))
    y0 = int(y0)
    return (x0, y0, x0 + width - 1, y0 + height - 1), (x0 + LABEL_PADDING - left, y0 + LABEL_PADDING - top)


def _label(draw: ImageDraw.ImageDraw, anchor: Tuple[float, float], text: str, font, bounds: Tuple[int, int],
           prefer_left: bool = False) -> None:
    """A white label on a dark red box whose nearest corner sits at ``anchor``."""
    rect, origin = _label_rect(anchor, text, font, bounds, prefer_left)
    draw.rectangle(rect, fill=LABEL_FILL)
    draw.text(origin, text, fill=LABEL_TEXT, font=font)


def _box_font(size: Tuple[int, int]):
    return _point_font(size)


def _box_rect(box: Sequence[float]) -> Tuple[int, int, int, int]:
    x, y, w, h = box
    return round(x), round(y), round(x + w) - 1, round(y + h) - 1


def box_label_rect(size: Tuple[int, int], box: Sequence[float], label: str) -> Tuple[int, int, int, int]:
    """The pixel rectangle ``draw_box`` gives ``label`` for ``box`` on an image of ``size``."""
    rect = _box_rect(box)
    return _label_rect((rect[0], rect[1]), label, _box_font(size), size)[0]


def rects_overlap(a: Sequence[int], b: Sequence[int], gap: int = LABEL_PADDING) -> bool:
    """Whether two inclusive pixel rectangles come closer than ``gap`` pixels."""
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def draw_point(image: Image.Image, point: Sequence[float], label: str) -> None:
    """A red ring centred on ``point`` (continuous coordinates) and ``label`` beside it, up-right
    (up-left near the right border), kept clear of the ring."""
    draw = ImageDraw.Draw(image)
    radius = marker_radius(image.size)
    width = _ring_width(radius)
    # Centred on the pixel holding the point: the ring's centre is within half a pixel of it per axis.
    x, y = math.floor(point[0]), math.floor(point[1])
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=MARK_COLOR, width=width)
    gap = radius + width + LABEL_PADDING
    font = _point_font(image.size)
    near_right = x + gap + _label_size(label, font)[0] > image.width
    _label(draw, (x - gap if near_right else x + gap, y - gap), label, font, image.size, prefer_left=near_right)


def draw_box(image: Image.Image, box: Sequence[float], label: str) -> Tuple[int, int, int, int]:
    """The outline of ``box`` = (x, y, width, height), COCO style, with ``label`` at its top-left
    corner; returns the outline's pixel rectangle (inclusive)."""
    draw = ImageDraw.Draw(image)
    rect = _box_rect(box)
    width = max(MIN_BOX_WIDTH, round(min(image.size) * BOX_WIDTH_FRACTION))
    draw.rectangle(rect, outline=MARK_COLOR, width=width)
    _label(draw, (rect[0], rect[1]), label, _box_font(image.size), image.size)
    return rect


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def homographies_from_points(src: Sequence[Sequence[float]], dst: np.ndarray) -> np.ndarray:
    """The (N, 3, 3) matrices H (H[2, 2] = 1) mapping the four ``src`` points onto each of the N
    sets of four ``dst`` points, shape (N, 4, 2)."""
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 4, 2)
    count = len(dst)
    system = np.zeros((count, 8, 8))
    for index, (x, y) in enumerate(src):
        u, v = dst[:, index, 0], dst[:, index, 1]
        system[:, 2 * index, :3] = (x, y, 1)
        system[:, 2 * index, 6], system[:, 2 * index, 7] = -u * x, -u * y
        system[:, 2 * index + 1, 3:6] = (x, y, 1)
        system[:, 2 * index + 1, 6], system[:, 2 * index + 1, 7] = -v * x, -v * y
    solution = np.linalg.solve(system, dst.reshape(count, 8, 1))[..., 0]
    return np.concatenate([solution, np.ones((count, 1))], axis=1).reshape(count, 3, 3)


def apply_homography(matrix: np.ndarray, points) -> np.ndarray:
    """Map (N, 2) continuous points through ``matrix``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(matrix, dtype=np.float64).T
    return mapped[:, :2] / mapped[:, 2:3]


def random_homographies(size: Tuple[int, int], count: int, generator: np.random.Generator,
                        shift: float = HOMOGRAPHY_SHIFT, jitter: float = HOMOGRAPHY_JITTER) -> np.ndarray:
    """``count`` random view changes, (count, 3, 3): each view shifts by up to ``shift`` of the
    image side, and each of its corners moves by up to ``jitter`` more."""
    width, height = size
    scale = np.array([width, height], dtype=np.float64)
    corners = np.array([(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)])
    offsets = generator.uniform(-shift, shift, (count, 1, 2)) + generator.uniform(-jitter, jitter, (count, 4, 2))
    return homographies_from_points(corners, corners[None] + offsets * scale)


def warp(image: Image.Image, matrix: np.ndarray) -> Image.Image:
    """``image`` seen through ``matrix`` (source -> output), same size, black where nothing maps."""
    inverse = np.linalg.inv(matrix)
    inverse = inverse / inverse[2, 2]
    return image.transform(image.size, Image.Transform.PERSPECTIVE, tuple(inverse.flatten()[:8]),
                           resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def relight(image: Image.Image, rng: random.Random) -> Tuple[Image.Image, dict]:
    """A lighting change: random brightness and contrast factors (returned for the record)."""
    brightness = rng.uniform(*BRIGHTNESS_RANGE)
    contrast = rng.uniform(*CONTRAST_RANGE)
    image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(brightness)).enhance(contrast)
    return image, {"brightness": round(brightness, 4), "contrast": round(contrast, 4)}


def far_from(point: Sequence[float], others: List[Sequence[float]], distance: float) -> bool:
    return all((point[0] - o[0]) ** 2 + (point[1] - o[1]) ** 2 >= distance ** 2 for o in others)
