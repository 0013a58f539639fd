"""The JSONL example the README trains on (examples/counting, used by examples/tiny_counting.yaml)
is clean data: no training example repeats another, no validation example is a training example,
and the answers of each split are balanced, so livr-train neither warns nor drops validation items."""
from collections import Counter
from pathlib import Path

import pytest

from livr_model.app.data import load_jsonl
from livr_model.app.data.checks import overlap_report

COUNTING = Path(__file__).resolve().parent.parent / "examples" / "counting"
SPLITS = {"train": 160, "val": 40}
LETTERS = "ABCD"


@pytest.fixture(scope="module")
def splits():
    return {name: load_jsonl(COUNTING / f"{name}.jsonl") for name in SPLITS}


def test_example_splits_have_no_repeats_and_no_overlap(splits):
    assert {name: len(examples) for name, examples in splits.items()} == SPLITS
    assert overlap_report(splits["train"], splits["val"]) == []


@pytest.mark.parametrize("name", SPLITS)
def test_example_answers_are_balanced(splits, name):
    counts = Counter(example.answer for example in splits[name])
    assert counts == {letter: SPLITS[name] // len(LETTERS) for letter in LETTERS}, counts
