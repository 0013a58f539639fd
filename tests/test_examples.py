"""The example scripts run end to end on the tiny model (a few steps) and leave runs livr-eval reads."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from livr_model.app.cli import build_eval_parser
from livr_model.app.tiny import build_tiny_model, build_tiny_processor, save_tiny
from livr_model.integrations import RUN_FILE, RUN_FILES, STAGE_LOG_KEY, LivrStageCallback

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("trl_sft_livr.py", "hf_trainer_livr.py")
# 8 examples in batches of 4: 2 optimizer steps per epoch, one epoch per stage.
TRAIN_SIZE = 8
STEPS_PER_EPOCH = 2


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    processor = build_tiny_processor()
    save_tiny(build_tiny_model(processor), processor, path)
    return path


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_trains_both_stages_and_writes_run_files(name, tiny_base, tmp_path, capsys):
    output_dir = tmp_path / "run"
    # The script builds the tiny base into <output-dir>/base when it is missing; reuse one here.
    shutil.copytree(tiny_base, output_dir / "base")
    trainer = load_script(name).main(["--output-dir", str(output_dir), "--train-size", str(TRAIN_SIZE), "--stage-epochs", "1", "1"])
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LivrStageCallback))
    assert (callback.boundary, callback.stage.name, callback.handle.rule.name) == (STEPS_PER_EPOCH, "stage2", "standard")
    assert trainer.state.log_history[-1][STAGE_LOG_KEY] == 2
    checkpoint = output_dir / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    assert all((checkpoint / f).is_file() for f in RUN_FILES + ("adapter_model.safetensors", "adapter_config.json"))
    run = json.loads((checkpoint / RUN_FILE).read_text())
    assert run["base_model"] == str(output_dir / "base") and run["stage"] == "stage2" and run["num_latents"] == 4
    hint = capsys.readouterr().out.splitlines()[-1]
    assert f"livr-eval --checkpoint {output_dir} " in hint and "--allow-overlap" in hint.split(), hint


@pytest.mark.parametrize("name", SCRIPTS)
def test_documented_eval_commands_allow_overlap(name):
    """A Trainer run records no training fingerprints, so livr-eval refuses it unless --allow-overlap
    is given: every livr-eval command a script documents must carry the flag."""
    commands = [line.split()[1:] for line in (EXAMPLES / name).read_text().splitlines()
                if line.strip().startswith("livr-eval ")]
    assert commands
    for argv in commands:
        assert build_eval_parser().parse_args(argv).allow_overlap, argv


def test_example_training_rows_are_not_validation_items():
    """The examples train on ``--data synthetic:<task>``'s training split; livr-eval scores its validation split."""
    from livr_model.app.config import TrainConfig
    from livr_model.app.data.synthetic import load_spec

    def key(question, answer, images):
        return question, answer, tuple(image.tobytes() for image in images)

    validation = {key(e.question, e.answer, e.images) for e in load_spec("counting", TrainConfig(), "val")}
    training = load_spec("counting", TrainConfig(synthetic_train_size=64), "train")
    rows, _ = load_script("hf_trainer_livr.py").livr_rows("counting", 64)
    examples = load_script("trl_sft_livr.py").examples_from("counting", 64)
    for name, got in (("hf_trainer_livr", [key(r["question"], r["answer"], r["images"]) for r in rows]),
                      ("trl_sft_livr", [key(e.question, e.answer, e.images) for e in examples])):
        assert len(set(got)) == 64 and not validation & set(got), name
        assert got == [key(e.question, e.answer, e.images) for e in training], name
