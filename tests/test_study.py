"""livr-study's aggregation on fabricated run directories with known numbers, its grid checks and
its resume (finished cells are skipped)."""
import csv
import json

import pytest

from livr_model.app import study
from livr_model.app.study import CELL_FILE, Grid, aggregate, cell_dir, collect, load_grid, write_study


def fabricate(study_dir, task, mode, seed, accuracy, forced=None, attention=None):
    out = cell_dir(study_dir, task, mode, seed)
    out.mkdir(parents=True)
    record = {"task": task, "mode": mode, "seed": seed, "accuracy": accuracy, "majority": 0.3, "chance": 0.25,
              "latents_removed": None, "bottleneck_forced": forced, "answer_to_latent_attention": attention,
              "distinct_answers": 4, "learned": accuracy > 0.4, "cpu_seconds": 10.0 + seed}
    (out / CELL_FILE).write_text(json.dumps(record))


def test_aggregate_means_and_spreads_over_seeds(tmp_path):
    for seed, acc, forced in ((0, 0.8, 0.6), (1, 0.6, 0.4), (2, 0.7, 0.5)):
        fabricate(tmp_path, "counting", "livr", seed, acc, forced, attention=0.1 * (seed + 1))
    for seed, acc in ((0, 0.5), (1, 0.3)):
        fabricate(tmp_path, "counting", "sft", seed, acc)
    fabricate(tmp_path, "jigsaw", "sft", 0, 0.9)
    rows = {(r["task"], r["mode"]): r for r in aggregate(collect(tmp_path))}
    livr = rows[("counting", "livr")]
    assert livr["seeds"] == 3 and livr["learned"] == 3
    assert livr["accuracy_mean"] == pytest.approx(0.7)
    assert livr["accuracy_std"] == pytest.approx(0.1)
    assert livr["bottleneck_forced_mean"] == pytest.approx(0.5)
    assert livr["answer_to_latent_attention_mean"] == pytest.approx(0.2)
    assert livr["cpu_seconds_mean"] == pytest.approx(11.0)
    sft = rows[("counting", "sft")]
    assert sft["accuracy_mean"] == pytest.approx(0.4) and sft["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert sft["learned"] == 1 and sft["bottleneck_forced_mean"] is None
    single = rows[("jigsaw", "sft")]
    assert single["seeds"] == 1 and single["accuracy_std"] == 0.0


def test_a_cell_summarises_evaluate_models_metrics():
    predictions = ["A", "B", None, "C", "B"]
    metrics = {
        "accuracy": {"average": 0.6}, "majority": {"counting": 0.6, "jigsaw": 0.5},
        "chance": {"counting": 0.25, "jigsaw": 0.5}, "options": {"counting": 4, "jigsaw": 2},
        "predictions": [{"task": "counting", "prediction": p} for p in predictions],
        "probes": {"latents_removed": {"average": 0.3}, "bottleneck_forced": {"average": 0.55},
                   "answer_to_latent_attention": 0.07},
    }
    summary = study.summarize_metrics(metrics, 12.0)
    assert summary == pytest.approx({
        "accuracy": 0.6, "majority": 0.55, "chance": 0.375, "latents_removed": 0.3, "bottleneck_forced": 0.55,
        "answer_to_latent_attention": 0.07, "distinct_answers": 3, "cpu_seconds": 12.0,
        # 60% is not 10 points above the 55% majority rate.
        "learned": False, "below_chance": False, "top_answer": "B", "top_answer_share": 0.4,
    })


def test_a_cell_under_chance_is_flagged_with_its_preferred_answer(tmp_path):
    # The default grid's prompt-tuning cell: "D" for every A, B and C item and mostly "B" for the D items.
    answers = [letter for letter in "ABCD" for _ in range(25)]
    predictions = ["D" if a != "D" or i % 25 < 3 else "B" for i, a in enumerate(answers)]
    records = [{"task": "counting", "answer": a, "prediction": p, "correct": a == p} for a, p in zip(answers, predictions)]
    metrics = {"accuracy": {"average": 0.03}, "majority": {"counting": 0.25}, "chance": {"counting": 0.25},
               "options": {"counting": 4}, "predictions": records, "probes": {}}
    summary = study.summarize_metrics(metrics, 5.0)
    assert summary["below_chance"] and not summary["learned"]
    assert (summary["top_answer"], summary["top_answer_share"], summary["distinct_answers"]) == ("D", 0.78, 2)
    for seed in (0, 1):
        out = cell_dir(tmp_path, "counting", "prompt-tuning", seed)
        out.mkdir(parents=True)
        (out / CELL_FILE).write_text(json.dumps(dict(summary, task="counting", mode="prompt-tuning", seed=seed)))
    fabricate(tmp_path, "counting", "sft", 0, 0.9)
    # Recorded before cells carried the flag: judged from accuracy and chance (24% is within the margin).
    fabricate(tmp_path, "counting", "livr", 0, 0.1)
    fabricate(tmp_path, "counting", "mask-only", 0, 0.24)
    rows = {r["mode"]: r for r in write_study(tmp_path, collect(tmp_path))}
    assert [rows[m]["below_chance"] for m in ("prompt-tuning", "sft", "livr", "mask-only")] == [2, 0, 1, 0]
    md = (tmp_path / study.STUDY_MD).read_text()
    assert "- counting / prompt-tuning: 2 of 2 seeds, accuracy 3.0 ± 0.0% against chance 25.0%; most common " \
           "answer seed 0: 'D' on 78%; seed 1: 'D' on 78%" in md
    assert "- counting / livr: 1 of 1 seeds" in md
    assert "counting / sft:" not in md and "counting / mask-only:" not in md


def test_write_study_tables_and_plot(tmp_path):
    for seed, acc in ((0, 0.8), (1, 0.6)):
        fabricate(tmp_path, "counting", "livr", seed, acc, forced=0.55)
        fabricate(tmp_path, "counting", "sft", seed, acc - 0.2)
    write_study(tmp_path, collect(tmp_path), title="fabricated")
    with open(tmp_path / study.STUDY_CSV) as f:
        table = {(r["task"], r["mode"]): r for r in csv.DictReader(f)}
    assert float(table[("counting", "livr")]["accuracy_mean"]) == pytest.approx(0.7)
    assert float(table[("counting", "sft")]["accuracy_mean"]) == pytest.approx(0.5)
    md = (tmp_path / study.STUDY_MD).read_text()
    assert "| counting | livr | 2 | 2/2 | 70.0 ± 14.1 |" in md
    assert "| counting | sft | 2 |" in md and "55.0 ± 0.0" in md
    png = (tmp_path / study.STUDY_PNG).read_bytes()
    assert png.startswith(b"\x89PNG")
    # Other numbers, another picture.
    other = tmp_path / "other"
    for seed, acc in ((0, 0.3), (1, 0.35)):
        fabricate(other, "counting", "livr", seed, acc)
        fabricate(other, "counting", "sft", seed, acc)
    write_study(other, collect(other))
    assert (other / study.STUDY_PNG).read_bytes() != png


def test_write_study_without_cells_says_so(tmp_path):
    with pytest.raises(ValueError, match="no finished cells"):
        write_study(tmp_path, collect(tmp_path))


def test_finished_cells_are_skipped(tmp_path, monkeypatch):
    grid = Grid(model="some/model", modes=("sft", "livr"), tasks=("data.jsonl",), seeds=(0, 1))
    fabricate(tmp_path, "data.jsonl", "sft", 0, 0.5)
    ran = []

    def fake_cell(grid, base, task, mode, seed, out):
        ran.append((task, mode, seed))
        record = {"task": task, "mode": mode, "seed": seed, "accuracy": 0.6, "learned": True}
        out.mkdir(parents=True, exist_ok=True)
        (out / CELL_FILE).write_text(json.dumps(record))
        return dict(record, cpu_seconds=1.0)

    monkeypatch.setattr(study, "run_cell", fake_cell)
    rows = study.run_study(grid, tmp_path, log=lambda line: None)
    assert sorted(ran) == [("data.jsonl", "livr", 0), ("data.jsonl", "livr", 1), ("data.jsonl", "sft", 1)]
    assert {(r["mode"], r["seeds"]) for r in rows} == {("sft", 2), ("livr", 2)}
    ran.clear()
    study.run_study(grid, tmp_path, log=lambda line: None)
    assert ran == []


def test_grid_checks(tmp_path):
    with pytest.raises(ValueError, match="not registered"):
        Grid(modes=("livr", "nonsense"))
    with pytest.raises(ValueError, match="synthetic tasks only"):
        Grid(tasks=("counting", "mine.jsonl"))
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        Grid(seeds=3)
    path = tmp_path / "grid.yaml"
    path.write_text("modes: [sft, livr]\ntasks: [counting]\nseeds: [0, 1, 2]\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        load_grid(path)
    path.write_text("modes: [sft, livr]\ntasks: [counting]\nseeds: [0, 1, 2]\n")
    grid = load_grid(path)
    assert grid.modes == ("sft", "livr") and grid.seeds == (0, 1, 2)


def test_cells_use_the_grid_learning_rate_in_every_stage(tmp_path):
    # The demo lowers stage 2's rate; the study compares modes at the grid's one rate unless told.
    cfg = study.cell_config(Grid(), str(tmp_path / "base"), "counting", "livr", 0, tmp_path / "cell")
    assert cfg.lr == Grid().lr and cfg.stage2_lr is None
    told = study.cell_config(Grid(train_overrides={"stage2_lr": 1e-4}), str(tmp_path / "base"), "counting", "livr", 0,
                             tmp_path / "cell")
    assert told.stage2_lr == 1e-4
