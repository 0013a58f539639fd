"""Examples, the JSONL format, the BLINK loader, built-in synthetic visual tasks, and encoding.

An ``Example`` is one visual question: PIL images, a question, optional choices and the answer
(a letter for multiple choice, the exact text for open-ended questions). ``encode_example`` turns
one into model inputs with the processor's own chat template, latent tokens right after the
question, and labels on the answer only; ``collate`` pads a list of them into a batch.

JSONL format, one object per line::

    {"images": ["imgs/0.png"], "question": "How many dogs?", "choices": ["1", "2"], "answer": "B", "task": "count"}

``images`` are paths relative to the file's folder (or ``image_root``); ``answer`` is a letter
("B" or "(B)") when there are ``choices``, else the exact answer text (``"7"``).

The synthetic tasks (``SYNTHETIC_TASKS``) are drawn offline with PIL from a fixed seed: flat
colours on a 4x4 grid of cells (one image token per cell with the tiny processor) and no
anti-aliasing, so their answers can be re-derived from the pixels; each example keeps what its
generator drew in ``meta``.
"""
from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from .segments import IGNORE_INDEX

LETTERS = string.ascii_uppercase
MIN_CHOICES = 2
CHOICES_HEADER = "Select from the following choices."

# Token type ids transformers 5.x Qwen models read (mm_token_type_ids).
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1
VIDEO_TOKEN_TYPE = 2
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
# Qwen's smart_resize refuses images more elongated than this.
MAX_ASPECT_RATIO = 200

BLINK_REPO = "BLINK-Benchmark/BLINK"
BLINK_SPLITS = ("val", "test")
BLINK_SUBTASKS = (
    "Art_Style",
    "Counting",
    "Forensic_Detection",
    "Functional_Correspondence",
    "IQ_Test",
    "Jigsaw",
    "Multi-view_Reasoning",
    "Object_Localization",
    "Relative_Depth",
    "Relative_Reflectance",
    "Semantic_Correspondence",
    "Spatial_Relation",
    "Visual_Correspondence",
    "Visual_Similarity",
)
# The nine BLINK-derived tasks of the LIVR paper.
PAPER_TASKS = (
    "Counting",
    "Jigsaw",
    "Object_Localization",
    "Visual_Correspondence",
    "Art_Style",
    "Semantic_Correspondence",
    "Functional_Correspondence",
    "Relative_Reflectance",
    "Visual_Similarity",
)
BLINK_MAX_IMAGES = 4


def _normalize_letter(answer: str) -> str:
    """``"(B)"``, ``" B "`` -> ``"B"``; anything else is returned stripped, unchanged."""
    text = answer.strip()
    if len(text) == 3 and text[0] == "(" and text[2] == ")":
        text = text[1]
    return text


@dataclass
class Example:
    """One visual question.

    ``images``: PIL images in the order the prompt refers to them. ``choices``: option texts, empty
    for an open-ended question. ``answer``: a letter ("A".."Z"; "(A)" is accepted and normalised)
    naming one of ``choices``, or the exact answer text when there are no choices. ``meta``: what
    a synthetic generator drew (ground truth for tests), free-form.
    """

    images: list
    question: str
    choices: List[str]
    answer: str
    task: str = "custom"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images; got {type(self.images).__name__}")
        self.images = list(self.images)
        for index, image in enumerate(self.images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{index}] must be a PIL.Image.Image; got {type(image).__name__}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be a non-empty string; got {self.question!r}")
        if self.choices is None:
            self.choices = []
        if not isinstance(self.choices, (list, tuple)):
            raise ValueError(f"choices must be a list of strings (empty for open-ended); got {type(self.choices).__name__}")
        self.choices = list(self.choices)
        if any(not isinstance(c, str) or not c.strip() for c in self.choices):
            raise ValueError(f"choices must be non-empty strings; got {self.choices!r}")
        if self.choices and not MIN_CHOICES <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"choices must hold {MIN_CHOICES} to {len(LETTERS)} options; got {len(self.choices)}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"answer must be a non-empty string; got {self.answer!r}")
        if self.choices:
            letter = _normalize_letter(self.answer)
            valid = LETTERS[: len(self.choices)]
            if len(letter) != 1 or letter not in valid:
                raise ValueError(
                    f"answer must be one of the letters {', '.join(valid)} (or '(A)' style) naming a choice; "
                    f"got {self.answer!r} for {len(self.choices)} choices"
                )
            self.answer = letter
        else:
            self.answer = self.answer.strip()
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty string; got {self.task!r}")

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)


