"""A mistake in what the user gave is one line on stderr (``<prog>: error: ...``) and exit status 2
for every tool; ``--debug`` brings the traceback back; errors that are not about the input (bugs)
keep their traceback. All cases stop before any model is built or trained."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from livr_model.app import cli, data_cli, study
from livr_model.app import train as train_module
from livr_model.app.cli_errors import EXIT_USAGE, is_user_error, user_input
from livr_model.app.config import TrainConfig

from builder_sources import photo_folder

REPO = Path(__file__).resolve().parents[1]


def error_line(err: str, prog: str) -> str:
    """The single ``error:`` line of ``err`` (its text after the prefix); no traceback around it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0][len(f"{prog}: error: "):]


def test_train_bad_setting_is_one_line(capsys):
    assert cli.train_main(["--lr", "-1"]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-train").startswith("lr: expected a number > 0; got -1.0")


def test_train_missing_data_is_one_line(capsys):
    assert cli.train_main(["--output-dir", "unused"]) == EXIT_USAGE
    assert "--data is required" in error_line(capsys.readouterr().err, "livr-train")


def test_train_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path, capsys):
    """Raised inside train()'s setup (after the accelerator and the output-dir check)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "choices": ["a", "b"], "answer": "A", "images": []}\nnot json\n')
    code = cli.train_main(["--data", str(data), "--output-dir", str(tmp_path / "run")])
    assert code == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-train").startswith(f"{data}:2: not valid JSON")


def test_train_missing_local_model_folder_is_one_line(tmp_path, capsys):
    """A local path that is not there is named as such, not sent to the hub as a repo id."""
    missing = tmp_path / "no" / "such" / "model"
    code = cli.train_main(["--data", "synthetic:counting", "--model", str(missing), "--output-dir", str(tmp_path / "run")])
    assert code == EXIT_USAGE
    line = error_line(capsys.readouterr().err, "livr-train")
    assert line.startswith(f"model: {str(missing)!r} is a local path but not a folder"), line


def test_train_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="lr: expected a number > 0"):
        cli.train_main(["--lr", "-1", "--debug"])


def test_train_error_after_setup_is_not_swallowed(tmp_path, monkeypatch):
    """A ValueError from the training loop is a bug, not the user's input: it propagates."""
    plan = [SimpleNamespace(epochs=1, rule="standard")]
    run = SimpleNamespace(accelerator=None, handle=SimpleNamespace(set_rule=lambda rule: None),
                          state=SimpleNamespace(epoch=0))
    monkeypatch.setattr(train_module, "_start_run", lambda *args: (run, [], plan, None, []))

    def broken_order(*args):
        raise ValueError("internal: permutation of the wrong length")

    monkeypatch.setattr(train_module, "epoch_order", broken_order)
    with pytest.raises(ValueError, match="internal: permutation"):
        cli.train_main(["--data", "synthetic:counting", "--output-dir", str(tmp_path)])


def test_eval_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.eval_main(["--checkpoint", str(missing)]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err, "livr-eval")
    assert line.startswith(f"checkpoint: {str(missing)!r} is neither a checkpoint directory")


def test_eval_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="is neither a checkpoint directory"):
        cli.eval_main(["--checkpoint", str(tmp_path / "nowhere"), "--debug"])


def fake_eval_setup(monkeypatch):
    """livr-eval's setup without a checkpoint or a model: every loader returns a stand-in."""
    monkeypatch.setattr(cli, "read_run_config", lambda path: TrainConfig(data="synthetic:counting"))
    monkeypatch.setattr(cli, "load_examples", lambda *args, **kwargs: [])
    monkeypatch.setattr(cli, "load_trained", lambda *args, **kwargs: SimpleNamespace(model=None, handle=None,
                                                                                     encoder=None, checkpoint_dir="run"))
    monkeypatch.setattr(cli, "check_overlap", lambda *args, **kwargs: {})


