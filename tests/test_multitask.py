"""Several data sources in one --data value, a per-task breakdown in every report, and the paper's
multi-task preset (2 + 3 epochs, the last checkpoint evaluated)."""
from pathlib import Path

import pytest

from livr_model.app import checkpoints as ckpt
from livr_model.app.callbacks import Callback
from livr_model.app.cli import resolve_train_config
from livr_model.app.config import MULTI_TASK_STAGE_EPOCHS, TrainConfig
from livr_model.app.data import load_examples, make_synthetic_dataset, save_jsonl, split_data, split_specs
from livr_model.app.probes import evaluate_model
from livr_model.app.train import train
from test_train import LATENTS, tiny_config, tiny_setup


def _jsonl(tmp_path, name, task, count, seed):
    path = tmp_path / f"{name}.jsonl"
    save_jsonl(make_synthetic_dataset(task, count, seed=seed, image_size=28), path, tmp_path / f"{name}_images")
    return path


def test_data_specs_split_into_sources(tmp_path):
    a, b = _jsonl(tmp_path, "a", "counting", 2, 0), _jsonl(tmp_path, "b", "jigsaw", 2, 1)
    assert split_specs(f"blink:Counting,Jigsaw {a},{b}") == ["blink:Counting,Jigsaw", str(a), str(b)]
    assert split_specs(f"{a} synthetic:counting,jigsaw, blink:Art_Style") == [str(a), "synthetic:counting,jigsaw", "blink:Art_Style"]
    assert split_specs("synthetic:counting jigsaw") == ["synthetic:counting,jigsaw"]
    with pytest.raises(ValueError, match="empty value"):
        split_specs("  ")


def test_several_sources_load_in_order_with_their_tasks(tmp_path):
    a, b = _jsonl(tmp_path, "a", "counting", 3, 0), _jsonl(tmp_path, "b", "jigsaw", 2, 1)
    cfg = TrainConfig(data="x", synthetic_train_size=4, synthetic_image_size=28)
    examples = load_examples(f"{a},{b} synthetic:visual_similarity", cfg, split="train")
    assert [e.task for e in examples] == ["counting"] * 3 + ["jigsaw"] * 2 + ["visual_similarity"] * 4
    with pytest.raises(ValueError, match="is not a file"):
        load_examples(f"{a},{tmp_path / 'missing.jsonl'}", cfg, split="train")
    # A JSONL source among them: validation is held out of the whole pool, not drawn by the synthetic source.
    split = split_data(TrainConfig(data=f"{a} {b}", val_fraction=0.4))
    assert len(split.val) == 2 and split.source == "held_out"


def test_multi_task_preset_sets_the_paper_schedule(tmp_path):
    cfg, _ = resolve_train_config(["--data", "synthetic:counting", "--multi-task"])
    assert cfg.multi_task and cfg.stage_epochs == MULTI_TASK_STAGE_EPOCHS == (2, 3)
    cfg, _ = resolve_train_config(["--data", "synthetic:counting", "--multi-task", "--stage-epochs", "1", "1"])
    assert cfg.stage_epochs == (1, 1), "explicit epochs win over the preset"
    config = tmp_path / "run.yaml"
    config.write_text("multi_task: true\ndata: synthetic:counting\n")
    assert resolve_train_config(["--config", str(config)])[0].stage_epochs == (2, 3)
    assert resolve_train_config(["--data", "synthetic:counting"])[0].stage_epochs == (4, 6)
    # --multi-task on a config file that sets the single-task epochs (the 3B example): the preset wins;
    # epochs in the same file as multi_task: true, or on the command line, win over the preset.
    example = Path(__file__).resolve().parents[1] / "examples" / "livr_qwen2_5_vl_3b.yaml"
    assert resolve_train_config(["--config", str(example), "--multi-task"])[0].stage_epochs == (2, 3)
    config.write_text("multi_task: true\nstage_epochs: [1, 2]\n")
    assert resolve_train_config(["--config", str(config), "--data", "x"])[0].stage_epochs == (1, 2)


class SelectionSpy(Callback):
    def __init__(self):
        self.single_task = []

    def on_epoch_end(self, run):
        self.single_task.append(run.single_task)


@pytest.mark.parametrize("multi_task", [False, True])
def test_multi_task_runs_select_the_last_checkpoint_and_report_per_task(tmp_path, multi_task):
    model, processor = tiny_setup()
    train_examples = make_synthetic_dataset("counting", 8, seed=0, image_size=28)
    val_examples = make_synthetic_dataset("counting", 2, seed=1, image_size=28) + \
        make_synthetic_dataset("jigsaw", 2, seed=1, image_size=28)
    spy = SelectionSpy()
    result = train(tiny_config(tmp_path, multi_task=multi_task, stage_epochs=(1, 2)), model=model, processor=processor,
                   train_examples=train_examples, val_examples=val_examples, callbacks=[spy])
    # One training task: only the flag makes it a multi-task run.
    assert spy.single_task == [not multi_task] * 3
    if multi_task:
        assert ckpt.read_pointer(tmp_path, ckpt.SELECTED_POINTER) == ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER)
    for entry in result.state.history:
        assert set(entry["val_per_task"]) == {"counting", "jigsaw"}
        assert entry["val_accuracy"] == pytest.approx(sum(entry["val_per_task"].values()) / 2)
    metrics = evaluate_model(result.model, result.handle, result.encoder, val_examples, probes=False, max_new_tokens=2,
                             verbose=False)
    assert {t: s["total"] for t, s in metrics["accuracy"]["per_task"].items()} == {"counting": 2, "jigsaw": 2}
    assert len(result.latent_token_ids) == LATENTS
