"""Every config value is checked when the config is built (YAML, flags, Python), naming the key,
the value and what was expected; livr-eval's flags refuse values that would crash or be replaced."""
import re

import pytest

from livr_model.app.cli import build_eval_parser, build_train_parser, resolve_train_config
from livr_model.app import config as config_module
from livr_model.app.config import TrainConfig


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_line, message",
    [
        ("stage_epochs: '12'", r"stage_epochs: expected a list of 2 integers >= 0; got '12' \(str\)"),
        ("stage_epochs: [1.7, 0.2]", r"stage_epochs: expected a list of 2 integers >= 0; got \[1.7, 0.2\]"),
        ("progress: 'false'", r"progress: expected true or false; got 'false' \(str\)"),
        ("latents: four", r"latents: expected an integer >= 1; got 'four' \(str\)"),
        ("batch_size: '2'", r"batch_size: expected an integer >= 1; got '2' \(str\)"),
        ("seed: abc", r"seed: expected an integer .*; got 'abc' \(str\)"),
        ("lora_r: 2.5", r"lora_r: expected an integer >= 1; got 2.5 \(float\)"),
        ("lr: '1e-3'", r"lr: expected a number > 0; got '1e-3' \(str\) \(write the number unquoted"),
        ("lr: 0", r"lr: expected a number > 0; got 0"),
        ("lr: .nan", r"lr: expected a number > 0; got nan"),
        ("resume: 1", r"resume: expected true or false; got 1 \(int\)"),
        ("betas: [0.9]", r"betas: expected a list of 2 numbers"),
        ("eval_rule: bottlenek", r"eval_rule: expected one of \['standard', 'bottleneck', 'bottleneck_answer_only'\]; got 'bottlenek'"),
        ("eval_method: vibes", r"eval_method: expected one of"),
        ("output_dir: ''", r"output_dir: expected a non-empty string; got ''"),
        ("max_steps: 0", r"max_steps: expected an integer >= 1 or null; got 0"),
        ("mode: nonsense", r"mode must be one of"),
        # Half-open ranges: the excluded end itself is refused.
        ("warmup_ratio: 1.0", r"warmup_ratio: expected a number in \[0, 1\); got 1.0"),
        ("val_fraction: 1", r"val_fraction: expected a number in \[0, 1\); got 1"),
        ("betas: [0.9, 1.0]", r"betas: expected a list of 2 numbers in \[0, 1\); got \[0.9, 1.0\]"),
        ("lora_dropout: 1.0", r"lora_dropout: expected a number in \[0, 1\)"),
        ("weight_decay: -0.01", r"weight_decay: expected a number >= 0; got -0.01"),
        (f"seed: {config_module.MAX_SEED + 1}", r"seed: expected an integer in \[0, 4294967295\]"),
    ],
)
def test_bad_yaml_values_are_named(tmp_path, yaml_line, message):
    config = write(tmp_path / "run.yaml", yaml_line + "\n")
    with pytest.raises(ValueError, match=message):
        resolve_train_config(["--config", str(config)])


def test_yaml_reads_exponent_numbers_as_floats(tmp_path):
    config = write(tmp_path / "run.yaml", "lr: 1e-3\nweight_decay: 5E-2\nstage_epochs: [2, 3]\nprogress: false\n")
    cfg, _ = resolve_train_config(["--config", str(config)])
    assert (cfg.lr, cfg.weight_decay, cfg.stage_epochs, cfg.progress) == (1e-3, 5e-2, (2, 3), False)
    assert isinstance(cfg.stage_epochs, tuple) and all(type(e) is int for e in cfg.stage_epochs)


def test_integers_in_float_fields_become_floats():
    cfg = TrainConfig(lr=1, betas=[0, 0.5])
    assert type(cfg.lr) is float and cfg.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.betas)


def test_duplicated_yaml_key_is_an_error(tmp_path):
    config = write(tmp_path / "run.yaml", "lr: 1.0e-4\nseed: 3\nlr: 2.0e-4\n")
    with pytest.raises(ValueError, match=r"run.yaml: key 'lr' is given twice \(lines 1 and 3\)"):
        resolve_train_config(["--config", str(config)])
    with pytest.raises(ValueError, match="given twice"):
        config_module.load_yaml("outer:\n  a: 1\n  a: 2\n", "nested")