def test_eval_unusable_output_dir_is_reported_before_evaluating(tmp_path, monkeypatch, capsys):
    fake_eval_setup(monkeypatch)
    evaluated = []
    monkeypatch.setattr(cli, "evaluate_model", lambda *args, **kwargs: evaluated.append(True))
    taken = tmp_path / "metrics_here"
    taken.write_text("a file, not a folder")
    code = cli.eval_main(["--checkpoint", str(tmp_path), "--data", "synthetic:counting", "--output-dir", str(taken)])
    assert code == EXIT_USAGE and evaluated == []
    assert str(taken) in error_line(capsys.readouterr().err, "livr-eval")


def test_eval_error_during_evaluation_is_not_swallowed(tmp_path, monkeypatch):
    fake_eval_setup(monkeypatch)

    def broken_evaluation(*args, **kwargs):
        raise ValueError("internal: logits of the wrong shape")

    monkeypatch.setattr(cli, "evaluate_model", broken_evaluation)
    with pytest.raises(ValueError, match="internal: logits"):
        cli.eval_main(["--checkpoint", str(tmp_path), "--data", "synthetic:counting", "--output-dir", str(tmp_path / "e")])


def test_data_unwritable_out_is_one_line(tmp_path, capsys):
    """An OSError from the build (here: --out under a file) names the path; it was a traceback."""
    photos = photo_folder(tmp_path / "photos", count=6)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "build"
    code = data_cli.main(["build", "jigsaw", "--source", str(photos), "--out", str(out), "--size", "2"])
    assert code == EXIT_USAGE
    assert str(out) in error_line(capsys.readouterr().err, "livr-data")


