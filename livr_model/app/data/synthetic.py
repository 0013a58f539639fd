"""Built-in synthetic visual tasks, drawn offline with PIL from a fixed seed.

Flat colours on a 4x4 grid of cells (one image token per cell with the tiny processor) and no
anti-aliasing, so their answers can be re-derived from the pixels; each example keeps what its
generator drew in ``meta``.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw

from livr_model.prompts import LETTERS, Example

# Synthetic tasks. Every object fills cells of a GRID x GRID layout: with the tiny processor a cell
# is exactly one image token, so equal objects give equal features wherever they sit (a random
# frozen vision tower then still separates them cleanly). Flat colours, no anti-aliasing: a pixel's
# colour names what was drawn there, which is how the tests re-derive every answer.
BACKGROUND = (255, 255, 255)
MARKERS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
REFERENCE_MARKER = "black"
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
    "orange": (250, 120, 0),
}
GRID = 4
# The localization boxes keep fixed colours (and so fixed choices); the circle takes another colour.
BOX_COLORS = ("red", "blue")
SHAPES = ("circle", "square", "triangle")
CANDIDATE_CHOICES = ("the second image", "the third image")
# The four-way localization's options, in the order of the grid's quadrants (row-major).
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MAX_COUNT = 4
NUM_CORRESPONDENCE_SQUARES = 4
# Cells a visual-similarity shape spans per side, and the margins (in pixels) kept inside a cell.
SIMILAR_SPAN = 2
OBJECT_INSET = 1
BOXED_OBJECT_INSET = 2
MIN_IMAGE_SIZE = 28
DISTRACTOR_TRIES = 1000


def _canvas(size: int) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _cell_box(index: int, cell: int, inset: int = 0, span: int = 1) -> Tuple[int, int, int, int]:
    """Pixel box (inclusive) of the ``span`` x ``span`` cells whose top-left cell is ``index``, shrunk by ``inset``."""
    x, y = (index % GRID) * cell, (index // GRID) * cell
    return x + inset, y + inset, x + span * cell - 1 - inset, y + span * cell - 1 - inset


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Tuple[int, int, int, int], color) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (left, bottom), (right, bottom)], fill=color)
    else:
        raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")


def _draw_marker(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], color) -> None:
    """A dot in the middle third of ``box``."""
    left, top, right, bottom = box
    third = max(1, (right - left + 1) // 3)
    draw.rectangle((left + third, top + third, right - third, bottom - third), fill=color)


def _counting(rng: random.Random, size: int, open_ended: bool) -> Example:
    count = rng.randint(1, MAX_COUNT)
    color = rng.choice(sorted(PALETTE))
    cell = size // GRID
    cells = sorted(rng.sample(range(GRID * GRID), count))
    image, draw = _canvas(size)
    for index in cells:
        draw.ellipse(_cell_box(index, cell, OBJECT_INSET), fill=PALETTE[color])
    meta = {"count": count, "color": color, "cells": cells}
    if open_ended:
        question = "How many circles are in the image? Answer with a number."
        return Example([image], question, [], str(count), task="counting_open", meta=meta)
    choices = [str(n) for n in range(1, MAX_COUNT + 1)]
    return Example([image], "How many circles are in the image?", choices, LETTERS[count - 1], task="counting", meta=meta)


def _object_localization(rng: random.Random, size: int) -> Example:
    """BLINK-style: two boxes outline two cells, one of them holds the circle; which box is it?"""
    box_colors = list(BOX_COLORS)
    object_color = rng.choice([c for c in sorted(PALETTE) if c not in BOX_COLORS])
    cell = size // GRID
    object_cell, empty_cell = rng.sample(range(GRID * GRID), 2)
    correct = rng.randrange(len(box_colors))
    image, draw = _canvas(size)
    for box_index, color in enumerate(box_colors):
        draw.rectangle(_cell_box(object_cell if box_index == correct else empty_cell, cell), outline=PALETTE[color])
    draw.ellipse(_cell_box(object_cell, cell, BOXED_OBJECT_INSET), fill=PALETTE[object_color])
    question = f"Which box contains the {object_color} circle?"
    choices = [f"the {color} box" for color in box_colors]
    meta = {"object_color": object_color, "box_colors": box_colors, "object_cell": object_cell, "empty_cell": empty_cell}
    return Example([image], question, choices, LETTERS[correct], task="object_localization", meta=meta)


def _quadrant(rng: random.Random, size: int) -> Example:
    """Four-way localization: one shape fills a grid cell; which quarter of the image holds it?"""
    quadrant = rng.randrange(len(QUADRANTS))
    shape = rng.choice(SHAPES)
    color = rng.choice(sorted(PALETTE))
    half = GRID // 2
    row = (quadrant // 2) * half + rng.randrange(half)
    column = (quadrant % 2) * half + rng.randrange(half)
    cell = size // GRID
    image, draw = _canvas(size)
    _draw_shape(draw, shape, _cell_box(row * GRID + column, cell, OBJECT_INSET), PALETTE[color])
    question = f"Where is the {color} {shape} in the image?"
    meta = {"quadrant": quadrant, "shape": shape, "color": color, "cell": row * GRID + column}
    return Example([image], question, list(QUADRANTS), LETTERS[quadrant], task="quadrant", meta=meta)


def _visual_correspondence(rng: random.Random, size: int) -> Example:
    """Coloured squares in both images (moved); a black point marks one in the first image; two
    points (black, gray) sit on squares of the second; which one is on the square of the same colour?"""
    colors = rng.sample(sorted(PALETTE), NUM_CORRESPONDENCE_SQUARES)
    cell = size // GRID
    marked, decoy = rng.sample(range(NUM_CORRESPONDENCE_SQUARES), 2)
    marker_names = sorted(MARKERS)
    correct = rng.randrange(len(marker_names))
    first_cells = rng.sample(range(GRID * GRID), NUM_CORRESPONDENCE_SQUARES)
    second_cells = rng.sample(range(GRID * GRID), NUM_CORRESPONDENCE_SQUARES)
    first, first_draw = _canvas(size)
    second, second_draw = _canvas(size)
    for index, color in enumerate(colors):
        first_draw.rectangle(_cell_box(first_cells[index], cell, OBJECT_INSET), fill=PALETTE[color])
        second_draw.rectangle(_cell_box(second_cells[index], cell, OBJECT_INSET), fill=PALETTE[color])
    _draw_marker(first_draw, _cell_box(first_cells[marked], cell, OBJECT_INSET), MARKERS[REFERENCE_MARKER])
    for marker_index, name in enumerate(marker_names):
        square = marked if marker_index == correct else decoy
        _draw_marker(second_draw, _cell_box(second_cells[square], cell, OBJECT_INSET), MARKERS[name])
    question = (
        f"A {REFERENCE_MARKER} point marks a square in the first image. "
        "Which point in the second image is on the square of the same colour?"
    )
    choices = [f"the {name} point" for name in marker_names]
    meta = {"colors": colors, "marked": marked, "decoy": decoy, "first_cells": first_cells, "second_cells": second_cells}
    return Example([first, second], question, choices, LETTERS[correct], task="visual_correspondence", meta=meta)


def _stripe_colors(rng: random.Random, columns: int) -> List[str]:
    """Colours of ``columns`` cell-wide vertical stripes, neighbours distinct."""
    colors: List[str] = []
    for _ in range(columns):
        colors.append(rng.choice([c for c in sorted(PALETTE) if not colors or c != colors[-1]]))
    return colors


def _stripe_image(colors: Sequence[str], cell: int, rows: int) -> Image.Image:
    image = Image.new("RGB", (len(colors) * cell, rows * cell), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for column, color in enumerate(colors):
        draw.rectangle((column * cell, 0, (column + 1) * cell - 1, rows * cell - 1), fill=PALETTE[color])
    return image


def _jigsaw(rng: random.Random, size: int) -> Example:
    """Cell-wide vertical stripes with the lower-right quarter blanked; the true piece continues the
    stripes above the hole, the wrong piece has other colours in both of its columns."""
    cell = size // GRID
    half = GRID // 2
    columns = _stripe_colors(rng, GRID)
    for _ in range(DISTRACTOR_TRIES):
        other = _stripe_colors(rng, half)
        if all(o != c for o, c in zip(other, columns[half:])):
            break
    else:
        raise ValueError("cannot draw a distinct jigsaw distractor")
    puzzle = _stripe_image(columns, cell, GRID)
    ImageDraw.Draw(puzzle).rectangle((half * cell, half * cell, GRID * cell - 1, GRID * cell - 1), fill=BACKGROUND)
    true_piece = _stripe_image(columns[half:], cell, half)
    wrong_piece = _stripe_image(other, cell, half)
    correct = rng.randrange(len(CANDIDATE_CHOICES))
    pieces = [true_piece, wrong_piece] if correct == 0 else [wrong_piece, true_piece]
    question = (
        "The first image is missing its lower right part. "
        "Which image is the missing part: the second image or the third image?"
    )
    meta = {"columns": columns, "distractor_columns": other, "correct": correct}
    return Example([puzzle] + pieces, question, list(CANDIDATE_CHOICES), LETTERS[correct], task="jigsaw", meta=meta)


def _shape_image(rng: random.Random, size: int, shape: str, color: str) -> Image.Image:
    cell = size // GRID
    positions = GRID - SIMILAR_SPAN + 1
    corner = rng.randrange(positions) * GRID + rng.randrange(positions)
    image, draw = _canvas(size)
    _draw_shape(draw, shape, _cell_box(corner, cell, OBJECT_INSET, SIMILAR_SPAN), PALETTE[color])
    return image


def _visual_similarity(rng: random.Random, size: int) -> Example:
    """A reference shape; one candidate repeats its shape and colour (elsewhere), the other differs in both."""
    shape, other_shape = rng.sample(SHAPES, 2)
    color, other_color = rng.sample(sorted(PALETTE), 2)
    reference = _shape_image(rng, size, shape, color)
    similar = _shape_image(rng, size, shape, color)
    different = _shape_image(rng, size, other_shape, other_color)
    correct = rng.randrange(len(CANDIDATE_CHOICES))
    candidates = [similar, different] if correct == 0 else [different, similar]
    question = "Which image is more similar to the first image: the second image or the third image?"
    meta = {"shape": shape, "color": color, "other_shape": other_shape, "other_color": other_color, "correct": correct}
    return Example([reference] + candidates, question, list(CANDIDATE_CHOICES), LETTERS[correct],
                   task="visual_similarity", meta=meta)


SYNTHETIC_GENERATORS = {
    "counting": lambda rng, size: _counting(rng, size, open_ended=False),
    "counting_open": lambda rng, size: _counting(rng, size, open_ended=True),
    "object_localization": _object_localization,
    "quadrant": _quadrant,
    "visual_correspondence": _visual_correspondence,
    "jigsaw": _jigsaw,
    "visual_similarity": _visual_similarity,
}
SYNTHETIC_TASKS = tuple(SYNTHETIC_GENERATORS)


def make_synthetic_dataset(task: str, n: int, seed: int = 0, image_size: int = 56) -> List[Example]:
    """``n`` examples of a built-in task (``SYNTHETIC_TASKS``), identical for identical arguments;
    a larger ``n`` with the same seed extends the smaller set."""
    if task not in SYNTHETIC_GENERATORS:
        raise ValueError(f"task must be one of {list(SYNTHETIC_TASKS)}; got {task!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE or image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID} and >= {MIN_IMAGE_SIZE}; got {image_size!r}")
    rng = random.Random(f"livr-{task}-{seed}")
    return [SYNTHETIC_GENERATORS[task](rng, image_size) for _ in range(n)]


# Synthetic data does not move with --seed: train and validation draws are fixed and disjoint.
TRAIN_SEED = 0
VAL_SEED = 1


def load_spec(argument: str, cfg, split: str) -> List[Example]:
    """``synthetic:<task>[,<task>]``: ``cfg.synthetic_train_size`` (or ``_val_size``) examples per task."""
    tasks = [t.strip() for t in argument.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if not tasks or unknown:
        raise ValueError(f"data 'synthetic:{argument}': synthetic tasks must be among {list(SYNTHETIC_TASKS)}; got {tasks}")
    n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_val_size
    seed = TRAIN_SEED if split == "train" else VAL_SEED
    out = []
    for task in tasks:
        out.extend(make_synthetic_dataset(task, n, seed=seed, image_size=cfg.synthetic_image_size))
    return out
