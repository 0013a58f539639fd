"""Run state is safe: no pickled code is loaded, remote code needs the user's own flag, runs never
mix in one output directory, a refused resume changes nothing, resume notices changed data, the
selected checkpoint survives a crash between the pointer writes, and a kill during pruning never
leaves a half-deleted checkpoint that looks complete."""
import dataclasses
import json
import shutil

import pytest
import torch

from livr_model.app import callbacks as callbacks_module
from livr_model.app import models as models_module
from livr_model.app import checkpoints as ckpt
from livr_model.app.cli import eval_main
from livr_model.app.models import load_trained
from livr_model.app.train import train
from test_train import tiny_config, tiny_data, tiny_setup

MARKER = "payload_ran"


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def run(out, examples=None, **overrides):
    model, processor = tiny_setup()
    train_examples, val_examples = examples or tiny_data()
    cfg = tiny_config(out, **overrides)
    return train(cfg, model=model, processor=processor, train_examples=train_examples, val_examples=val_examples)


def latest(out):
    return ckpt.read_pointer(out, ckpt.LATEST_POINTER)


@pytest.mark.parametrize("planted", [ckpt.TRAINING_STATE, ckpt.RNG_STATE_TEMPLATE.format(rank=0)])
def test_planted_pickle_is_refused_and_never_run(tmp_path, planted):
    out, marker = tmp_path / "run", tmp_path / MARKER
    run(out, max_steps=1)
    target = latest(out) / planted
    torch.save({"optimizer": Payload(marker)}, target)
    # the plant is live: an unguarded torch.load runs it
    probe = tmp_path / "probe.pt"
    shutil.copy(target, probe)
    torch.load(probe, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(ValueError, match=rf"refusing to load .*{planted}.*pickled objects"):
        run(out, resume=True)
    assert not marker.exists()


def test_saved_state_loads_with_weights_only(tmp_path):
    run(tmp_path, max_steps=1)
    for name in (ckpt.TRAINING_STATE, ckpt.RNG_STATE_TEMPLATE.format(rank=0)):
        assert isinstance(torch.load(latest(tmp_path) / name, weights_only=True), dict)


def test_remote_code_needs_the_users_own_flag(tmp_path, monkeypatch, capsys):
    run(tmp_path, max_steps=1)
    config_file = latest(tmp_path) / ckpt.RUN_CONFIG_JSON
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(saved, trust_remote_code=True)))
    calls = []

    def fake_load(name, *, trust_remote_code=False, dtype=None):
        calls.append(trust_remote_code)
        raise RuntimeError("stop after recording the call")

    monkeypatch.setattr(models_module, "load_model_and_processor", fake_load)
    with pytest.raises(ValueError, match="trained with trust_remote_code=True.*pass --trust-remote-code"):
        load_trained(tmp_path)
    assert eval_main(["--checkpoint", str(tmp_path), "--data", "synthetic:counting"]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert calls == [], "no model code was loaded without the flag"
    with pytest.raises(RuntimeError, match="stop after"):
        load_trained(tmp_path, trust_remote_code=True)
    config_file.write_text(json.dumps(dict(saved, trust_remote_code=False)))
    with pytest.raises(RuntimeError, match="stop after"):
        load_trained(tmp_path)
    assert calls == [True, False]


def test_output_dir_of_another_run_is_refused_without_resume_or_overwrite(tmp_path):
    run(tmp_path, max_steps=3, save_steps=1)
    before = sorted(d.name for d in ckpt.list_checkpoints(tmp_path))
    with pytest.raises(ValueError, match=r"holds another run .*--resume to continue it, --overwrite to replace it"):
        run(tmp_path, max_steps=1)
    assert sorted(d.name for d in ckpt.list_checkpoints(tmp_path)) == before
    run(tmp_path, max_steps=1, overwrite=True)
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_dir_name(1)]
    assert ckpt.read_info(latest(tmp_path))["global_step"] == 1
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        tiny_config(tmp_path, resume=True, overwrite=True)


def test_refused_resume_leaves_the_run_config(tmp_path):
    run(tmp_path, max_steps=1)
    saved = {name: (tmp_path / name).read_bytes() for name in (ckpt.RUN_CONFIG_JSON, ckpt.RUN_CONFIG_YAML)}
    with pytest.raises(ValueError, match="different settings"):
        run(tmp_path, resume=True, lr=5e-3)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved


