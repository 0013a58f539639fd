"""Leak-free data: BLINK needs a disjoint split file to train, runs record their training items'
fingerprints and their validation split, livr-eval refuses (or reports) items that were trained on,
and resumed or evaluated runs reuse the recorded validation split."""
import dataclasses
import json

import pytest
from PIL import Image

from livr_model.app.config import TrainConfig
from livr_model.app.data import blink, load_examples, make_synthetic_dataset, save_jsonl, split_data
from livr_model.app.data.fingerprint import example_fingerprint
from livr_model.app.cli import eval_main, train_main
from livr_model.app.data.records import TRAIN_FINGERPRINTS, VALIDATION_SPLIT, DataSplit, check_overlap, write_data_records
from livr_model.app.tiny import build_tiny_model, build_tiny_processor, save_tiny
from livr_model.app.train import train
from test_train import tiny_setup

BLINK_ITEMS = 10


def fake_blink_rows(name, split, cache_dir=None):
    rows = []
    for i in range(BLINK_ITEMS):
        rows.append({"idx": f"val_{name}_{i}", "image_1": Image.new("RGB", (28, 28), (i, 3 * i, 7)), "image_2": None,
                     "question": f"{name} question {i}?", "choices": ["yes", "no"], "answer": "(A)" if i % 2 else "(B)"})
    return rows


@pytest.fixture
def offline_blink(monkeypatch):
    monkeypatch.setattr(blink, "load_rows", fake_blink_rows)


def test_blink_refuses_to_train_on_what_it_evaluates(offline_blink):
    cfg = TrainConfig(data="blink:Counting")
    with pytest.raises(ValueError, match="--blink-split"):
        load_examples("blink:Counting", cfg, split="train")
    # Evaluation without a split file scores all of val.
    assert len(load_examples("blink:Counting", cfg, split="val")) == BLINK_ITEMS


def test_a_split_file_makes_train_and_eval_disjoint(offline_blink, tmp_path):
    path = tmp_path / "split.json"
    split = blink.write_blink_split(path, ["Counting", "Jigsaw"], eval_fraction=0.3, seed=1)
    assert split == blink.write_blink_split(tmp_path / "again.json", ["Counting", "Jigsaw"], eval_fraction=0.3, seed=1)
    cfg = TrainConfig(data="blink:Counting,Jigsaw", blink_split=str(path))
    train = load_examples("blink:Counting,Jigsaw", cfg, split="train")
    evaluation = load_examples("blink:Counting,Jigsaw", cfg, split="val")
    assert {e.task for e in train} == {e.task for e in evaluation} == {"Counting", "Jigsaw"}
    assert len(train) + len(evaluation) == 2 * BLINK_ITEMS and len(evaluation) == 2 * round(0.3 * BLINK_ITEMS)
    train_ids = {e.meta["idx"] for e in train}
    assert not train_ids & {e.meta["idx"] for e in evaluation}
    assert not {example_fingerprint(e, with_answer=False) for e in train} & \
        {example_fingerprint(e, with_answer=False) for e in evaluation}


def test_bad_split_files_are_refused(offline_blink, tmp_path):
    path = tmp_path / "split.json"
    cfg = TrainConfig(data="blink:Counting", blink_split=str(path))
    path.write_text(json.dumps({"format": "livr-blink-split", "tasks": {"Counting": {
        "train": ["val_Counting_0", "val_Counting_1"], "eval": ["val_Counting_1"]}}}))
    with pytest.raises(ValueError, match="in both train and eval"):
        load_examples("blink:Counting", cfg, split="train")
    path.write_text(json.dumps({"format": "livr-blink-split", "tasks": {"Counting": {"train": ["val_Counting_99"], "eval": []}}}))
    with pytest.raises(ValueError, match="not BLINK val items"):
        load_examples("blink:Counting", cfg, split="train")
    with pytest.raises(ValueError, match="no entry for Jigsaw"):
        load_examples("blink:Jigsaw", cfg, split="train")
    with pytest.raises(ValueError, match="is not a file"):
        load_examples("blink:Counting", TrainConfig(data="x", blink_split=str(tmp_path / "missing.json")), split="train")


def _jsonl(tmp_path, name, examples):
    path = tmp_path / f"{name}.jsonl"
    save_jsonl(examples, path, tmp_path / f"{name}_images")
    return path


def test_held_out_split_is_recorded_and_reused(tmp_path):
    pool = make_synthetic_dataset("counting", 20, seed=3, image_size=28)
    path = _jsonl(tmp_path, "train", pool)
    cfg = TrainConfig(data=str(path), val_fraction=0.25, seed=5)
    first = split_data(cfg)
    assert first.source == "held_out" and len(first.held_out) == 5
    write_data_records(tmp_path, first)
    record = json.loads((tmp_path / VALIDATION_SPLIT).read_text())
    assert record["held_out_indices"] == first.held_out
    train_record = json.loads((tmp_path / TRAIN_FINGERPRINTS).read_text())
    assert train_record["items"] == [example_fingerprint(e, with_answer=False) for e in first.train]

    # Another seed would hold out other items; a run with a record keeps the recorded ones.
    other_seed = TrainConfig(data=str(path), val_fraction=0.25, seed=6)
    assert split_data(other_seed).held_out != first.held_out
    reused = split_data(other_seed, record_dir=tmp_path)
    assert reused.held_out == first.held_out
    assert [example_fingerprint(e) for e in reused.val] == [example_fingerprint(e) for e in first.val]

    # Data that changed under the run is an error, not a silently different validation set.
    _jsonl(tmp_path, "train", pool[:-1])
    with pytest.raises(ValueError, match="changed since the run started"):
        split_data(cfg, record_dir=tmp_path)


