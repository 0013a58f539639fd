"""The built-in synthetic tasks, drawn with PIL: flat colours on a 4x4 grid of cells (one image
token per cell with the tiny processor) and no anti-aliasing, so their answers can be re-derived
from the pixels; each example keeps what was drawn in ``meta``.

A task draws a key (what to draw: colours, cells, sizes) for a given answer, renders a key into an
``Example``, and counts its distinct keys per answer; distinct keys give distinct pictures.
``synthetic.py`` samples keys without repeats.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Sequence, Tuple

from PIL import Image, ImageDraw

from livr_model.prompts import LETTERS, Example

# Synthetic tasks. Every object sits inside one cell, or a block of cells, of a GRID x GRID layout:
# with the tiny processor a cell is exactly one image token, so an object never spreads over two
# tokens (a random frozen vision tower then still separates them cleanly). Flat colours, no
# anti-aliasing: a pixel's colour names what was drawn there, which is how the tests re-derive
# every answer.
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
# A one-cell object (counting's circles, quadrant's shape) is drawn at a side from the full cell
# (less the inset) down to this fraction of it, anywhere in the cell. Without it a single circle
# has only 16 cells x 6 colours = 96 looks, fewer than a 1000-example counting set needs of its
# count-1 examples; an object still fills most of its cell and never leaves it.
MIN_OBJECT_FRACTION = 0.8
MIN_IMAGE_SIZE = 28
DISTRACTOR_TRIES = 1000
def _canvas(size: int) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _cell_box(index: int, cell: int, inset: int = 0, span: int = 1) -> Tuple[int, int, int, int]:
    """Pixel box (inclusive) of the ``span`` x ``span`` cells whose top-left cell is ``index``, shrunk by ``inset``."""
    x, y = (index % GRID) * cell, (index // GRID) * cell
    return x + inset, y + inset, x + span * cell - 1 - inset, y + span * cell - 1 - inset


@lru_cache(maxsize=None)
def _placements(cell: int) -> Tuple[Tuple[int, int, int], ...]:
    """Every (side, dx, dy) of a one-cell object: its side in pixels and its offset inside the cell's inset box."""
    full = cell - 2 * OBJECT_INSET
    smallest = max(1, math.ceil(MIN_OBJECT_FRACTION * full))
    return tuple((side, dx, dy) for side in range(full, smallest - 1, -1)
                 for dy in range(full - side + 1) for dx in range(full - side + 1))


