"""Answer extraction as BLINK scores it, numeric exact match, and accuracy bookkeeping."""
import math

import pytest

from livr_model.evaluate import (
    EvalResult,
    extract_choice_letter,
    extract_number,
    format_table,
    normalize_number,
    score_reply,
)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("A", "A"),
        ("(B)", "B"),
        ("  c.  ", "C"),
        ("D\n", "D"),
        ("**B**", "B"),
        ("The answer is (C).", "C"),
        ("I think (D) because the dots are red", "D"),
        ("(B) the second image", "B"),
        ("B) the second image", "B"),
        ("B. The red square", "B"),
        ("Answer: B", "B"),
        ("the answer is b", "B"),
        # ambiguous or non-committal replies score as wrong, never as a guess
        ("(A) or (B)", None),
        ("A cat sits on the mat", None),
        ("I am not sure", None),
        ("", None),
        # letters beyond the choices do not count
        ("E", None),
        ("(E)", None),
        ("(E) or (A)", "A"),
        # BLINK's rule: a unique "(X)" anywhere wins over a leading letter
        ("B.\nExplanation: (A) is wrong", "A"),
    ],
)
def test_extract_choice_letter_messy(reply, expected):
    assert extract_choice_letter(reply, 4) == expected


def test_extract_choice_letter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_choices"):
        extract_choice_letter("A", 0)
    with pytest.raises(ValueError, match="text"):
        extract_choice_letter(None, 4)


@pytest.mark.parametrize(
    "reply, expected",
    [("3", "3"), ("There are three dots.", "3"), ("count: 4.0", "4"), ("07 objects", "7"), ("2 or maybe three", "2"), ("none", None)],
)
def test_extract_number(reply, expected):
    assert extract_number(reply) == expected


def test_normalize_number():
    assert normalize_number("3.50") == "3.5"
    assert normalize_number(5) == "5"
    assert normalize_number("twelve") == "12"
    assert normalize_number("abc") is None


def test_score_reply_multiple_choice_and_numeric():
    assert score_reply("(B)", "(B)", 4) == ("B", True)
    assert score_reply("A", "B", 4) == ("A", False)
    assert score_reply("It is (A) or (C)", "A", 4) == (None, False)
    assert score_reply("five", "5", 0) == ("5", True)
    assert score_reply("6 dots", "5", 0) == ("6", False)


def test_eval_result_average_is_per_task_mean():
    result = EvalResult()
    for correct in (True, True, True, False):
        result.add("counting", correct)
    result.add("jigsaw", False)
    assert result.per_task["counting"].accuracy == 0.75
    assert result.average == pytest.approx((0.75 + 0.0) / 2)
    assert result.overall == pytest.approx(3 / 5)
    d = result.to_dict()
    assert d["per_task"]["jigsaw"] == {"accuracy": 0.0, "correct": 0, "total": 1}
    assert math.isnan(EvalResult().average)


def test_format_table_lists_every_task_and_column():
    table = format_table({"counting": {"acc": 0.5, "chance": 0.25}, "jigsaw": {"acc": 1.0, "chance": None}}, ["acc", "chance"])
    lines = table.splitlines()
    assert lines[0].split() == ["task", "acc", "chance"]
    assert lines[2].split() == ["counting", "50.0", "25.0"]
    assert lines[3].split() == ["jigsaw", "100.0", "-"]
