"""Packing (livr_model.packing) on the tiny Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision models: a packed
batch gives every example the logits it gets alone and the loss of the padded batch, under every
rule, and an example's logits do not move when its row neighbours' pixels or tokens change."""
import pytest
import torch

from livr_kernels import RULES
from livr_model import build_segment_ids, patch_attention
from livr_model.app.train import answer_nll
from livr_model.packing import pack_examples, plan_packing, row_starts
from livr_model.prompts import collate
from tiny_models import (ARCHS, TINY_TOKENS, BatchSpec, SampleLayout, build_tiny_model, image_token_ids, make_batch,
                         text_position_ids)

# fp32 CPU: the packed and the one-by-one forwards sum the same terms in different matmul shapes
# (measured: logits within 1.8e-7, losses within 9.6e-7, for all three models and rules).
LOGIT_TOL = 1e-6
LOSS_TOL = 5e-6
WEIGHT_TOL = 1e-2
LAYOUTS = [
    SampleLayout(num_images=1),
    SampleLayout(num_images=2, prefix=1, answer=2),
    SampleLayout(num_images=0, prefix=5, answer=4),
    SampleLayout(num_images=1, prefix=7, between=3, answer=1),
]


def _examples(arch, layouts=LAYOUTS, seed=0, pixel_seed=None):
    """One encode_example-like dict (1-D token tensors plus vision inputs) per layout."""
    out = []
    for index, layout in enumerate(layouts):
        batch = make_batch(arch, BatchSpec(layouts=[layout]), seed=seed + index,
                           pixel_seed=None if pixel_seed is None else pixel_seed + index)
        out.append({k: (v[0] if k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids") else v)
                    for k, v in batch.items()})
    return out


def _segments(batch, labels):
    return build_segment_ids(batch["input_ids"], image_token_ids=image_token_ids(), latent_token_ids=TINY_TOKENS.latents,
                             labels=labels, attention_mask=batch["attention_mask"])


def _run(model, batch):
    inputs = dict(batch)
    labels = inputs.pop("labels")
    with torch.no_grad():
        return model(**inputs, segment_ids=_segments(inputs, labels)).logits, labels


def _alone(model, example):
    return _run(model, {k: (v[None] if v.dim() == 1 and k != "batch_num_images" else v) for k, v in example.items()})[0][0]


def _packed(model, examples, max_length):
    batch = pack_examples(examples, max_length, model_or_config=model, pad_token_id=TINY_TOKENS.pad)
    logits, labels = _run(model, batch)
    lengths = [e["input_ids"].numel() for e in examples]
    starts = row_starts(plan_packing(lengths, max_length), lengths)
    return logits, labels, [logits[starts[i][0], starts[i][1]:starts[i][1] + n] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module", params=ARCHS)
def patched(request):
    model = build_tiny_model(request.param)
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=TINY_TOKENS.latents)
    yield request.param, model, handle
    handle.remove()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_packed_logits_and_loss_equal_one_by_one(patched, rule):
    arch, model, handle = patched
    handle.set_rule(rule)
    examples = _examples(arch)
    lengths = [e["input_ids"].numel() for e in examples]
    max_length = max(lengths) + min(lengths)
    logits, labels, per_example = _packed(model, examples, max_length)
    assert logits.shape[0] < len(examples), "the test must put several examples in one row"
    worst = max((got - _alone(model, e)).abs().max().item() for got, e in zip(per_example, examples))
    assert worst < LOGIT_TOL, f"{arch} {rule}: packed logits differ from one-by-one by {worst:.2e}"
    padded = collate([{k: v for k, v in e.items()} for e in examples], TINY_TOKENS.pad)
    padded_logits, padded_labels = _run(model, padded)
    loss_diff = abs(answer_nll(logits, labels).item() - answer_nll(padded_logits, padded_labels).item())
    assert loss_diff < LOSS_TOL, f"{arch} {rule}: packed loss differs from the padded batch's by {loss_diff:.2e}"


def test_neighbours_pixels_and_tokens_do_not_reach_an_example(patched):
    arch, model, handle = patched
    handle.set_rule("bottleneck")
    examples = _examples(arch)
    max_length = sum(e["input_ids"].numel() for e in examples)
    _, _, base = _packed(model, examples, max_length)
    changed = _examples(arch, seed=100, pixel_seed=500)
    # Example 0 stays; its neighbours get new tokens and new pixels (same layouts, so same lengths).
    mixed = [examples[0]] + changed[1:]
    assert not torch.equal(mixed[1]["input_ids"], examples[1]["input_ids"])
    _, _, after = _packed(model, mixed, max_length)
    assert (after[0] - base[0]).abs().max().item() < LOGIT_TOL
    # The check can fail: a neighbour's change does move the neighbour's own logits.
    assert (after[1] - base[1]).abs().max().item() > 1e-3


def test_bottleneck_hides_an_examples_own_image_from_its_text(patched):
    arch, model, handle = patched
    examples = _examples(arch, LAYOUTS[:2])
    repixeled = [examples[0], _examples(arch, LAYOUTS[:2], pixel_seed=77)[1]]
    ids = examples[1]["input_ids"]
    first_latent = int(torch.isin(ids, torch.tensor(TINY_TOKENS.latents)).nonzero()[0])
    text = ~torch.isin(ids, torch.tensor(image_token_ids()))
    text[first_latent:] = False
    moved = {}
    for rule in ("bottleneck", "standard"):
        handle.set_rule(rule)
        _, _, base = _packed(model, examples, None)
        _, _, after = _packed(model, repixeled, None)
        moved[rule] = (after[1][text] - base[1][text]).abs().max().item()
    # The prompt text after the images never sees them under the bottleneck; it does under the standard rule.
    assert moved["bottleneck"] < LOGIT_TOL and moved["standard"] > 1e-4, moved


def test_plan_is_best_fit_decreasing():
    assert plan_packing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    # The 1 goes to the fullest row it fits (4 + 3 leaves 1), not the first (6 leaves 2).
    assert plan_packing([1, 3, 4, 6], 8) == [[3], [2, 1, 0]]
    assert plan_packing([3, 3], None) == [[0, 1]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the packing max_length=8"):
        plan_packing([2, 9], 8)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        plan_packing([2], 0)


def test_config_gives_the_same_positions_as_the_model(patched):
    arch, model, _ = patched
    examples = _examples(arch)
    from_model = pack_examples(examples, 60, model_or_config=model, pad_token_id=0)
    from_config = pack_examples(examples, 60, model_or_config=model.config, pad_token_id=0)
    assert torch.equal(from_model["position_ids"], from_config["position_ids"])
    assert from_model["position_ids"].dim() == (2 if arch == "llava_onevision" else 3)


def test_each_example_gets_the_positions_the_model_gives_it_alone(patched):
    # RoPE sees only position differences inside an example, so logits alone cannot tell a restart
    # from a shift: compare with the positions the model computes for the example by itself.
    arch, model, _ = patched
    examples = _examples(arch)
    lengths = [e["input_ids"].numel() for e in examples]
    plan = plan_packing(lengths, max(lengths) + min(lengths))
    packed = pack_examples(examples, max(lengths) + min(lengths), model_or_config=model, pad_token_id=0, plan=plan)
    for index, (row, start) in row_starts(plan, lengths).items():
        alone = text_position_ids(model, {k: (v[None] if v.dim() == 1 and k != "batch_num_images" else v)
                                          for k, v in examples[index].items()})
        got = packed["position_ids"][..., row, start:start + lengths[index]]
        if alone is None:
            alone = torch.arange(lengths[index]).expand(got.shape)
        assert torch.equal(got, alone.reshape(got.shape)), f"{arch} example {index}"


def test_livr_train_with_packing_gives_the_losses_of_padded_training(tmp_path):
    from test_train import tiny_config, tiny_data, tiny_setup
    from livr_model.app.state import trainable_state_dict
    from livr_model.app.train import train

    runs = {}
    for packing in (False, True):
        losses = []
        model, processor = tiny_setup()
        # No LoRA dropout: its random masks are drawn per tensor shape, which packing changes.
        cfg = tiny_config(tmp_path / f"packing_{packing}", packing=packing, batch_size=4, grad_accum=1, lora_dropout=0.0,
                          stage_epochs=(1, 1), max_length=None, val_limit=1)
        result = train(cfg, model=model, processor=processor, train_examples=tiny_data()[0], val_examples=tiny_data()[1][:1],
                       step_callback=lambda info: losses.append(info.loss))
        runs[packing] = (losses, trainable_state_dict(result.model))
    (padded, padded_weights), (packed, packed_weights) = runs[False], runs[True]
    assert len(packed) == len(padded) == 4
    assert max(abs(a - b) for a, b in zip(packed, padded)) < LOSS_TOL * 10, (packed, padded)
    assert padded_weights.keys() == packed_weights.keys()
    for name in padded_weights:
        # Adam divides by sqrt(v): float-level gradient differences on near-zero gradients move weights by
        # up to ~3e-5 after 4 steps at lr 1e-2 (measured), well under one step's size.
        assert (packed_weights[name] - padded_weights[name]).abs().max().item() < WEIGHT_TOL * cfg.lr, name


@pytest.fixture(scope="module")
def tiny_app():
    from livr_model.app.data.synthetic import make_synthetic_dataset
    from livr_model.app.tiny import build_tiny_model as build_app_model, build_tiny_processor
    from livr_model.latents import add_latent_tokens

    processor = build_tiny_processor(28)
    model = build_app_model(processor, text_hidden=32, vision_hidden=32, layers=1, vision_depth=1)
    latent_ids = add_latent_tokens(model, processor, 4)
    examples = make_synthetic_dataset("counting", 2, image_size=28) + make_synthetic_dataset("jigsaw", 2, image_size=28)
    return model, processor, latent_ids, examples


@pytest.mark.parametrize("mode", ["livr", "mask-only", "image-twice", "sft"])
def test_encoder_packs_every_examples_kinds_and_labels_as_padded(tiny_app, mode):
    from livr_model.prompts import PromptEncoder

    model, processor, latent_ids, examples = tiny_app
    encoder = PromptEncoder.for_model(mode, model, processor, latent_ids, 4)
    encoded = [encoder.encode(e, with_answer=True) for e in examples]
    lengths = [e["input_ids"].numel() for e in encoded]
    max_length = max(lengths) + min(lengths)
    padded, padded_labels, padded_kinds = encoder.collate(encoded, padding_side="right")
    packed, packed_labels, packed_kinds = encoder.collate_packed(encoded, max_length, model)
    assert packed["input_ids"].shape[0] < len(examples)
    assert packed["position_ids"].shape[0] == 3 and "doc_ids" in packed
    starts = row_starts(plan_packing(lengths, max_length), lengths)
    for index, n in enumerate(lengths):
        row, start = starts[index]
        span = slice(start, start + n)
        # mask-only marks latent slots by position: the offsets must follow the example into its row.
        assert torch.equal(packed_kinds[row, span], padded_kinds[index, :n]), f"{mode} example {index}"
        assert torch.equal(packed_labels[row, start + 1:start + n], padded_labels[index, 1:n])
        assert torch.equal(packed["doc_ids"][row, span], torch.full((n,), packed["doc_ids"][row, start].item()))
    assert torch.equal(packed["pixel_values"].sort(0).values, padded["pixel_values"].sort(0).values)


def test_packing_flag_reaches_the_config():
    from livr_model.app.cli import resolve_train_config

    assert resolve_train_config(["--data", "synthetic:counting", "--packing"])[0].packing is True
    assert resolve_train_config(["--data", "synthetic:counting"])[0].packing is False
    with pytest.raises(ValueError, match="packing: expected true or false"):
        from livr_model.app.config import TrainConfig
        TrainConfig(packing="yes")


def test_pack_examples_rejects_bad_input(patched):
    arch, model, _ = patched
    examples = _examples(arch, LAYOUTS[:2])
    with pytest.raises(ValueError, match="packing supports image inputs only"):
        pack_examples([dict(examples[0], video_grid_thw=torch.ones(1, 3))], None, model_or_config=model, pad_token_id=0)
    with pytest.raises(ValueError, match="must place each of the 2 examples exactly once"):
        pack_examples(examples, None, model_or_config=model, pad_token_id=0, plan=[[0]])
    with pytest.raises(ValueError, match="example 0 has"):
        pack_examples(examples, 3, model_or_config=model, pad_token_id=0)
    with pytest.raises(ValueError, match="encoded\\[1\\] must be an encode_example output"):
        pack_examples([examples[0], {"input_ids": torch.zeros(2, 2)}], None, model_or_config=model, pad_token_id=0)
