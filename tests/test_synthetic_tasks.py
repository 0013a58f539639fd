"""Each built-in synthetic task is solvable: its answers are re-derived from the pixels it drew."""
import warnings
from collections import Counter, deque

import numpy as np
import pytest

from livr_model.app.config import TrainConfig
from livr_model.app.data import split_data
from livr_model.app.data.fingerprint import example_fingerprint
from livr_model.app.data.synthetic import (BACKGROUND, GRID, MARKERS, OBJECT_INSET, PALETTE, REFERENCE_MARKER,
                                           SYNTHETIC_TASKS, SyntheticCapacityError, make_synthetic_dataset,
                                           make_synthetic_splits, synthetic_capacity)
from livr_model.app.demo import DEMO_IMAGE_SIZE, DEMO_SIZES
from livr_model.prompts import LETTERS, Example

EXAMPLES_PER_TASK = 60
SEEDS = (0, 7)
BACKGROUND_RGB = np.array(BACKGROUND)
COLOR_NAMES = {tuple(rgb): name for name, rgb in PALETTE.items()}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def foreground(image) -> np.ndarray:
    return (pixels(image) != BACKGROUND_RGB).any(-1)


def connected_components(mask: np.ndarray) -> int:
    """Number of 4-connected True regions."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def choice_word(choice: str) -> str:
    """``"the red box"`` -> ``"red"``."""
    return choice.split()[1]


def bounding_box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    assert len(ys), "nothing of the expected colour was drawn"
    return ys.min(), ys.max(), xs.min(), xs.max()


def color_mask(array: np.ndarray, rgb) -> np.ndarray:
    return (array == np.array(rgb)).all(-1)


def marked_square_color(array: np.ndarray, marker_rgb) -> str:
    """Colour of the square under a marker: the pixel just left of the marker."""
    top, _, left, _ = bounding_box(color_mask(array, marker_rgb))
    return COLOR_NAMES[tuple(array[top, left - 1])]


def colors_present(image) -> Counter:
    """Pixel counts of the palette colours in ``image``."""
    values, counts = np.unique(pixels(image).reshape(-1, 3), axis=0, return_counts=True)
    return Counter({COLOR_NAMES[tuple(v)]: int(c) for v, c in zip(values.tolist(), counts) if tuple(v) in COLOR_NAMES})


def solve_counting(example: Example) -> str:
    count = connected_components(foreground(example.images[0]))
    if example.choices:
        return LETTERS[example.choices.index(str(count))]
    return str(count)


def solve_object_localization(example: Example) -> str:
    array = pixels(example.images[0])
    object_color = example.question.split("the ")[1].split()[0]
    inside = []
    for choice in example.choices:
        top, bottom, left, right = bounding_box(color_mask(array, PALETTE[choice_word(choice)]))
        inside.append(color_mask(array[top:bottom + 1, left:right + 1], PALETTE[object_color]).any())
    assert sum(inside) == 1, f"{sum(inside)} boxes hold the {object_color} circle"
    return LETTERS[inside.index(True)]


def solve_quadrant(example: Example) -> str:
    top, bottom, left, right = bounding_box(foreground(example.images[0]))
    height, width = example.images[0].height, example.images[0].width
    lower, righter = (top + bottom) / 2 >= height / 2, (left + right) / 2 >= width / 2
    return LETTERS[2 * int(lower) + int(righter)]


def solve_visual_correspondence(example: Example) -> str:
    first, second = (pixels(image) for image in example.images)
    target = marked_square_color(first, MARKERS[REFERENCE_MARKER])
    hits = [marked_square_color(second, MARKERS[choice_word(choice)]) == target for choice in example.choices]
    assert sum(hits) == 1, f"{sum(hits)} points sit on the {target} square"
    return LETTERS[hits.index(True)]


def solve_jigsaw(example: Example) -> str:
    puzzle, *pieces = (pixels(image) for image in example.images)
    height, width = puzzle.shape[:2]
    hole_top, hole_left = height - pieces[0].shape[0], width - pieces[0].shape[1]
    assert (puzzle[hole_top:, hole_left:] == BACKGROUND_RGB).all(), "the hole is not blank"
    above_hole = puzzle[hole_top - 1, hole_left:]
    fits = [index for index, piece in enumerate(pieces) if (piece[0] == above_hole).all()]
    assert len(fits) == 1, f"{len(fits)} pieces continue the stripes"
    return LETTERS[fits[0]]


def solve_visual_similarity(example: Example) -> str:
    reference, *candidates = example.images
    (color, _), = colors_present(reference).items()
    same = [index for index, image in enumerate(candidates) if set(colors_present(image)) == {color}]
    assert len(same) == 1, f"{len(same)} candidates share the reference colour"
    return LETTERS[same[0]]


SOLVERS = {
    "counting": solve_counting,
    "counting_open": solve_counting,
    "object_localization": solve_object_localization,
    "quadrant": solve_quadrant,
    "visual_correspondence": solve_visual_correspondence,
    "jigsaw": solve_jigsaw,
    "visual_similarity": solve_visual_similarity,
}


def test_every_task_has_a_solver():
    assert set(SOLVERS) == set(SYNTHETIC_TASKS)
    assert {"counting", "object_localization", "visual_correspondence", "jigsaw", "visual_similarity"} <= set(SYNTHETIC_TASKS)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_answers_match_the_pixels(task, seed):
    examples = make_synthetic_dataset(task, EXAMPLES_PER_TASK, seed=seed)
    assert len(examples) == EXAMPLES_PER_TASK
    for example in examples:
        assert example.task == task
        assert bool(example.choices) == (task != "counting_open")
        assert SOLVERS[task](example) == example.answer


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_are_spread_over_the_options(task):
    """No constant answer a model could learn without looking: every option occurs, none dominates."""
    examples = make_synthetic_dataset(task, EXAMPLES_PER_TASK, seed=0)
    answers = Counter(example.answer for example in examples)
    options = len(examples[0].choices) or len(answers)
    assert len(answers) == options >= 2
    assert max(answers.values()) <= 2 * EXAMPLES_PER_TASK / options


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_a_wrong_answer_is_caught(task):
    """The solvers can fail: an example whose answer is changed no longer matches its pixels."""
    example = make_synthetic_dataset(task, 1, seed=3)[0]
    if example.choices:
        wrong = LETTERS[(LETTERS.index(example.answer) + 1) % len(example.choices)]
    else:
        wrong = str(int(example.answer) + 1)
    tampered = Example(example.images, example.question, example.choices, wrong, task=task)
    assert SOLVERS[task](tampered) != tampered.answer


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_deterministic_per_seed(task):
    first = make_synthetic_dataset(task, 6, seed=11)
    again = make_synthetic_dataset(task, 6, seed=11)
    longer = make_synthetic_dataset(task, 8, seed=11)
    other = make_synthetic_dataset(task, 6, seed=12)
    for a, b, c in zip(first, again, longer):
        assert (a.question, a.choices, a.answer) == (b.question, b.choices, b.answer) == (c.question, c.choices, c.answer)
        for image_a, image_b, image_c in zip(a.images, b.images, c.images):
            assert image_a.tobytes() == image_b.tobytes() == image_c.tobytes()
    assert any(a.images[0].tobytes() != o.images[0].tobytes() for a, o in zip(first, other))


@pytest.mark.parametrize("image_size", [28, 112])
def test_other_image_sizes_stay_solvable(image_size):
    for task in SYNTHETIC_TASKS:
        for example in make_synthetic_dataset(task, 10, seed=1, image_size=image_size):
            assert example.images[0].size == (image_size, image_size)
            assert SOLVERS[task](example) == example.answer


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        make_synthetic_dataset("sudoku", 2)
    with pytest.raises(ValueError, match="n must be"):
        make_synthetic_dataset("counting", -1)
    with pytest.raises(ValueError, match="image_size must be"):
        make_synthetic_dataset("counting", 2, image_size=8)


def item_fingerprints(examples):
    return [example_fingerprint(e, with_answer=False) for e in examples]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_no_example_repeats_within_or_across_the_demo_splits(task):
    """The demo's validation and training sizes: every item (images, question, choices) occurs once."""
    size = DEMO_SIZES["full"]
    val, train = make_synthetic_splits(task, [size.val_examples, size.train_examples], image_size=DEMO_IMAGE_SIZE)
    assert (len(val), len(train)) == (size.val_examples, size.train_examples)
    fingerprints = item_fingerprints(val + train)
    assert len(set(fingerprints)) == len(fingerprints)


