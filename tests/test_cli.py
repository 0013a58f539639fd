"""livr-train / livr-eval: flag and config-file precedence, validation, and the offline demo."""
import json
from pathlib import Path

import pytest
import yaml

from livr_model.app import checkpoints as ckpt
from livr_model.app.cli import build_eval_parser, resolve_train_config, train_main
from livr_model.app.demo import DEMO_SIZES, demo_config
from livr_model.app.config import TrainConfig


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_flags():
    cfg, _ = resolve_train_config([])
    assert cfg == TrainConfig()


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {
        "model": "Qwen/Qwen2.5-VL-3B-Instruct",
        "data": "train.jsonl",
        "lr": 5e-5,
        "stage-epochs": [2, 3],
        "grad_accum": 4,
        "mode": "latents-only",
    })
    cfg, _ = resolve_train_config(["--config", str(config), "--lr", "2e-4", "--mode", "livr", "--seed", "7"])
    assert cfg.lr == 2e-4, "a flag beats the file"
    assert cfg.mode == "livr"
    assert cfg.seed == 7, "a flag beats the default"
    assert cfg.stage_epochs == (2, 3), "the file beats the default (dashed keys accepted)"
    assert cfg.grad_accum == 4
    assert cfg.batch_size == TrainConfig().batch_size, "untouched keys keep the default"


def test_every_documented_flag_parses(tmp_path):
    cfg, _ = resolve_train_config([
        "--model", "m", "--data", "synthetic:counting,jigsaw", "--mode", "mask-only", "--latents", "8",
        "--stage-epochs", "4", "6", "--output-dir", str(tmp_path), "--lr", "1e-3", "--stage2-lr", "2.5e-4", "--batch-size", "2",
        "--grad-accum", "16", "--seed", "3", "--resume", "--gradient-checkpointing", "--no-bf16", "--max-steps", "5",
    ])
    assert (cfg.model, cfg.data, cfg.mode, cfg.latents) == ("m", "synthetic:counting,jigsaw", "mask-only", 8)
    assert (cfg.stage_epochs, cfg.output_dir, cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.seed) == ((4, 6), str(tmp_path), 1e-3, 2, 16, 3)
    assert cfg.resume and cfg.gradient_checkpointing and not cfg.bf16 and cfg.max_steps == 5
    assert cfg.stage2_lr == 2.5e-4 and resolve_train_config(["--stage2-lr", "none"])[0].stage2_lr is None


def test_false_flag_beats_true_in_file(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"gradient_checkpointing": True, "resume": True})
    cfg, _ = resolve_train_config(["--config", str(config), "--no-resume"])
    assert cfg.gradient_checkpointing and not cfg.resume


def test_demo_settings_are_the_base_for_file_and_flags(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"latents": 2})
    cfg, args = resolve_train_config(["--demo", "--demo-size", "small", "--config", str(config), "--output-dir", str(tmp_path)])
    expected = demo_config(DEMO_SIZES["small"])
    assert args.demo
    assert cfg.data == expected["data"] and cfg.stage_epochs == tuple(expected["stage_epochs"])
    assert cfg.latents == 2 and cfg.output_dir == str(tmp_path)


@pytest.mark.parametrize("argv, lr, stage2_lr", [
    (["--demo"], 2e-3, 5e-4),
    (["--demo", "--lr", "1e-4"], 1e-4, 2.5e-5),  # the demo's stage 2 keeps its quarter of stage 1
    (["--demo", "--lr", "1e-4", "--stage2-lr", "3e-5"], 1e-4, 3e-5),
    (["--data", "synthetic:counting", "--lr", "1e-3"], 1e-3, None),
])
def test_demo_stage2_lr_follows_the_lr_given(argv, lr, stage2_lr):
    cfg, _ = resolve_train_config(argv)
    assert cfg.lr == pytest.approx(lr) and (cfg.stage2_lr == pytest.approx(stage2_lr) if stage2_lr else cfg.stage2_lr is None)


@pytest.mark.parametrize(
    "argv, match",
    [(["--mode", "bogus"], "invalid choice"), (["--stage-epochs", "4"], "expected 2 arguments"), (["--lr", "fast"], "invalid float"),
     (["--stage2-lr", "abc"], "--stage2-lr: expected a number or 'none'; got 'abc'"),
     (["--max-steps", "1.5"], "--max-steps: expected an integer or 'none'; got '1.5'")],
)
def test_bad_flags_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit):
        resolve_train_config(argv)
    assert match in capsys.readouterr().err


def test_bad_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        resolve_train_config(["--config", str(write_yaml(tmp_path / "a.yaml", {"learning_rate": 1}))])
    with pytest.raises(ValueError, match="is not a file"):
        resolve_train_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="stage_epochs"):
        resolve_train_config(["--config", str(write_yaml(tmp_path / "b.yaml", {"stage_epochs": [0, 0]}))])


def test_train_main_requires_data(capsys):
    assert train_main(["--output-dir", "unused"]) == 2
    assert capsys.readouterr().err == "livr-train: error: --data is required (or use --demo); see --help\n"


def test_eval_parser():
    args = build_eval_parser().parse_args(["--checkpoint", "run", "--method", "likelihood", "--no-probes", "--limit", "5"])
    assert (args.checkpoint, args.method, args.probes, args.limit) == ("run", "likelihood", False, 5)


REPO = Path(__file__).resolve().parents[1]


def test_example_config_trains_on_the_example_jsonl(tmp_path, monkeypatch):
    """examples/tiny_counting.yaml with its JSONL files, on a tiny base saved like the demo's."""
    from livr_model.app.cli import eval_main
    from livr_model.app.tiny import build_tiny_model, build_tiny_processor, save_tiny

    processor = build_tiny_processor(56)
    save_tiny(build_tiny_model(processor, text_hidden=64, vision_hidden=32, vision_depth=1), processor, tmp_path / "base")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    argv = ["--config", "examples/tiny_counting.yaml", "--model", str(tmp_path / "base"), "--output-dir", str(out),
            "--max-steps", "3", "--no-progress"]
    assert train_main(argv) == 0
    saved = yaml.safe_load((out / ckpt.RUN_CONFIG_YAML).read_text())
    assert saved["data"] == "examples/counting/train.jsonl" and saved["stage_epochs"] == [1, 2]
    assert saved["max_steps"] == 3 and saved["output_dir"] == str(out), "flags beat the file"
    assert ckpt.read_info(ckpt.read_pointer(out, ckpt.LATEST_POINTER))["global_step"] == 3
    assert eval_main(["--checkpoint", str(out), "--method", "likelihood", "--no-probes", "--limit", "6"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"]["per_task"]["counting"]["total"] == 6, "the run's val_data, limited per task"
    assert metrics["rule"] == "standard", "the run's eval rule by default"
    argv = ["--checkpoint", str(out), "--method", "likelihood", "--no-probes", "--limit", "2", "--rule", "bottleneck",
            "--output-dir", str(tmp_path / "forced")]
    assert eval_main(argv) == 0
    assert json.loads((tmp_path / "forced" / "metrics.json").read_text())["rule"] == "bottleneck"
