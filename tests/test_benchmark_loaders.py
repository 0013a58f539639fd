"""Evaluation loaders (MMVP, V*Bench, SAT, VSP) on files written here in each benchmark's public
layout, MMVP's paired metric, and errors that name file:line."""
import csv
import io
import json
from collections import Counter

import pytest
from PIL import Image

from livr_model.app.data.benchmarks import (BenchmarkError, load_mmvp, load_sat, load_vsp, load_vstar,
                                            mmvp_paired_accuracy, spec_loader)
from livr_model.app.data import load_examples
from livr_model.prompts import LETTERS

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def picture(index, size=(64, 48)):
    return Image.new("RGB", size, COLORS[index % len(COLORS)])


MMVP_ROWS = [
    ("1", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"),
    ("2", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b)"),
    ("3", "Is the dog facing left, or right?", "(a) Left (b) Right", "(b)"),
    ("4", "Is the dog facing left, or right?", "(a) Left (b) Right", "(a)"),
]


def write_mmvp(root, rows=MMVP_ROWS, images=True):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Questions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        writer.writerows(rows)
    if images:
        (root / "MMVP Images").mkdir(exist_ok=True)
        for index, *_ in rows:
            picture(int(index)).save(root / "MMVP Images" / f"{index}.jpg")
    return root


def test_mmvp_rows_in_livr_schema(tmp_path):
    examples = load_mmvp(write_mmvp(tmp_path / "MMVP"))
    assert [e.task for e in examples] == ["MMVP"] * 4
    assert examples[0].choices == ["Open", "Closed"] and examples[0].answer == "A"
    assert examples[1].answer == "B" and examples[2].answer == "B" and examples[3].answer == "A"
    assert examples[2].question == "Is the dog facing left, or right?"
    assert [e.meta["pair"] for e in examples] == [0, 0, 1, 1]
    assert examples[3].images[0].getpixel((0, 0)) == pytest.approx(COLORS[4], abs=3)


def test_mmvp_pair_counts_only_when_both_questions_are_right(tmp_path):
    examples = load_mmvp(write_mmvp(tmp_path / "MMVP"))
    score = mmvp_paired_accuracy(examples, [True, True, True, False])
    assert score["pair_accuracy"] == 0.5 and score["pairs_right"] == 1 and score["question_accuracy"] == 0.75
    # Half the questions right, one in each pair: no pair counts.
    score = mmvp_paired_accuracy(examples, [True, False, False, True])
    assert score["pair_accuracy"] == 0.0 and score["question_accuracy"] == 0.5
    assert mmvp_paired_accuracy(examples, [True] * 4)["pair_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"pairs \[1\] do not hold exactly two"):
        mmvp_paired_accuracy(examples[:3], [True] * 3)
    with pytest.raises(ValueError, match="one bool per example"):
        mmvp_paired_accuracy(examples, [True])


def test_mmvp_errors_name_file_and_line(tmp_path):
    bad = list(MMVP_ROWS)
    bad[1] = ("2", "Open or closed?", "(a) Open (b) Closed", "(c)")
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:3: Correct Answer must be one of"):
        load_mmvp(write_mmvp(tmp_path / "a", bad))
    bad[1] = ("2", "Open or closed?", "Open or Closed", "(a)")
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:3: Options must read"):
        load_mmvp(write_mmvp(tmp_path / "b", bad))
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:2: image .*MMVP Images/1\.jpg' not found"):
        load_mmvp(write_mmvp(tmp_path / "c", images=False))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "Questions.csv").write_text("Index,Question,Options\n1,q,(a) x (b) y\n")
    with pytest.raises(BenchmarkError, match=r"Questions\.csv:1: missing column\(s\) \['Correct Answer'\]"):
        load_mmvp(tmp_path / "d")
    with pytest.raises(BenchmarkError, match="not a directory"):
        load_mmvp(tmp_path / "nowhere")


def write_vstar(root, per_category=4):
    for c, category in enumerate(("direct_attributes", "relative_position")):
        folder = root / category
        folder.mkdir(parents=True)
        for index in range(per_category):
            name = f"sa_{c}{index:03d}"
            picture(index).save(folder / f"{name}.jpg")
            options = ([f"The colour of the cup is {w}." for w in ("red", "green", "blue", "white")]
                       if category == "direct_attributes" else ["The cat is on the left of the dog.",
                                                                "The cat is on the right of the dog."])
            (folder / f"{name}.json").write_text(json.dumps(
                {"target_object": ["cup"], "bbox": [[1, 2, 3, 4]], "question": f"Question {c}-{index}?", "options": options}))
    return root


def test_vstar_correct_option_is_balanced_and_kept(tmp_path):
    root = write_vstar(tmp_path / "vstar", per_category=8)
    examples = load_vstar(root)
    assert Counter(e.task for e in examples) == {"VStar_direct_attributes": 8, "VStar_relative_position": 8}
    for example in examples:
        assert example.choices[LETTERS.index(example.answer)] == example.meta["original_options"][0]
        assert sorted(example.choices) == sorted(example.meta["original_options"])
    four = Counter(e.answer for e in examples if len(e.choices) == 4)
    two = Counter(e.answer for e in examples if len(e.choices) == 2)
    assert four == {"A": 2, "B": 2, "C": 2, "D": 2} and two == {"A": 4, "B": 4}
    assert [e.answer for e in load_vstar(root)] == [e.answer for e in examples]


def test_vstar_errors_name_the_annotation(tmp_path):
    root = write_vstar(tmp_path / "vstar", per_category=1)
    annotation = root / "relative_position" / "sa_1000.json"
    annotation.write_text(json.dumps({"question": "Where?", "options": ["only one"]}))
    with pytest.raises(BenchmarkError, match=r"sa_1000\.json:1: 'options' must list at least two"):
        load_vstar(root)
    annotation.write_text('{"question": "Where?",\n "options": [}')
    with pytest.raises(BenchmarkError, match=r"sa_1000\.json:2: not valid JSON"):
        load_vstar(root)
    annotation.unlink()
    with pytest.raises(BenchmarkError, match=r"sa_1000\.jpg: no annotation sa_1000\.json"):
        load_vstar(root)


def png_bytes(index):
    buffer = io.BytesIO()
    picture(index).save(buffer, format="PNG")
    return buffer.getvalue()


def write_sat(path, rows):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet
    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


SAT_ROWS = [
    {"image_bytes": [{"bytes": png_bytes(0), "path": None}, {"bytes": png_bytes(1), "path": None}],
     "question": "Did the chair move left or right between the frames?", "answers": ["left", "right"],
     "correct_answer": "left", "question_type": "obj_movement"},
    {"image_bytes": [{"bytes": png_bytes(2), "path": None}],
     "question": "Is the lamp closer to the camera than the sofa?", "answers": ["yes", "no"],
     "correct_answer": "no", "question_type": "other_distance"},
    {"image_bytes": [{"bytes": png_bytes(3), "path": None}],
     "question": "Which way should you turn to face the door?", "answers": ["left", "right", "around"],
     "correct_answer": "around", "question_type": "goal_aim"},
    {"image_bytes": [{"bytes": png_bytes(4), "path": None}],
     "question": "Did the camera move forward?", "answers": ["yes", "no"],
     "correct_answer": "yes", "question_type": "ego_movement"},
]


def test_sat_rows_in_livr_schema(tmp_path):
    examples = load_sat(write_sat(tmp_path / "SAT_val.parquet", SAT_ROWS))
    assert [e.task for e in examples] == ["SAT/obj_movement", "SAT/other_distance", "SAT/goal_aim", "SAT/ego_movement"]
    assert [len(e.images) for e in examples] == [2, 1, 1, 1]
    assert examples[0].images[1].getpixel((0, 0)) == COLORS[1]
    for example, row in zip(examples, SAT_ROWS):
        assert example.choices[LETTERS.index(example.answer)] == row["correct_answer"]
        assert sorted(example.choices) == sorted(row["answers"])
    two = Counter(e.answer for e in examples if len(e.choices) == 2)
    assert two == {"A": 2, "B": 1} or two == {"A": 1, "B": 2}
    assert len(load_sat(tmp_path, limit=2)) == 2


def test_sat_errors_name_file_and_row(tmp_path):
    rows = [dict(row) for row in SAT_ROWS]
    rows[2]["correct_answer"] = "backwards"
    with pytest.raises(BenchmarkError, match=r"bad\.parquet:row 2: correct_answer 'backwards' is not among answers"):
        load_sat(write_sat(tmp_path / "bad.parquet", rows))
    rows = [dict(row) for row in SAT_ROWS]
    rows[1]["image_bytes"] = [{"bytes": b"not an image", "path": None}]
    with pytest.raises(BenchmarkError, match=r"broken\.parquet:row 1: image_bytes\[0\] is not a readable image"):
        load_sat(write_sat(tmp_path / "broken.parquet", rows))
    with pytest.raises(BenchmarkError, match="missing column"):
        load_sat(write_sat(tmp_path / "cols.parquet", [{"question": "q", "answers": ["a", "b"]}]))


def write_vsp(root, items):
    """items: (level, id, plan, answer)."""
    for level, index, plan, answer in items:
        base = root / "maps" / f"level_step{level}"
        for sub in ("img", "question", "answer"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        picture(index).save(base / "img" / f"{index}.png")
        (base / "question" / f"{index}.txt").write_text(plan)
        (base / "answer" / f"{index}.txt").write_text(answer)
    return root


def test_vsp_spatial_reasoning_rows(tmp_path):
    root = write_vsp(tmp_path / "task4", [(1, 0, "R", "Y"), (1, 1, "D", "N"), (3, 0, "RDL", "N")])
    examples = load_vsp(root)
    assert [e.meta["level"] for e in examples] == [1, 1, 3]
    assert [e.answer for e in examples] == ["A", "B", "B"]
    assert examples[0].choices == ["Yes", "No"] and {e.task for e in examples} == {"VSP_spatial_reasoning"}
    assert examples[2].question.endswith("Right, Down, Left?")


def test_vsp_errors_name_the_file(tmp_path):
    root = write_vsp(tmp_path / "a", [(1, 0, "R", "maybe")])
    with pytest.raises(BenchmarkError, match=r"answer/0\.txt:1: answer must be 'Y' or 'N'"):
        load_vsp(root)
    root = write_vsp(tmp_path / "b", [(1, 0, "RX", "Y")])
    with pytest.raises(BenchmarkError, match=r"question/0\.txt:1: an action plan must be letters"):
        load_vsp(root)
    (tmp_path / "c").mkdir()
    with pytest.raises(BenchmarkError, match="no level_step"):
        load_vsp(tmp_path / "c")


def test_spec_loaders_serve_evaluation_and_refuse_training(tmp_path):
    root = write_mmvp(tmp_path / "MMVP")
    load_spec = spec_loader("mmvp")
    assert [e.answer for e in load_spec(str(root), None, "val")] == ["A", "B", "B", "A"]
    with pytest.raises(ValueError, match="evaluation benchmark"):
        load_spec(str(root), None, "train")
    vstar = write_vstar(tmp_path / "vstar")

    class Config:
        seed = 3

    assert [e.answer for e in spec_loader("vstar")(str(vstar), Config(), "val")] == [e.answer for e in load_vstar(vstar, seed=3)]
    with pytest.raises(ValueError, match="name must be one of"):
        spec_loader("blink")


def test_data_specs_name_the_benchmarks(tmp_path):
    root = write_mmvp(tmp_path / "MMVP")
    assert [e.answer for e in load_examples(f"mmvp:{root}", None, split="val")] == ["A", "B", "B", "A"]
    with pytest.raises(ValueError, match="evaluation benchmark"):
        load_examples(f"mmvp:{root}", None, split="train")
