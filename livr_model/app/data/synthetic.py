"""Built-in synthetic visual tasks (drawn in ``synthetic_tasks.py``), sampled offline from a fixed seed.

A data set never holds a task's key twice, so no example repeats, neither within a set nor across
the splits of ``make_synthetic_splits``. Every split's answers are balanced: it is dealt in blocks
that hold each answer once, in random order. A task has a finite number of distinct examples per
answer; asking for more raises ``SyntheticCapacityError`` instead of repeating examples (a repeated
validation item measures memory, and a silently shorter set changes the experiment).
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import List, Sequence

from livr_model.prompts import Example

from ..config import DEFAULT_SYNTHETIC_IMAGE_SIZE, DEFAULT_SYNTHETIC_VAL

from .synthetic_tasks import (BACKGROUND, GRID, MARKERS, MIN_IMAGE_SIZE, OBJECT_INSET, PALETTE, REFERENCE_MARKER,
                              SYNTHETIC_GENERATORS, SYNTHETIC_TASKS, TaskSpec)

# Draws are uniform over a task's keys, so drawing a fresh key takes about capacity / unused keys
# tries; this many times that and failing (chance below e^-20) means the capacity is miscounted.
DRAW_TRIES_PER_EXPECTED = 20


class SyntheticCapacityError(ValueError):
    """More examples asked of a synthetic task than it has distinct ones."""


def _check_arguments(task: str, image_size: int) -> None:
    if task not in SYNTHETIC_GENERATORS:
        raise ValueError(f"task must be one of {list(SYNTHETIC_TASKS)}; got {task!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE or image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID} and >= {MIN_IMAGE_SIZE}; got {image_size!r}")


def synthetic_capacity(task: str, image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE) -> int:
    """The most distinct examples balanced sets of ``task`` can hold: answers x the fewest keys of any answer."""
    _check_arguments(task, image_size)
    spec = SYNTHETIC_GENERATORS[task]
    return spec.answers * min(spec.capacity(answer, image_size // GRID) for answer in range(spec.answers))


def _answer_order(rng: random.Random, n: int, answers: int) -> List[int]:
    """``n`` answers in blocks that hold each answer once, in random order."""
    order: List[int] = []
    while len(order) < n:
        block = list(range(answers))
        rng.shuffle(block)
        order.extend(block)
    return order[:n]


def _fresh_key(spec: TaskSpec, rng: random.Random, answer: int, cell: int, seen: set, unused: int, capacity: int) -> tuple:
    tries = DRAW_TRIES_PER_EXPECTED * math.ceil(capacity / unused)
    for _ in range(tries):
        key = spec.draw(rng, answer, cell)
        if (answer, key) not in seen:
            seen.add((answer, key))
            return key
    raise RuntimeError(f"no unused key for answer {answer} after {tries} draws: the task's capacity is miscounted")


def make_synthetic_splits(task: str, sizes: Sequence[int], seed: int = 0, image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE) -> List[List[Example]]:
    """One list of examples per entry of ``sizes``, no example twice in all of them, each list's
    answers balanced. Identical for identical arguments; a larger last size extends the last list."""
    _check_arguments(task, image_size)
    if isinstance(sizes, (int, str)) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ValueError(f"sizes must be a sequence of non-negative ints; got {sizes!r}")
    spec = SYNTHETIC_GENERATORS[task]
    cell = image_size // GRID
    order_rng = random.Random(f"livr-{task}-{seed}-answers")
    orders = [_answer_order(order_rng, n, spec.answers) for n in sizes]
    needed = Counter(answer for order in orders for answer in order)
    capacity = {answer: spec.capacity(answer, cell) for answer in range(spec.answers)}
    possible = spec.answers * min(capacity.values())
    # Short of the balanced total, one answer's examples can still run out when every split ends in a part block.
    short = [answer for answer in sorted(needed) if needed[answer] > capacity[answer]]
    if sum(sizes) > possible or short:
        answer = short[0] if short else min(capacity, key=capacity.get)
        raise SyntheticCapacityError(
            f"synthetic task {task!r}: {sum(sizes)} distinct examples asked for (sizes {list(sizes)}), but at "
            f"image_size {image_size} it has at most {possible} with balanced answers (answer {spec.label(answer)} "
            f"has {capacity[answer]} distinct examples)")
    rng = random.Random(f"livr-{task}-{seed}")
    seen: set = set()
    used: Counter = Counter()
    splits = []
    for order in orders:
        examples = []
        for answer in order:
            key = _fresh_key(spec, rng, answer, cell, seen, capacity[answer] - used[answer], capacity[answer])
            used[answer] += 1
            examples.append(spec.render(key, answer, image_size))
        splits.append(examples)
    return splits


def make_synthetic_dataset(task: str, n: int, seed: int = 0, image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE) -> List[Example]:
    """``n`` distinct examples of a built-in task (``SYNTHETIC_TASKS``), answers balanced, identical
    for identical arguments; a larger ``n`` with the same seed extends the smaller set. Two seeds
    are independent draws and may share examples: draw splits together with ``make_synthetic_splits``.
    With seed 0 these are the first items of ``--data synthetic:<task>``'s validation set: to train
    outside livr-train, take ``synthetic_training_examples``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    return make_synthetic_splits(task, [n], seed=seed, image_size=image_size)[0]


# Synthetic data does not move with --seed. Validation and training sets are dealt from one stream
# of distinct examples, validation first: no validation item is a training item, and the validation
# set stays the same when only the training size changes.
SYNTHETIC_SEED = 0


def synthetic_training_examples(task: str, n: int, val_size: int = DEFAULT_SYNTHETIC_VAL,
                                image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE) -> List[Example]:
    """The first ``n`` training examples ``--data synthetic:<task>`` gives livr-train (with
    ``synthetic_val_size=val_size``): none of them is in the validation set livr-eval scores."""
    return make_synthetic_splits(task, [val_size, n], seed=SYNTHETIC_SEED, image_size=image_size)[1]


def load_spec(argument: str, cfg, split: str) -> List[Example]:
    """``synthetic:<task>[,<task>]``: ``cfg.synthetic_train_size`` (or ``_val_size``) examples per task."""
    tasks = [t.strip() for t in argument.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if not tasks or unknown:
        raise ValueError(f"synthetic tasks must be among {list(SYNTHETIC_TASKS)}; got {tasks}")
    sizes = [cfg.synthetic_val_size, cfg.synthetic_train_size]
    out = []
    for task in tasks:
        try:
            val, train = make_synthetic_splits(task, sizes, seed=SYNTHETIC_SEED, image_size=cfg.synthetic_image_size)
        except SyntheticCapacityError as error:
            raise ValueError(f"with synthetic_val_size={sizes[0]} and synthetic_train_size="
                             f"{sizes[1]}: {error}; ask for fewer, or a larger synthetic_image_size") from None
        out.extend(train if split == "train" else val)
    return out


__all__ = ["BACKGROUND", "GRID", "MARKERS", "OBJECT_INSET", "PALETTE", "REFERENCE_MARKER", "SYNTHETIC_TASKS",
           "SyntheticCapacityError", "load_spec", "make_synthetic_dataset", "make_synthetic_splits", "synthetic_capacity",
           "synthetic_training_examples"]