def test_data_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        data_cli.main(["build", "jigsaw", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--debug"])


def test_data_builder_bug_is_not_swallowed(tmp_path, monkeypatch):
    """Only BuildError (and OSError) are the user's; a plain ValueError inside a build is a builder bug."""
    def broken_build(*args, **kwargs):
        raise ValueError("internal: a choice list of the wrong length")

    monkeypatch.setattr(data_cli, "build", broken_build)
    with pytest.raises(ValueError, match="internal: a choice list"):
        data_cli.main(["build", "jigsaw", "--source", str(tmp_path), "--out", str(tmp_path / "o")])


def test_study_bad_grid_is_one_line(tmp_path, capsys):
    assert study.study_main(["--modes", "bogus", "--output-dir", str(tmp_path)]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-study").startswith("grid: modes ['bogus'] are not registered")
    grid = tmp_path / "grid.yaml"
    grid.write_text("modes: [livr\n")
    assert study.study_main(["--grid", str(grid)]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-study").startswith(f"--grid {grid}: ")


def test_study_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "study_here"
    taken.write_text("")
    assert study.study_main(["--output-dir", str(taken)]) == EXIT_USAGE
    assert str(taken) in error_line(capsys.readouterr().err, "livr-study")


def test_study_cell_setting_is_one_line_and_train_bug_is_not(tmp_path, monkeypatch, capsys):
    """A cell's config is checked inside the run (its base model path is known only then)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("model: some/model\ntasks: [data.jsonl]\nmodes: [livr]\nseeds: [0]\ntrain_overrides: {weight_decay: -1}\n")
    assert study.study_main(["--grid", str(grid), "--output-dir", str(tmp_path / "s1")]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-study").startswith("weight_decay: expected")
    grid.write_text("model: some/model\ntasks: [data.jsonl]\nmodes: [livr]\nseeds: [0]\ntrain_overrides: {epochs: 3}\n")
    assert study.study_main(["--grid", str(grid), "--output-dir", str(tmp_path / "s2")]) == EXIT_USAGE
    assert "train_overrides keys ['epochs']" in error_line(capsys.readouterr().err, "livr-study")

    def broken_train(cfg):
        raise ValueError("internal: stage plan of the wrong length")

    monkeypatch.setattr(study, "train", broken_train)
    grid.write_text("model: some/model\ntasks: [data.jsonl]\nmodes: [livr]\nseeds: [0]\n")
    with pytest.raises(ValueError, match="internal: stage plan"):
        study.study_main(["--grid", str(grid), "--output-dir", str(tmp_path / "s3")])


def test_study_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="not registered"):
        study.study_main(["--modes", "bogus", "--debug"])


def test_marking_keeps_the_exception_type():
    """Library callers of train() still catch what they caught: marking changes no type."""
    with pytest.raises(FileNotFoundError) as caught:
        with user_input():
            raise FileNotFoundError("data.jsonl")
    assert is_user_error(caught.value)
    with pytest.raises(KeyError) as caught:
        with user_input():
            raise KeyError("not an input error")
    assert not is_user_error(caught.value)


def test_console_entry_point_end_to_end(tmp_path):
    """The real process: stderr is exactly one line, the exit status 2 (python -m is livr-train)."""
    out = subprocess.run([sys.executable, "-m", "livr_model.app.cli", "--stage-epochs", "0", "0"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == EXIT_USAGE, out.stderr
    assert out.stderr.startswith("livr-train: error: stage_epochs") and out.stderr.count("\n") == 1, out.stderr


def test_home_relative_model_folder_is_loaded_from_the_expanded_path(tmp_path, monkeypatch):
    from livr_model.app import models

    (tmp_path / "m").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(source, **kwargs):
            seen.append(source)
            return object()

    monkeypatch.setattr(models, "AutoProcessor", Recorder)
    monkeypatch.setattr(models, "AutoModelForImageTextToText", Recorder)
    models.load_model_and_processor("~/m")
    assert seen == [str(tmp_path / "m")] * 2


@pytest.mark.parametrize("occupied", ["file", "another run"])
def test_demo_refuses_an_unusable_output_dir_before_building_anything(tmp_path, capsys, occupied):
    out = tmp_path / "out"
    if occupied == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        (out / "latest.json").write_text("{}")
    assert cli.train_main(["--demo", "--demo-size", "small", "--output-dir", str(out)]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err, "livr-train")
    assert ("is a file" if occupied == "file" else "holds another run") in line, line
    assert not (tmp_path / "out" / "base").exists() if occupied != "file" else out.is_file()


@pytest.mark.parametrize("folder", [False, True])
def test_model_that_cannot_be_loaded_is_one_line_naming_the_setting(tmp_path, monkeypatch, capsys, folder):
    """A mistyped hub id with no hub reachable, or a folder without a model: transformers' own
    message spans two lines and never says it came from --model."""
    from livr_model.app import models

    def unreachable(source, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection.")

    monkeypatch.setattr(models.AutoProcessor, "from_pretrained", staticmethod(unreachable))
    name = str(tmp_path) if folder else "qwen-vl-typo"
    code = cli.train_main(["--data", "synthetic:counting", "--synthetic-train-size", "4", "--synthetic-val-size", "4",
                           "--model", name, "--output-dir", str(tmp_path / "run")])
    assert code == EXIT_USAGE
    line = error_line(capsys.readouterr().err, "livr-train")
    where = "the local folder" if folder else "not a local folder, and the hub"
    assert line == (f"model: {name!r}: {where} could not provide it: We couldn't connect to 'https://huggingface.co' "
                    "to load the files. Check your internet connection."), line


def test_eval_refuses_overlap_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A run without training fingerprints (a Trainer run) is refused without --allow-overlap; the
    refusal comes before the base model is loaded, as a missing data file does."""
    fake_eval_setup(monkeypatch)
    loaded = []
    monkeypatch.setattr(cli, "load_trained", lambda *args, **kwargs: loaded.append(True))

    def refuse(checkpoint, examples, *, allow):
        raise ValueError(f"{checkpoint}: no train_fingerprints.json in the run; pass --allow-overlap to evaluate anyway")

    monkeypatch.setattr(cli, "check_overlap", refuse)
    code = cli.eval_main(["--checkpoint", str(tmp_path), "--data", "synthetic:counting"])
    assert code == EXIT_USAGE and loaded == []
    assert "--allow-overlap" in error_line(capsys.readouterr().err, "livr-eval")


def test_a_user_error_spanning_lines_is_printed_on_one(capsys):
    """Messages passed on from libraries can hold line breaks; the error stays one line."""
    import argparse

    from livr_model.app.cli_errors import run_command

    def body(args):
        with user_input():
            raise OSError("could not reach the hub.\nCheck your internet connection.\n")

    assert run_command(argparse.ArgumentParser(prog="livr-x"), body, []) == EXIT_USAGE
    assert error_line(capsys.readouterr().err, "livr-x") == "could not reach the hub. Check your internet connection."