def _relabel(examples):
    first = examples[0]
    other = next(letter for letter in "ABCD"[: len(first.choices)] if letter != first.answer)
    return [dataclasses.replace(first, answer=other)] + examples[1:]


@pytest.mark.parametrize(
    "change, which",
    [
        (lambda t, v: (t[::-1], v), "training"),
        (lambda t, v: (t[:-1], v), "training"),
        (lambda t, v: (_relabel(t), v), "training"),
        (lambda t, v: (t, v[:-1]), "validation"),
    ],
    ids=["reordered", "cut", "relabelled", "validation cut"],
)
def test_resume_refuses_changed_data(tmp_path, change, which):
    train_examples, val_examples = tiny_data()
    run(tmp_path, (train_examples, val_examples), max_steps=2)
    with pytest.raises(ValueError, match=f"the {which} data differ"):
        run(tmp_path, change(list(train_examples), list(val_examples)), resume=True)
    resumed = run(tmp_path, tiny_data(), resume=True, max_steps=3)
    assert resumed.state.global_step == 3, "the same data (built again) resumes"


def test_selected_checkpoint_survives_a_crash_between_the_pointer_writes(tmp_path, monkeypatch):
    # Epoch accuracies 0.9, 0.1, 0.2: the first epoch's checkpoint (step 4) is the one to evaluate.
    accuracy = {0: 0.9, 1: 0.1, 2: 0.2}
    monkeypatch.setattr(callbacks_module, "validation_accuracy", lambda run_context, rule=None: accuracy[run_context.epoch])
    real_write_pointer = ckpt.write_pointer

    def killed_before_selected(output_dir, name, *args, **kwargs):
        if name == ckpt.SELECTED_POINTER:
            raise RuntimeError("killed between latest.json and selected.json")
        return real_write_pointer(output_dir, name, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_pointer", killed_before_selected)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, stage_epochs=(2, 1), keep_checkpoints=1)
    assert ckpt.read_info(latest(tmp_path))["global_step"] == 4
    monkeypatch.setattr(ckpt, "write_pointer", real_write_pointer)
    result = run(tmp_path, stage_epochs=(2, 1), keep_checkpoints=1, resume=True)
    best = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(4)
    assert result.state.global_step == 12 and best.is_dir(), "the best checkpoint was pruned"
    assert ckpt.resolve_checkpoint(tmp_path) == best
    assert ckpt.read_pointer(tmp_path, ckpt.SELECTED_POINTER) == best
    assert result.selected_checkpoint == best


def test_kill_during_pruning_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    first = ckpt.checkpoint_dir_name(1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if first in str(path):
            (path / ckpt.ADAPTER_WEIGHTS).unlink()
            raise RuntimeError("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(RuntimeError, match="killed while deleting"):
        run(tmp_path, max_steps=3, save_steps=1, keep_checkpoints=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert not (tmp_path / ckpt.CHECKPOINTS_DIR / first).exists(), "the half-deleted checkpoint kept its name"
    for checkpoint in ckpt.list_checkpoints(tmp_path):
        ckpt.require_complete(checkpoint)
    leftover = tmp_path / ckpt.CHECKPOINTS_DIR / (first + ckpt.DELETING_SUFFIX)
    with pytest.raises(ValueError, match="being written or deleted"):
        load_trained(leftover)
    run(tmp_path, max_steps=4, save_steps=1, keep_checkpoints=1, resume=True)
    assert not leftover.exists(), "the next prune removes what the kill left"


def test_loaders_refuse_an_incomplete_checkpoint_by_name(tmp_path):
    run(tmp_path, max_steps=1)
    checkpoint = latest(tmp_path)
    (checkpoint / ckpt.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=rf"checkpoint '.*{checkpoint.name}' is incomplete \(missing \['adapter_model.safetensors'\]\)"):
        load_trained(checkpoint)
    with pytest.raises(ValueError, match="is incomplete"):
        run(tmp_path, resume=True)


def test_resume_of_a_checkpoint_without_data_fingerprint_is_refused(tmp_path):
    run(tmp_path, max_steps=1)
    path = latest(tmp_path) / ckpt.TRAINING_STATE
    training = torch.load(path, weights_only=True)
    del training["resume"]["data_fingerprints"]
    torch.save(training, path)
    with pytest.raises(ValueError, match="records no data fingerprint"):
        run(tmp_path, resume=True)