def format_prompt(example: Example) -> str:
    """BLINK's prompt: the question, then ``Select from the following choices.`` and ``(A) ...`` lines."""
    if not example.choices:
        return example.question
    options = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(example.choices))
    return f"{example.question}\n{CHOICES_HEADER}\n{options}"


def answer_text(example: Example) -> str:
    """The supervised target: ``"(A)"`` for multiple choice, the answer itself for open-ended questions."""
    return f"({example.answer})" if example.choices else example.answer


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


def _resolve_blink_subtask(subtask: str) -> str:
    by_lower = {name.lower(): name for name in BLINK_SUBTASKS}
    if not isinstance(subtask, str) or subtask.lower() not in by_lower:
        raise ValueError(f"subtask must be one of the BLINK subtasks {list(BLINK_SUBTASKS)}; got {subtask!r}")
    return by_lower[subtask.lower()]


def load_blink(subtask: str, split: str = "val", cache_dir=None) -> List[Example]:
    """One BLINK subtask (``BLINK_SUBTASKS``, case-insensitive) through the ``datasets`` library.

    Needs the Hugging Face hub (or a filled ``cache_dir``); answers are public for ``val`` only."""
    name = _resolve_blink_subtask(subtask)
    if split not in BLINK_SPLITS:
        raise ValueError(f"split must be one of {BLINK_SPLITS}; got {split!r}")
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError("load_blink needs the `datasets` library: pip install 'livr[blink]'") from error

    try:
        rows = datasets.load_dataset(BLINK_REPO, name, split=split, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many types (offline, HTTP, missing cache)
        raise RuntimeError(
            f"could not load BLINK subtask {name!r} (split {split!r}) from the Hugging Face hub "
            f"({BLINK_REPO}): {type(error).__name__}: {error}. BLINK needs a reachable hub or a cache "
            "already holding it (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE block downloads); offline, use a "
            "JSONL file or the built-in synthetic tasks instead."
        ) from error
    examples = []
    for index, row in enumerate(rows):
        images = [row[f"image_{i}"] for i in range(1, BLINK_MAX_IMAGES + 1) if row.get(f"image_{i}") is not None]
        try:
            examples.append(
                Example(
                    images=[image.convert("RGB") for image in images],
                    question=row["question"],
                    choices=list(row["choices"]),
                    answer=row["answer"],
                    task=name,
                    meta={"idx": row.get("idx", index)},
                )
            )
        except ValueError as error:
            raise ValueError(f"BLINK {name} {split} item {index}: {error} (test-split answers are hidden)") from None
    return examples


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


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _check_image_sizes(processor, example: Example) -> None:
    """Reject images the processor cannot tile: sides under one merged patch, or extreme aspect ratios."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    for index, image in enumerate(example.images):
        width, height = image.size
        if isinstance(patch, int) and isinstance(merge, int):
            minimum = patch * merge
            if min(width, height) < minimum:
                raise ValueError(
                    f"images[{index}] of a {example.task} example is {width}x{height}; this processor needs "
                    f"both sides >= {minimum} pixels (patch {patch} x merge {merge})"
                )
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise ValueError(f"images[{index}] is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO} are not supported")


def _check_latent_tokens(tokenizer, latent_tokens: str) -> List[int]:
    if not isinstance(latent_tokens, str):
        raise ValueError(f"latent_tokens must be a string of added tokens; got {type(latent_tokens).__name__}")
    if not latent_tokens:
        return []
    ids = tokenizer(latent_tokens, add_special_tokens=False)["input_ids"]
    added = set(tokenizer.get_added_vocab().values())
    if any(i not in added for i in ids):
        raise ValueError(
            f"latent_tokens must consist of tokens added to the tokenizer (see livr_model.latents.add_latent_tokens); "
            f"{latent_tokens[:60]!r} tokenizes into ordinary text tokens"
        )
    return ids


def _token_id(processor, name: str) -> Optional[int]:
    value = getattr(processor, name, None)
    return value if isinstance(value, int) else None


def encode_example(processor, example: Example, *, latent_tokens: str = "", with_answer: bool = True,
                   max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Model inputs for one example, built with the processor's chat template.

    Layout: the user turn (images, then ``format_prompt``), ``latent_tokens`` right after the
    question text inside the user turn, the assistant turn start, then (``with_answer``) the answer
    and the template's end-of-turn token. ``labels`` are -100 except on the answer and that
    end-of-turn token. Returns 1-D ``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids`` (0 text, 1 image, 2 video) and the processor's vision tensors
    (``pixel_values``, ``image_grid_thw`` for Qwen) for the example's images.
    """
    if not isinstance(example, Example):
        raise ValueError(f"example must be an Example; got {type(example).__name__}")
    if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
        raise ValueError(f"max_length must be a positive int or None; got {max_length!r}")
    tokenizer = _tokenizer_of(processor)
    _check_latent_tokens(tokenizer, latent_tokens)
    _check_image_sizes(processor, example)

    content = [{"type": "image"} for _ in example.images]
    content.append({"type": "text", "text": format_prompt(example) + latent_tokens})
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[prompt], images=example.images or None, return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if with_answer:
        reply = [{"role": "assistant", "content": [{"type": "text", "text": answer_text(example)}]}]
        full = processor.apply_chat_template(messages + reply, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the processor's chat template renders the conversation differently from its generation "
                             "prompt; encode_example needs a template whose prompt is a prefix of the full chat")
        # The reply up to its end-of-turn token; the template's trailing newline carries no loss.
        target = full[len(prompt):].rstrip()
        target_ids = torch.tensor(tokenizer(target, add_special_tokens=False)["input_ids"], dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids, target_ids])
        labels = torch.cat([labels, target_ids])
    if max_length is not None and input_ids.numel() > max_length:
        raise ValueError(
            f"a {example.task} example needs {input_ids.numel()} tokens (with {len(example.images)} image(s)), "
            f"more than max_length={max_length}; use smaller images or a larger max_length"
        )
    token_types = torch.full_like(input_ids, TEXT_TOKEN_TYPE)
    for name, kind in (("image_token_id", IMAGE_TOKEN_TYPE), ("video_token_id", VIDEO_TOKEN_TYPE)):
        token_id = _token_id(processor, name)
        if token_id is not None:
            token_types[input_ids == token_id] = kind
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "mm_token_type_ids": token_types,
    }
    for key, value in encoded.items():
        if key not in TEXT_KEYS and isinstance(value, torch.Tensor):
            out[key] = value
    return out


def collate(encoded: Sequence[Dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad ``encode_example`` outputs into a batch: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    and ``mm_token_type_ids`` with 0, ``labels`` with -100; vision tensors concatenated in order.
    ``padding_side="left"`` for generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int; got {pad_token_id!r}")
    if not encoded:
        raise ValueError("encoded must hold at least one example")
    for index, item in enumerate(encoded):
        if "input_ids" not in item or item["input_ids"].dim() != 1:
            raise ValueError(f"encoded[{index}] must be an encode_example output with 1-D input_ids")
    length = max(item["input_ids"].numel() for item in encoded)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": TEXT_TOKEN_TYPE}
    batch = {}
    for key, pad_value in pad_values.items():
        if not all(key in item for item in encoded):
            continue
        rows = []
        for item in encoded:
            values = item[key]
            padding = values.new_full((length - values.numel(),), pad_value)
            rows.append(torch.cat([values, padding] if padding_side == "right" else [padding, values]))
        batch[key] = torch.stack(rows)
    vision_keys = sorted({key for item in encoded for key in item if key not in TEXT_KEYS})
    for key in vision_keys:
        batch[key] = torch.cat([item[key] for item in encoded if key in item])
    return batch
