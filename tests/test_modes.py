"""The mode registry: every registered mode goes through a tiny run (train both stages, evaluate with
probes), and a new mode is one registry entry."""
import pytest
import torch

from livr_kernels import Segment
from livr_model.app.models import build_trainable_model, make_encoder
from livr_model.app.probes import HEATMAP_FILE, evaluate_model
from livr_model.app.train import train
from livr_model.latents import DELTA_PARAMETER
from livr_model.prompts import PromptEncoder
from livr_model.modes import (LATENTS_NEW, LATENTS_VOCAB, MODES, PROBES, TRAIN_LATENT_ROWS, TRAIN_LORA, Mode, get_mode, images_twice,
                              register_mode)
from test_train import LATENTS, tiny_config, tiny_data, tiny_setup

NUM_EVAL = 2
STEPS_PER_EPOCH = 4


def _run_mode(tmp_path, mode):
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    steps = []
    result = train(tiny_config(tmp_path, mode=mode), model=model, processor=processor, train_examples=train_examples,
                   val_examples=val_examples, step_callback=steps.append)
    metrics = evaluate_model(result.model, result.handle, result.encoder, val_examples[:NUM_EVAL], rule="standard",
                             max_new_tokens=3, output_dir=tmp_path / "eval", verbose=False)
    return result, steps, metrics


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_trains_and_evaluates(tmp_path, name):
    mode = get_mode(name)
    result, steps, metrics = _run_mode(tmp_path, name)
    plan = mode.stage_plan((1, 1))
    # Every stage of the plan ran under its rule, one epoch of steps per planned epoch.
    expected = [(s.name, s.rule) for s in plan for _ in range(s.epochs * STEPS_PER_EPOCH)]
    assert [(s.stage, s.rule) for s in steps] == expected
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)

    assert len(result.latent_token_ids) == (LATENTS if mode.has_latents else 0)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) == mode.trains_lora
    assert any(n.endswith(DELTA_PARAMETER) for n in trained) == (TRAIN_LATENT_ROWS in mode.trains)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    # LoRA's B starts at zero: it moved exactly when the mode trains LoRA.
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b) == mode.trains_lora

    encoded = result.encoder.encode(result.val_examples[0], with_answer=True)
    _, _, segments = result.encoder.collate([encoded], padding_side="right")
    latent_count = int((segments == int(Segment.LATENT)).sum())
    assert latent_count == (LATENTS if mode.has_latents else 0)

    assert metrics["mode"] == name and metrics["num_examples"] == NUM_EVAL
    assert 0.0 <= metrics["accuracy"]["average"] <= 1.0
    for probe in PROBES:
        assert (metrics["probes"][probe] is not None) == (probe in mode.probes), probe
    assert (tmp_path / "eval" / HEATMAP_FILE).is_file() == ("heatmap" in mode.probes)


def test_prompt_tuning_feeds_the_model_what_latents_only_does(tmp_path):
    # The two differ only in what trains, which is what README's account of prompt-tuning's
    # below-chance counting score rests on: same token ids, labels, segment ids and starting rows.
    _, val_examples = tiny_data()
    seen = {}
    for name in ("prompt-tuning", "latents-only"):
        model, processor = tiny_setup()
        cfg = tiny_config(tmp_path / name, mode=name)
        peft_model, _, latent_ids = build_trainable_model(cfg, model, processor)
        encoder = make_encoder(cfg, peft_model, processor, latent_ids)
        batches = [encoder.batch(val_examples[:2], with_answer=answer, padding_side=side)
                   for answer, side in ((True, "right"), (False, "left"))]
        with torch.no_grad():
            rows = peft_model.get_input_embeddings()(torch.tensor(latent_ids))
        seen[name] = (batches, rows)
    (tuned, tuned_rows), (latents_only, latents_only_rows) = seen["prompt-tuning"], seen["latents-only"]
    for (inputs, labels, segments), (other_inputs, other_labels, other_segments) in zip(tuned, latents_only):
        assert torch.equal(inputs["input_ids"], other_inputs["input_ids"])
        assert torch.equal(labels, other_labels) and torch.equal(segments, other_segments)
        assert int((segments == int(Segment.LATENT)).sum()) == 2 * LATENTS
    assert torch.equal(tuned_rows, latents_only_rows)


def test_prompt_transform_comes_from_the_mode():
    model, processor = tiny_setup()
    example = tiny_data()[0][0]
    counts = {}
    for name in ("sft", "image-twice"):
        encoder = PromptEncoder.for_model(name, model, processor, (), LATENTS)
        ids = encoder.encode(example, with_answer=False)["input_ids"]
        counts[name] = int(torch.isin(ids, torch.tensor(encoder.image_token_ids)).sum())
    assert counts["sft"] > 0 and counts["image-twice"] == 2 * counts["sft"]


def test_a_new_mode_is_one_entry(tmp_path):
    """The paper's answer-only bottleneck as a registered mode: the trainer runs its rule unchanged."""
    name = "test-livr-answer-only"
    register_mode(Mode(name, LATENTS_NEW, ("bottleneck_answer_only", "standard"), trains=(TRAIN_LORA, TRAIN_LATENT_ROWS),
                       probes=PROBES))
    try:
        result, steps, metrics = _run_mode(tmp_path, name)
    finally:
        del MODES[name]
    assert [s.rule for s in steps] == ["bottleneck_answer_only"] * STEPS_PER_EPOCH + ["standard"] * STEPS_PER_EPOCH
    assert len(result.latent_token_ids) == LATENTS and metrics["mode"] == name
    with pytest.raises(ValueError, match="mode must be one of"):
        get_mode(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latents="borrowed"), "latents must be one of"),
        (dict(stage_rules=("a", "b", "c")), "stage_rules"),
        (dict(trains=(TRAIN_LORA, TRAIN_LATENT_ROWS)), "needs latent tokens"),
        (dict(trains=()), "non-empty selection"),
        (dict(trains=("everything",)), "non-empty selection"),
        (dict(latents=LATENTS_NEW, trains=(TRAIN_LORA,)), "must train their rows"),
        (dict(probes=("vibes",)), "unknown probes"),
    ],
)
def test_mode_entries_are_validated(kwargs, match):
    settings = dict(name="bad", latents="none", stage_rules=("standard",))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Mode(**settings)
    with pytest.raises(ValueError, match="already registered"):
        register_mode(Mode("sft", "none", ("standard",)))


def test_image_twice_transform_keeps_the_original():
    example = tiny_data()[0][0]
    doubled = images_twice(example)
    assert len(doubled.images) == 2 * len(example.images) and len(example.images) == 1


def test_paper_modes_are_registered_with_their_definitions():
    assert {"sft", "livr", "livr-answer-only", "latents-only", "mask-only", "prompt-tuning", "image-twice"} <= set(MODES)
    assert get_mode("livr-answer-only").stage_rules == ("bottleneck_answer_only", "standard")
    assert get_mode("prompt-tuning").trains == (TRAIN_LATENT_ROWS,)
    assert get_mode("prompt-tuning").stage_rules == ("standard",)
    assert get_mode("mask-only").latents == LATENTS_VOCAB and TRAIN_LATENT_ROWS in get_mode("mask-only").trains
