"""The tested version range: setup.py, the pinned stacks in constraints/ and the README agree, the
running stack is the one CI says it is, and TRL's SFTTrainer drives a patched model on it.

`make test-newest` and `make test-compat` set LIVR_CONSTRAINTS to the constraints file of the stack
they run; without it (a plain `pytest` in your own environment) the installed-versions check skips.
"""
import ast
import copy
import math
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from livr_model import patch_attention
from tiny_models import TINY_TOKENS, build_tiny_model, make_batch

ROOT = Path(__file__).resolve().parent.parent
STACKS = {"newest": ROOT / "constraints" / "newest.txt", "oldest": ROOT / "constraints" / "oldest.txt"}
# torch's floor is the benchmark GPU machine's 2.11 (checked there by `make gpu-report`); CI has
# only the 2.13 CPU wheel, so torch alone has a floor below the oldest stack's pin.
FLOOR_BELOW_OLDEST_PIN = {"torch"}
README_SECTION = "## Tested versions"
# Same batch, same weights, same float32 ops: the trainer's loss matches to rounding.
LOSS_TOLERANCE = 1e-6


def _pins(path):
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        assert match, f"{path}:{number}: expected 'name==version', got {line!r}"
        pins[match.group(1).lower()] = match.group(2)
    return pins


def _setup_requirements():
    """install_requires plus every extra, read from setup.py's literal lists without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    lines = list(ast.literal_eval(keywords["install_requires"]))
    for extra in ast.literal_eval(keywords["extras_require"]).values():
        lines.extend(extra)
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def _readme_table():
    text = (ROOT / "README.md").read_text()
    assert README_SECTION in text, f"README.md has no {README_SECTION!r} section"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip().strip("`") for c in row.strip("|").split("|")] for row in rows]
    header, body = cells[0], cells[2:]
    # First cell: the package name, then optional words ("trl (extra `trl`)").
    return header, {row[0].split()[0].lower(): row for row in body}


def _bound(requirement, operator):
    found = [Version(s.version) for s in requirement.specifier if s.operator == operator]
    assert len(found) == 1, f"{requirement}: expected exactly one {operator} bound"
    return found[0]


def test_every_pinned_package_has_a_range_in_setup_py():
    requirements = _setup_requirements()
    for stack, path in STACKS.items():
        for name in _pins(path):
            assert name in requirements, f"{path.name} pins {name}, which setup.py does not require"


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_pins_lie_inside_the_setup_py_range(stack):
    requirements = _setup_requirements()
    for name, version in _pins(STACKS[stack]).items():
        assert requirements[name].specifier.contains(version), f"{stack}: {name}=={version} outside {requirements[name]}"


def test_setup_py_range_is_no_wider_than_the_tested_ends():
    requirements = _setup_requirements()
    oldest, newest = _pins(STACKS["oldest"]), _pins(STACKS["newest"])
    assert oldest.keys() == newest.keys()
    for name in oldest:
        floor, ceiling = _bound(requirements[name], ">="), _bound(requirements[name], "<")
        if name not in FLOOR_BELOW_OLDEST_PIN:
            assert floor == Version(Version(oldest[name]).base_version), f"{requirements[name]}: floor is not the oldest pin {oldest[name]}"
        newest_release = Version(newest[name]).release
        next_minor = Version(f"{newest_release[0]}.{newest_release[1] + 1}")
        assert ceiling == next_minor, f"{requirements[name]}: ceiling should be {next_minor}, the minor after the newest pin {newest[name]}"


def test_readme_table_matches_the_pinned_stacks():
    header, rows = _readme_table()
    requirements = _setup_requirements()
    oldest, newest = _pins(STACKS["oldest"]), _pins(STACKS["newest"])
    assert [h.split(" ")[0].lower() for h in header[:4]] == ["package", "newest", "oldest", "supported"], header
    assert set(rows) == set(oldest), f"README rows {sorted(rows)} vs pinned packages {sorted(oldest)}"
    for name, row in rows.items():
        assert row[1] == newest[name], f"README says {name} {row[1]} on the newest stack; constraints pin {newest[name]}"
        assert row[2] == oldest[name], f"README says {name} {row[2]} on the oldest stack; constraints pin {oldest[name]}"
        assert SpecifierSet(row[3]) == requirements[name].specifier, f"README range {row[3]} vs setup.py {requirements[name]}"


def test_installed_versions_are_the_stack_ci_names():
    path = os.environ.get("LIVR_CONSTRAINTS")
    if not path:
        pytest.skip("LIVR_CONSTRAINTS is not set: not running under make test-newest / test-compat")
    for name, version in _pins(ROOT / path).items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, {path} pins {version}"


def test_trl_sft_trainer_trains_a_patched_model_with_a_custom_collator(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    patch_attention(model, rule="bottleneck", latent_token_ids=TINY_TOKENS.latents)
    batches = [make_batch(arch, seed=seed) for seed in range(2)]
    model.train()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in batches]
    before = copy.deepcopy(model.state_dict())

    # bf16=False: SFTConfig turns bf16 autocast on by default; the tiny model is plain fp32.
    config = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=len(batches), per_device_train_batch_size=1, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=False,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
    )
    rows = datasets.Dataset.from_list([{"index": i} for i in range(len(batches))])
    # The trainer must hand the collator's batch to the model unchanged (no column pruning,
    # no re-tokenizing), so its first logged loss is the loss computed above on one of the batches
    # (which one depends on the trainer's shuffling).
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=rows, data_collator=lambda items: batches[items[0]["index"]],
        processing_class=_tiny_tokenizer(),
    )
    trainer.train()

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == len(batches)
    assert len(logged) == len(batches) and all(math.isfinite(x) for x in logged)
    assert min(abs(logged[0] - loss) / loss for loss in losses) < LOSS_TOLERANCE, (logged[0], losses)
    assert losses[0] != pytest.approx(losses[1], rel=LOSS_TOLERANCE), "the two batches must be told apart"
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert any("language_model" in name for name in changed), "no language-model weight moved"


def _tiny_tokenizer():
    vocab = {f"t{i}": i for i in range(TINY_TOKENS.first_special)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