def test_synthetic_runs_score_every_validation_item():
    """Through the app's data path: no repeat is warned about or dropped, so all asked-for items are scored."""
    size = DEMO_SIZES["full"]
    cfg = TrainConfig(data="synthetic:counting,quadrant", synthetic_train_size=size.train_examples,
                      synthetic_val_size=size.val_examples, synthetic_image_size=DEMO_IMAGE_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = split_data(cfg)
    assert len(split.val) == 2 * size.val_examples and len(split.train) == 2 * size.train_examples
    assert split.extra["dropped_training_repeats"] == 0
    # The validation set is the start of the stream: another training size leaves it as it was.
    bigger = split_data(TrainConfig(data="synthetic:counting,quadrant", synthetic_train_size=size.train_examples + 8,
                                    synthetic_val_size=size.val_examples, synthetic_image_size=DEMO_IMAGE_SIZE))
    assert item_fingerprints(bigger.val) == item_fingerprints(split.val)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_splits_are_deterministic_per_seed(task):
    first = make_synthetic_splits(task, [5, 7], seed=4, image_size=28)
    again = make_synthetic_splits(task, [5, 7], seed=4, image_size=28)
    other = make_synthetic_splits(task, [5, 7], seed=5, image_size=28)
    for split, repeat in zip(first, again):
        assert [example_fingerprint(e) for e in split] == [example_fingerprint(e) for e in repeat]
        assert [e.meta for e in split] == [e.meta for e in repeat]
    assert item_fingerprints(first[0] + first[1]) != item_fingerprints(other[0] + other[1])


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("sizes", [(200, 400), (37, 101)])
def test_every_split_is_balanced_over_the_answers(task, sizes):
    """Each split is dealt in blocks holding every answer once, so an answer's count is within one of n / answers."""
    for examples, n in zip(make_synthetic_splits(task, list(sizes), image_size=28), sizes):
        answers = Counter(e.answer for e in examples)
        options = len(examples[0].choices) or len(answers)
        assert len(answers) == options
        for answer, count in answers.items():
            assert abs(count - n / options) <= 1, f"{task}: answer {answer} {count} times of {n}"


def test_answer_order_is_not_a_fixed_cycle():
    """Balanced, but in random order: a split that cycles A, B, C, D would let the position of an
    item in a list (the first val_limit items, a batch) predict its answer."""
    answers = [e.answer for e in make_synthetic_dataset("counting", 40, image_size=28)]
    blocks = [tuple(answers[i:i + 4]) for i in range(0, 40, 4)]
    assert all(sorted(block) == list("ABCD") for block in blocks)
    assert len(set(blocks)) > 1, f"every block of four is {blocks[0]}"


@pytest.mark.parametrize("task", ["quadrant", "object_localization", "counting"])
def test_a_task_gives_exactly_its_capacity_then_refuses(task):
    """Small image, small spaces: the whole capacity comes out distinct, one more is a named error."""
    capacity = synthetic_capacity(task, 28)
    first, second = make_synthetic_splits(task, [capacity // 2, capacity - capacity // 2], image_size=28)
    fingerprints = item_fingerprints(first + second)
    assert len(set(fingerprints)) == capacity
    with pytest.raises(SyntheticCapacityError, match=f"'{task}': {capacity + 1} distinct examples asked for.*at most {capacity}"):
        make_synthetic_dataset(task, capacity + 1, image_size=28)


def test_a_too_large_synthetic_config_names_its_sizes():
    cfg = TrainConfig(data="synthetic:quadrant", synthetic_train_size=synthetic_capacity("quadrant", 28),
                      synthetic_val_size=10, synthetic_image_size=28)
    with pytest.raises(ValueError, match="synthetic_val_size=10 and synthetic_train_size=1440.*'quadrant'.*at most 1440"):
        split_data(cfg)


@pytest.mark.parametrize("task", ["counting", "quadrant"])
def test_one_cell_objects_stay_inside_their_cell(task):
    """Objects vary in size and place, but keep the inset margin of their cell (their image token)."""
    seen_sizes = set()
    for example in make_synthetic_dataset(task, 60, seed=2, image_size=DEMO_IMAGE_SIZE):
        mask = foreground(example.images[0])
        cell = DEMO_IMAGE_SIZE // GRID
        for edge in range(OBJECT_INSET):
            for offset in (edge, cell - 1 - edge):
                assert not mask[offset::cell, :].any() and not mask[:, offset::cell].any()
        placements = example.meta.get("placements") or [example.meta["placement"]]
        seen_sizes.update(side for side, _, _ in placements)
    assert len(seen_sizes) > 1
