"""BLINK's command-line paths report the user's mistakes and an unreachable hub in one line, exit
status 2, as every other tool does: the split writer (``python -m livr_model.app.data.blink``, which
the README and livr-train's own error tell users to run) and ``livr-train --data blink:...``."""
import json

import pytest

from livr_model.app import cli
from livr_model.app.cli_errors import EXIT_USAGE
from livr_model.app.data import blink

SPLIT_PROG = "python -m livr_model.app.data.blink"


def one_error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: "), err
    return err.strip()[len(f"{prog}: error: "):]


@pytest.fixture
def hub_unreachable(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'BLINK-Benchmark/BLINK' on the Hub\n(OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def test_split_writer_unknown_subtask_is_one_line(tmp_path, capsys):
    assert blink.main(["--tasks", "Countin", "--out", str(tmp_path / "split.json")]) == EXIT_USAGE
    assert one_error_line(capsys.readouterr().err, SPLIT_PROG).startswith("subtask must be one of the BLINK subtasks")
    assert not (tmp_path / "split.json").exists()


def test_split_writer_without_a_hub_is_one_line(tmp_path, capsys, hub_unreachable):
    assert blink.main(["--tasks", "Counting", "--out", str(tmp_path / "split.json")]) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err, SPLIT_PROG)
    assert line.startswith("could not load BLINK subtask 'Counting' (split 'val') from the Hugging Face hub"), line
    assert "Hub (OfflineModeIsEnabled)" in line


def test_train_on_blink_without_a_hub_is_one_line(tmp_path, capsys, hub_unreachable):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"format": blink.SPLIT_FORMAT, "tasks": {"Counting": {"train": ["1"], "eval": ["2"]}}}))
    code = cli.train_main(["--data", "blink:Counting", "--blink-split", str(split), "--output-dir", str(tmp_path / "run")])
    assert code == EXIT_USAGE
    assert one_error_line(capsys.readouterr().err, "livr-train").startswith("could not load BLINK subtask 'Counting'")


def test_library_callers_still_catch_a_runtime_error(hub_unreachable):
    with pytest.raises(RuntimeError, match="could not load BLINK subtask 'Counting'"):
        blink.load_blink("Counting")