def test_validation_repeats_of_training_items_are_left_out(tmp_path):
    train = make_synthetic_dataset("counting", 6, seed=0, image_size=28)
    val = train[:2] + make_synthetic_dataset("jigsaw", 3, seed=1, image_size=28)
    cfg = TrainConfig(data=str(_jsonl(tmp_path, "t", train)), val_data=str(_jsonl(tmp_path, "v", val)))
    split = split_data(cfg)
    assert len(split.val) == 3 and split.extra["dropped_training_repeats"] == 2
    assert {e.task for e in split.val} == {"jigsaw"}


def test_overlap_is_refused_or_reported(tmp_path):
    train = make_synthetic_dataset("counting", 6, seed=0, image_size=28)
    unseen = make_synthetic_dataset("jigsaw", 3, seed=1, image_size=28)
    run = tmp_path / "run"
    write_data_records(run, DataSplit(train, [], "none"))
    checkpoint = run / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    mixed = train[:4] + unseen
    with pytest.raises(ValueError, match="4 of 7 evaluation items were in the training data"):
        check_overlap(checkpoint, mixed, allow=False)
    report = check_overlap(checkpoint, mixed, allow=True)
    assert report == {"checked": True, "overlap": 4, "overlap_per_task": {"counting": 4}}
    assert check_overlap(run, unseen, allow=False)["overlap"] == 0
    with pytest.raises(ValueError, match="cannot be checked"):
        check_overlap(tmp_path / "elsewhere", unseen, allow=False)


def test_livr_eval_refuses_training_items_end_to_end(tmp_path, capsys):
    processor = build_tiny_processor(28)
    save_tiny(build_tiny_model(processor, text_hidden=64, vision_hidden=32, vision_depth=1), processor, tmp_path / "base")
    data = _jsonl(tmp_path, "train", make_synthetic_dataset("counting", 10, seed=0, image_size=28))
    out = tmp_path / "run"
    assert train_main(["--model", str(tmp_path / "base"), "--data", str(data), "--val-fraction", "0.2", "--latents", "2",
                       "--stage-epochs", "1", "0", "--grad-accum", "4", "--max-new-tokens", "2", "--output-dir", str(out),
                       "--no-progress"]) == 0
    trained = json.loads((out / TRAIN_FINGERPRINTS).read_text())
    assert trained["num_examples"] == 8 and len(trained["items"]) == 8
    assert eval_main(["--checkpoint", str(out), "--data", str(data), "--no-probes", "--method", "likelihood"]) == 2
    assert "livr-eval: error: 8 of 10 evaluation items were in the training data" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(out), "--data", str(data), "--no-probes", "--method", "likelihood",
                      "--allow-overlap", "--output-dir", str(tmp_path / "e1")]) == 0
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["training_overlap"]["overlap"] == 8 and "8 of 10 evaluation items were trained on" in capsys.readouterr().out
    # Without --data: the recorded held-out items, none of them trained on.
    assert eval_main(["--checkpoint", str(out), "--no-probes", "--method", "likelihood", "--output-dir", str(tmp_path / "e2")]) == 0
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert metrics["num_examples"] == 2 and metrics["training_overlap"]["overlap"] == 0


def test_a_run_given_examples_in_memory_cannot_rebuild_its_validation(tmp_path):
    train = make_synthetic_dataset("counting", 4, seed=0, image_size=28)
    write_data_records(tmp_path, DataSplit(train[:3], train[3:], "given"))
    cfg = TrainConfig(data=str(_jsonl(tmp_path, "t", train)))
    with pytest.raises(ValueError, match="in memory"):
        split_data(cfg, record_dir=tmp_path)


def test_a_resumed_run_reads_its_recorded_split(tmp_path):
    pool = make_synthetic_dataset("counting", 10, seed=0, image_size=28)
    cfg = TrainConfig(data=str(_jsonl(tmp_path, "train", pool)), val_fraction=0.2, latents=2, stage_epochs=(1, 1),
                      grad_accum=4, max_new_tokens=2, output_dir=str(tmp_path / "run"), progress=False, max_steps=1)
    model, processor = tiny_setup()
    first = train(cfg, model=model, processor=processor)
    record = json.loads((tmp_path / "run" / VALIDATION_SPLIT).read_text())
    assert [example_fingerprint(pool[i]) for i in record["held_out_indices"]] == \
        [example_fingerprint(e) for e in first.val_examples]
    # A record that no longer fits the data stops the resumed run before it trains.
    record["pool_size"] = len(pool) + 1
    (tmp_path / "run" / VALIDATION_SPLIT).write_text(json.dumps(record))
    model, processor = tiny_setup()
    with pytest.raises(ValueError, match="changed since the run started"):
        train(dataclasses.replace(cfg, resume=True, max_steps=None), model=model, processor=processor)


def test_blink_is_not_a_validation_set(offline_blink, tmp_path):
    path = tmp_path / "split.json"
    blink.write_blink_split(path, ["Counting"])
    cfg = TrainConfig(data="blink:Counting", val_data="blink:Counting", blink_split=str(path))
    with pytest.raises(ValueError, match="tunes on the test set"):
        split_data(cfg)
    held_out = split_data(TrainConfig(data="blink:Counting", blink_split=str(path), val_fraction=0.2))
    assert len(held_out.train) + len(held_out.val) == BLINK_ITEMS // 2 and held_out.source == "held_out"