def test_python_api_values_are_checked_too():
    with pytest.raises(ValueError, match=r"stage_epochs: expected a list of 2 integers"):
        TrainConfig(stage_epochs="12")
    with pytest.raises(ValueError, match=r"eval_rule: expected one of"):
        TrainConfig(eval_rule="bogus")


def test_the_included_ends_of_each_range_are_accepted():
    cfg = TrainConfig(warmup_ratio=0.0, val_fraction=0.0, weight_decay=0.0, lora_dropout=0.0, betas=(0.0, 0.0),
                      seed=config_module.MAX_SEED, latents=1, stage_epochs=(0, 1))
    assert (cfg.warmup_ratio, cfg.val_fraction, cfg.seed, cfg.stage_epochs) == (0.0, 0.0, config_module.MAX_SEED, (0, 1))


def test_every_field_has_a_check():
    import dataclasses
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(config_module.FIELD_CHECKS)


def test_every_default_passes_its_check():
    cfg = TrainConfig()
    for name, check in config_module.FIELD_CHECKS.items():
        assert check.check(name, getattr(cfg, name)) == getattr(cfg, name)


@pytest.mark.parametrize("argv", [["--output-dir", ""], ["--lr", "0"], ["--stage-epochs", "0", "0"]])
def test_bad_flags_are_named(argv):
    with pytest.raises(ValueError, match=argv[0].lstrip("-").replace("-", "_")):
        resolve_train_config(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1; got '0'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1; got '0'"),
        (["--limit", "-1"], "argument --limit: expected an integer >= 1; got '-1'"),
        (["--output-dir", ""], "argument --output-dir: expected a non-empty path"),
        (["--batch", "2"], "unrecognized arguments: --batch 2"),
        (["--rule", "bottlenek"], "argument --rule: invalid choice: 'bottlenek'"),
    ],
)
def test_eval_flags_refuse_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_eval_parser().parse_args(["--checkpoint", "run"] + argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--latent", "4"], ["--stage-epoch", "1", "1"], ["--lr", "1e-3", "--grad", "2"]])
def test_train_flags_are_not_abbreviated(argv, capsys):
    with pytest.raises(SystemExit):
        build_train_parser().parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_safety_flags_reach_the_config():
    cfg, _ = resolve_train_config(["--overwrite", "--allow-outside-paths"])
    assert cfg.overwrite and cfg.allow_outside_paths
    defaults, _ = resolve_train_config([])
    assert not defaults.overwrite and not defaults.allow_outside_paths and not defaults.trust_remote_code
    args = build_eval_parser().parse_args(["--checkpoint", "run"])
    assert not args.trust_remote_code and not args.allow_outside_paths


def test_yaml_merge_key_override_is_not_a_duplicate():
    loaded = config_module.load_yaml("base: &base\n  lr: 1.0e-4\n  seed: 1\nrun:\n  <<: *base\n  seed: 2\n", "merge")
    assert loaded["run"] == {"lr": 1e-4, "seed": 2}


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: synthetic:counting\n  lr: 1\n", r"run.yaml: line 2, column 5: mapping values are not allowed here$"),
        ("data: [unclosed\n", r"run.yaml: line 2, column 1: expected ',' or '\]', but got '<stream end>' "
                              r"\(while parsing a flow sequence that starts at line 1, column 7\)$"),
        ("data: synthetic:counting\n\tlr: 1\n", r"run.yaml: line 2, column 1: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, text, message):
    """PyYAML reports a syntax error over several lines ("<unicode string>", an excerpt, a caret);
    the config file's error is one line that names the file and where the mistake is."""
    config = write(tmp_path / "run.yaml", text)
    with pytest.raises(ValueError) as caught:
        resolve_train_config(["--config", str(config)])
    assert "\n" not in str(caught.value) and "<unicode string>" not in str(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)