def _placed_box(index: int, cell: int, placement: Tuple[int, int, int]) -> Tuple[int, int, int, int]:
    side, dx, dy = placement
    left, top = (index % GRID) * cell + OBJECT_INSET + dx, (index // GRID) * cell + OBJECT_INSET + dy
    return left, top, left + side - 1, top + side - 1


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


# Each task: ``draw(rng, answer, cell) -> key``, ``render(key, answer, size) -> Example`` and
# ``capacity(answer, cell) -> int``, the number of distinct keys with that answer.

def _draw_counting(rng: random.Random, answer: int, cell: int) -> tuple:
    cells = sorted(rng.sample(range(GRID * GRID), answer + 1))
    color = rng.choice(sorted(PALETTE))
    return color, tuple((index, rng.choice(_placements(cell))) for index in cells)


def _render_counting(key: tuple, answer: int, size: int, open_ended: bool) -> Example:
    color, circles = key
    cell = size // GRID
    image, draw = _canvas(size)
    for index, placement in circles:
        draw.ellipse(_placed_box(index, cell, placement), fill=PALETTE[color])
    count = len(circles)
    meta = {"count": count, "color": color, "cells": [index for index, _ in circles],
            "placements": [list(placement) for _, placement in circles]}
    if open_ended:
        question = "How many circles are in the image? Answer with a number."
        return Example([image], question, [], str(count), task="counting_open", meta=meta)
    choices = [str(n) for n in range(1, MAX_COUNT + 1)]
    return Example([image], "How many circles are in the image?", choices, LETTERS[count - 1], task="counting", meta=meta)


def _counting_capacity(answer: int, cell: int) -> int:
    count = answer + 1
    return math.comb(GRID * GRID, count) * len(PALETTE) * len(_placements(cell)) ** count


def _localization_colors() -> List[str]:
    return [c for c in sorted(PALETTE) if c not in BOX_COLORS]


def _draw_object_localization(rng: random.Random, answer: int, cell: int) -> tuple:
    object_color = rng.choice(_localization_colors())
    object_cell, empty_cell = rng.sample(range(GRID * GRID), 2)
    return object_color, object_cell, empty_cell


def _render_object_localization(key: tuple, answer: int, size: int) -> Example:
    """BLINK-style: two boxes outline two cells, one of them holds the circle; which box is it?"""
    object_color, object_cell, empty_cell = key
    box_colors = list(BOX_COLORS)
    cell = size // GRID
    image, draw = _canvas(size)
    for box_index, color in enumerate(box_colors):
        draw.rectangle(_cell_box(object_cell if box_index == answer else empty_cell, cell), outline=PALETTE[color])
    draw.ellipse(_cell_box(object_cell, cell, BOXED_OBJECT_INSET), fill=PALETTE[object_color])
    question = f"Which box contains the {object_color} circle?"
    choices = [f"the {color} box" for color in box_colors]
    meta = {"object_color": object_color, "box_colors": box_colors, "object_cell": object_cell, "empty_cell": empty_cell}
    return Example([image], question, choices, LETTERS[answer], task="object_localization", meta=meta)


def _object_localization_capacity(answer: int, cell: int) -> int:
    return len(_localization_colors()) * math.perm(GRID * GRID, 2)


def _draw_quadrant(rng: random.Random, answer: int, cell: int) -> tuple:
    half = GRID // 2
    row = (answer // 2) * half + rng.randrange(half)
    column = (answer % 2) * half + rng.randrange(half)
    return rng.choice(SHAPES), rng.choice(sorted(PALETTE)), row * GRID + column, rng.choice(_placements(cell))


def _render_quadrant(key: tuple, answer: int, size: int) -> Example:
    """Four-way localization: one shape inside a grid cell; which quarter of the image holds it?"""
    shape, color, index, placement = key
    image, draw = _canvas(size)
    _draw_shape(draw, shape, _placed_box(index, size // GRID, placement), PALETTE[color])
    question = f"Where is the {color} {shape} in the image?"
    meta = {"quadrant": answer, "shape": shape, "color": color, "cell": index, "placement": list(placement)}
    return Example([image], question, list(QUADRANTS), LETTERS[answer], task="quadrant", meta=meta)


def _quadrant_capacity(answer: int, cell: int) -> int:
    return (GRID // 2) ** 2 * len(SHAPES) * len(PALETTE) * len(_placements(cell))


def _draw_visual_correspondence(rng: random.Random, answer: int, cell: int) -> tuple:
    colors = rng.sample(sorted(PALETTE), NUM_CORRESPONDENCE_SQUARES)
    first_cells = rng.sample(range(GRID * GRID), NUM_CORRESPONDENCE_SQUARES)
    second_cells = rng.sample(range(GRID * GRID), NUM_CORRESPONDENCE_SQUARES)
    marked, decoy = rng.sample(colors, 2)
    # Squares sorted by colour: the same pictures drawn in another order are the same key.
    return tuple(sorted(zip(colors, first_cells, second_cells))), marked, decoy


def _render_visual_correspondence(key: tuple, answer: int, size: int) -> Example:
    """Coloured squares in both images (moved); a black point marks one in the first image; two
    points (black, gray) sit on squares of the second; which one is on the square of the same colour?"""
    squares, marked_color, decoy_color = key
    colors = [color for color, _, _ in squares]
    first_cells = [first for _, first, _ in squares]
    second_cells = [second for _, _, second in squares]
    marked, decoy = colors.index(marked_color), colors.index(decoy_color)
    cell = size // GRID
    marker_names = sorted(MARKERS)
    first, first_draw = _canvas(size)
    second, second_draw = _canvas(size)
    for index, color in enumerate(colors):
        first_draw.rectangle(_cell_box(first_cells[index], cell, OBJECT_INSET), fill=PALETTE[color])
        second_draw.rectangle(_cell_box(second_cells[index], cell, OBJECT_INSET), fill=PALETTE[color])
    _draw_marker(first_draw, _cell_box(first_cells[marked], cell, OBJECT_INSET), MARKERS[REFERENCE_MARKER])
    for marker_index, name in enumerate(marker_names):
        square = marked if marker_index == answer else decoy
        _draw_marker(second_draw, _cell_box(second_cells[square], cell, OBJECT_INSET), MARKERS[name])
    question = (
        f"A {REFERENCE_MARKER} point marks a square in the first image. "
        "Which point in the second image is on the square of the same colour?"
    )
    choices = [f"the {name} point" for name in marker_names]
    meta = {"colors": colors, "marked": marked, "decoy": decoy, "first_cells": first_cells, "second_cells": second_cells}
    return Example([first, second], question, choices, LETTERS[answer], task="visual_correspondence", meta=meta)


def _visual_correspondence_capacity(answer: int, cell: int) -> int:
    placements = math.perm(GRID * GRID, NUM_CORRESPONDENCE_SQUARES) ** 2
    return math.comb(len(PALETTE), NUM_CORRESPONDENCE_SQUARES) * placements * math.perm(NUM_CORRESPONDENCE_SQUARES, 2)


def _stripes_valid(colors: Sequence[str]) -> bool:
    return all(a != b for a, b in zip(colors, colors[1:]))


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


def _distractor_fits(other: Sequence[str], columns: Sequence[str]) -> bool:
    """The wrong piece differs from the true one in every column."""
    return all(o != c for o, c in zip(other, columns[GRID // 2:]))


def _draw_jigsaw(rng: random.Random, answer: int, cell: int) -> tuple:
    columns = _stripe_colors(rng, GRID)
    for _ in range(DISTRACTOR_TRIES):
        other = _stripe_colors(rng, GRID // 2)
        if _distractor_fits(other, columns):
            return tuple(columns), tuple(other)
    raise ValueError("cannot draw a distinct jigsaw distractor")


def _render_jigsaw(key: tuple, answer: int, size: int) -> Example:
    """Cell-wide vertical stripes with the lower-right quarter blanked; the true piece continues the
    stripes above the hole, the wrong piece has other colours in both of its columns."""
    columns, other = list(key[0]), list(key[1])
    cell = size // GRID
    half = GRID // 2
    puzzle = _stripe_image(columns, cell, GRID)
    ImageDraw.Draw(puzzle).rectangle((half * cell, half * cell, GRID * cell - 1, GRID * cell - 1), fill=BACKGROUND)
    true_piece = _stripe_image(columns[half:], cell, half)
    wrong_piece = _stripe_image(other, cell, half)
    pieces = [true_piece, wrong_piece] if answer == 0 else [wrong_piece, true_piece]
    question = (
        "The first image is missing its lower right part. "
        "Which image is the missing part: the second image or the third image?"
    )
    meta = {"columns": columns, "distractor_columns": other, "correct": answer}
    return Example([puzzle] + pieces, question, list(CANDIDATE_CHOICES), LETTERS[answer], task="jigsaw", meta=meta)


@lru_cache(maxsize=None)
def _jigsaw_capacity(answer: int, cell: int) -> int:
    """Counted by listing them (6^4 x 6^2 candidates)."""
    stripes = [s for s in itertools.product(sorted(PALETTE), repeat=GRID) if _stripes_valid(s)]
    pieces = [p for p in itertools.product(sorted(PALETTE), repeat=GRID // 2) if _stripes_valid(p)]
    return sum(_distractor_fits(other, columns) for columns in stripes for other in pieces)


def _similar_corners() -> int:
    return (GRID - SIMILAR_SPAN + 1) ** 2


def _shape_corner(rng: random.Random) -> int:
    positions = GRID - SIMILAR_SPAN + 1
    return rng.randrange(positions) * GRID + rng.randrange(positions)


def _shape_image(size: int, shape: str, color: str, corner: int) -> Image.Image:
    image, draw = _canvas(size)
    _draw_shape(draw, shape, _cell_box(corner, size // GRID, OBJECT_INSET, SIMILAR_SPAN), PALETTE[color])
    return image


def _draw_visual_similarity(rng: random.Random, answer: int, cell: int) -> tuple:
    shape, other_shape = rng.sample(SHAPES, 2)
    color, other_color = rng.sample(sorted(PALETTE), 2)
    return shape, other_shape, color, other_color, tuple(_shape_corner(rng) for _ in range(3))


def _render_visual_similarity(key: tuple, answer: int, size: int) -> Example:
    """A reference shape; one candidate repeats its shape and colour (elsewhere), the other differs in both."""
    shape, other_shape, color, other_color, corners = key
    reference = _shape_image(size, shape, color, corners[0])
    similar = _shape_image(size, shape, color, corners[1])
    different = _shape_image(size, other_shape, other_color, corners[2])
    candidates = [similar, different] if answer == 0 else [different, similar]
    question = "Which image is more similar to the first image: the second image or the third image?"
    meta = {"shape": shape, "color": color, "other_shape": other_shape, "other_color": other_color, "correct": answer}
    return Example([reference] + candidates, question, list(CANDIDATE_CHOICES), LETTERS[answer],
                   task="visual_similarity", meta=meta)


def _visual_similarity_capacity(answer: int, cell: int) -> int:
    return math.perm(len(SHAPES), 2) * math.perm(len(PALETTE), 2) * _similar_corners() ** 3


@dataclass(frozen=True)
class TaskSpec:
    """A task: how many answers, and its ``draw``, ``render`` and ``capacity`` (see the module docstring)."""

    answers: int
    draw: Callable
    render: Callable
    capacity: Callable
    label: Callable = LETTERS.__getitem__


SYNTHETIC_GENERATORS = {
    "counting": TaskSpec(MAX_COUNT, _draw_counting, lambda key, answer, size: _render_counting(key, answer, size, False),
                      _counting_capacity),
    "counting_open": TaskSpec(MAX_COUNT, _draw_counting, lambda key, answer, size: _render_counting(key, answer, size, True),
                           _counting_capacity, label=lambda answer: str(answer + 1)),
    "object_localization": TaskSpec(len(BOX_COLORS), _draw_object_localization, _render_object_localization,
                                 _object_localization_capacity),
    "quadrant": TaskSpec(len(QUADRANTS), _draw_quadrant, _render_quadrant, _quadrant_capacity),
    "visual_correspondence": TaskSpec(len(MARKERS), _draw_visual_correspondence, _render_visual_correspondence,
                                   _visual_correspondence_capacity),
    "jigsaw": TaskSpec(len(CANDIDATE_CHOICES), _draw_jigsaw, _render_jigsaw, _jigsaw_capacity),
    "visual_similarity": TaskSpec(len(CANDIDATE_CHOICES), _draw_visual_similarity, _render_visual_similarity,
                               _visual_similarity_capacity),
}
SYNTHETIC_TASKS = tuple(SYNTHETIC_GENERATORS)


