"""Bad data is refused with file:line before anything is trained: non-string answers, duplicate
choices, image paths that leave the data folder, unreadable images; a missing data file is found
before the model is loaded; duplicates and train/validation overlap are warned about."""
import json
import warnings

import pytest
from PIL import Image

from livr_model.app import train as train_module
from livr_model.app.config import TrainConfig
from livr_model.app.data import load_jsonl, make_synthetic_dataset, prepare_data, save_jsonl

GOOD_LINE = {"images": ["a.png"], "question": "Q?", "choices": ["x", "y"], "answer": "A"}
# Pixels above which the test's PIL refuses an image (PIL's default limit is ~179M; too big to build here).
SMALL_PIXEL_LIMIT = 100


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    return tmp_path


@pytest.mark.parametrize(
    "answer_json, shown",
    [("null", "null"), ("NaN", "NaN"), ("7", "7"), ("1.5", "1.5"), ("true", "true"), ('["A"]', r'\["A"\]')],
)
def test_non_string_answer_is_refused_with_its_line(folder, answer_json, shown):
    bad = '{"images": ["a.png"], "question": "How many?", "answer": %s}' % answer_json
    path = write_jsonl(folder / "d.jsonl", [GOOD_LINE, bad])
    with pytest.raises(ValueError, match=rf"d.jsonl:2: answer must be a string .*; got {shown}"):
        load_jsonl(path)


@pytest.mark.parametrize("choices", [["x", "x"], ["cat", "dog", "cat "]])
def test_duplicate_choices_are_refused_with_their_line(folder, choices):
    path = write_jsonl(folder / "d.jsonl", [GOOD_LINE, dict(GOOD_LINE, choices=choices)])
    with pytest.raises(ValueError, match=r"d.jsonl:2: choice .* is given twice"):
        load_jsonl(path)


@pytest.mark.parametrize("image_path", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_paths_outside_the_data_folder_need_the_flag(tmp_path, image_path):
    data_dir = tmp_path / "data"
    (data_dir / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    image_path = str(outside) if image_path == "ABSOLUTE" else image_path
    path = write_jsonl(data_dir / "d.jsonl", [dict(GOOD_LINE, images=[image_path])])
    with pytest.raises(ValueError, match=r"d.jsonl:1: image path .* is absolute or leaves the data folder.*--allow-outside-paths"):
        load_jsonl(path)
    (example,) = load_jsonl(path, allow_outside_paths=True)
    assert example.images[0].size == (16, 16)
    cfg = TrainConfig(data=str(path), val_fraction=0.0)
    with pytest.raises(ValueError, match="leaves the data folder"):
        prepare_data(cfg)
    assert len(prepare_data(TrainConfig(data=str(path), val_fraction=0.0, allow_outside_paths=True))[0]) == 1


def test_paths_inside_the_data_folder_are_fine(folder):
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "b.png")
    path = write_jsonl(folder / "d.jsonl", [dict(GOOD_LINE, images=["sub/../a.png", "./sub/b.png"])])
    assert [i.size for i in load_jsonl(path)[0].images] == [(16, 16), (8, 8)]


def _truncated_png(path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, error",
    [
        (_truncated_png, "truncated"),
        (lambda p: p.write_text("this is not an image"), "UnidentifiedImageError"),
        (lambda p: p.write_bytes(b""), "UnidentifiedImageError"),
    ],
)
def test_unreadable_image_names_the_file_and_line(folder, make, error):
    make(folder / "bad.png")
    path = write_jsonl(folder / "d.jsonl", [GOOD_LINE, GOOD_LINE, dict(GOOD_LINE, images=["bad.png"])])
    with pytest.raises(ValueError, match=rf"d.jsonl:3: image '.*bad.png' cannot be read: .*{error}"):
        load_jsonl(path)


def test_decompression_bomb_names_the_file_and_line(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_PIXEL_LIMIT)
    path = write_jsonl(folder / "d.jsonl", [GOOD_LINE])
    with pytest.raises(ValueError, match=r"d.jsonl:1: image '.*a.png' cannot be read: DecompressionBombError"):
        load_jsonl(path)


def test_missing_data_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train_module, "load_model_and_processor", no_model)
    cfg = TrainConfig(data=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="missing.jsonl' is not a file"):
        train_module.train(cfg)


def _jsonl_of(tmp_path, name, examples):
    path = tmp_path / f"{name}.jsonl"
    save_jsonl(examples, path, tmp_path / f"{name}_images")
    return str(path)


def test_training_file_as_validation_and_duplicates_are_warned_with_counts(tmp_path):
    examples = make_synthetic_dataset("counting", 6, seed=0, image_size=28)
    train_path = _jsonl_of(tmp_path, "train", examples + examples[:2])
    with pytest.warns(UserWarning) as caught:
        prepare_data(TrainConfig(data=train_path, val_data=train_path))
    messages = [str(w.message) for w in caught]
    assert any("is given again as validation data" in m for m in messages)
    assert any(m.startswith("2 of 8 training examples repeat another one (2 distinct") for m in messages)
    assert any(m.startswith("8 of 8 validation examples are also training examples") for m in messages)


def test_clean_data_gives_no_warning(tmp_path):
    train_path = _jsonl_of(tmp_path, "train", make_synthetic_dataset("counting", 6, seed=0, image_size=28))
    val_path = _jsonl_of(tmp_path, "val", make_synthetic_dataset("counting", 3, seed=1, image_size=28))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val = prepare_data(TrainConfig(data=train_path, val_data=val_path))
    assert (len(train), len(val)) == (6, 3)


@pytest.mark.parametrize(
    "val_data, message",
    [
        ("missing.jsonl", "val_data 'missing.jsonl' is not a file: nothing is there"),
        ("synthetic:countng", "val_data 'synthetic:countng': synthetic tasks must be among ['counting', "),
    ],
)
def test_validation_data_errors_name_val_data(folder, val_data, message):
    """A mistake in --val-data is reported as such, not as one in --data."""
    train = write_jsonl(folder / "train.jsonl", [GOOD_LINE] * 2)
    cfg = TrainConfig(data=str(train), val_data=str(folder / val_data) if val_data.endswith(".jsonl") else val_data)
    with pytest.raises(ValueError) as caught:
        prepare_data(cfg)
    expected = message.replace("'missing.jsonl'", repr(str(folder / "missing.jsonl")))
    assert str(caught.value).startswith(expected), str(caught.value)


def test_data_errors_from_a_source_name_data_once():
    with pytest.raises(ValueError) as caught:
        prepare_data(TrainConfig(data="synthetic:countng"))
    assert str(caught.value).startswith("data 'synthetic:countng': synthetic tasks must be among"), str(caught.value)
    assert str(caught.value).count("synthetic:countng") == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.jsonl", "data 'missing.jsonl' is not a file: nothing is there"),
        ("sub/train.json", "data 'sub/train.json' is not a file: nothing is there"),
        ("sub", "data 'sub' is not a file but a folder; name a JSONL file in it (it holds a.jsonl, b.jsonl)"),
        ("blnk:Counting", "data 'blnk:Counting' is not a file, nor synthetic:<task>[,<task>], nor blink:<Subtask>"),
    ],
)
def test_data_spec_that_names_no_file_says_why(tmp_path, monkeypatch, spec, message):
    """A missing file, a folder, and a spec that is neither a path nor a source are told apart."""
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / "sub" / name, [GOOD_LINE])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        prepare_data(TrainConfig(data=spec))
    assert str(caught.value).startswith(message), str(caught.value)
