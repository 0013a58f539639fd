"""livr-study reuses a finished cell only under the settings it ran with: a rerun may add modes,
tasks or seeds, but a changed budget (learning rate, examples, epochs, ...) is refused instead of
being reported over cells that ran with the old one."""
import json

import pytest

from livr_model.app import study
from livr_model.app.cli_errors import EXIT_USAGE
from livr_model.app.study import CELL_FILE, Grid


@pytest.fixture
def ran(monkeypatch):
    cells = []

    def fake_cell(grid, base, task, mode, seed, out):
        cells.append((task, mode, seed, grid.lr))
        record = {"task": task, "mode": mode, "seed": seed, "accuracy": 0.6, "learned": True}
        out.mkdir(parents=True, exist_ok=True)
        (out / CELL_FILE).write_text(json.dumps(record))
        return dict(record, cpu_seconds=1.0)

    monkeypatch.setattr(study, "run_cell", fake_cell)
    return cells


def grid(**changes):
    return Grid(**{**dict(model="some/model", modes=("sft",), tasks=("data.jsonl",), seeds=(0,)), **changes})


def test_more_seeds_reuse_the_finished_cells(tmp_path, ran):
    study.run_study(grid(), tmp_path, log=lambda line: None)
    study.run_study(grid(seeds=(0, 1), modes=("sft", "livr")), tmp_path, log=lambda line: None)
    assert ran == [("data.jsonl", "sft", 0, grid().lr), ("data.jsonl", "livr", 0, grid().lr),
                   ("data.jsonl", "sft", 1, grid().lr), ("data.jsonl", "livr", 1, grid().lr)]


@pytest.mark.parametrize("changes", [dict(lr=1e-3), dict(train_examples=50), dict(stage_epochs=(1, 1)),
                                     dict(train_overrides={"seed": 3})])
def test_changed_settings_are_refused(tmp_path, ran, changes):
    study.run_study(grid(), tmp_path, log=lambda line: None)
    ran.clear()
    (key, _), = changes.items()
    with pytest.raises(ValueError, match=rf"finished cells ran with {key}=.*this grid has {key}="):
        study.run_study(grid(**changes), tmp_path, log=lambda line: None)
    assert ran == []


def test_changed_settings_are_one_line_from_the_command(tmp_path, ran, capsys):
    study.run_study(grid(), tmp_path, log=lambda line: None)
    (tmp_path / "grid.yaml").write_text("model: some/model\nmodes: [sft]\ntasks: [data.jsonl]\nseeds: [0]\nlr: 1.0e-3\n")
    code = study.study_main(["--output-dir", str(tmp_path), "--grid", str(tmp_path / "grid.yaml")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"livr-study: error: --output-dir {str(tmp_path)!r}: its finished cells ran with lr=")
