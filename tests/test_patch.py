"""patch_attention on tiny Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision models (fp32, CPU)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from livr_kernels import RULES, AttentionRule, Segment
from livr_model import build_segment_ids, get_arch, get_handle, patch_attention
from livr_model.compat import cache_kwarg, enable_activation_checkpointing
from livr_model.patch import register_backend
from tiny_models import (
    ARCHS,
    TINY_TOKENS,
    TINY_VOCAB,
    BatchSpec,
    SampleLayout,
    build_tiny_model,
    explicit_mask_inputs,
    image_token_ids,
    make_batch,
)

EXACT = 1e-5
MULTI_IMAGE = [SampleLayout(num_images=1), SampleLayout(num_images=2, prefix=1, answer=2)]


def _batch(arch, padding_side="left", **kwargs):
    return make_batch(arch, BatchSpec(layouts=MULTI_IMAGE, padding_side=padding_side), **kwargs)


def _segments(batch):
    return build_segment_ids(
        batch["input_ids"],
        image_token_ids=image_token_ids(),
        latent_token_ids=TINY_TOKENS.latents,
        labels=batch["labels"],
        attention_mask=batch["attention_mask"],
    )


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _max_live_diff(a, b, batch):
    live = batch["attention_mask"].bool()
    return (a - b)[live].abs().max().item()


def _patch(model, rule="bottleneck", **kwargs):
    return patch_attention(model, rule=rule, latent_token_ids=TINY_TOKENS.latents, **kwargs)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_standard_rule_equals_sdpa_in_eval(arch, padding_side):
    model = build_tiny_model(arch)
    batch = _batch(arch, padding_side)
    expected = _logits(model, batch)
    handle = _patch(model, "standard")
    assert model.config.text_config._attn_implementation == "livr"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert _max_live_diff(_logits(model, batch), expected, batch) < EXACT
    handle.remove()


def test_attention_dropout_in_training_is_refused_not_dropped():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    for layer in model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.1
    batch = _batch(arch, "right")
    _patch(model, "bottleneck")
    model.eval()
    _logits(model, batch)  # eval: no dropout asked for
    model.train()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(**batch)


def test_the_layers_own_scaling_reaches_the_kernel():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    batch = _batch(arch, "right")
    default = _logits(model, batch)
    for layer in model.model.language_model.layers:
        layer.self_attn.scaling = 0.3
    expected = _logits(model, batch)
    assert _max_live_diff(expected, default, batch) > 1e-3, "the scaling must matter for the check to mean anything"
    _patch(model, "standard")
    assert _max_live_diff(_logits(model, batch), expected, batch) < EXACT


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_standard_rule_matches_loss_and_gradients_in_train(arch, checkpointing):
    model = build_tiny_model(arch).train()
    batch = _batch(arch, "right")
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    if checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
    _patch(model, "standard")
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, atol=EXACT, rtol=0)
    assert grads.keys() == grads_ref.keys() and any("language_model" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=EXACT, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rule", ["bottleneck", "bottleneck_answer_only"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rules_equal_the_unpatched_model_with_an_explicit_4d_mask(arch, rule):
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    expected = _logits(model, explicit_mask_inputs(model, batch, _segments(batch), rule))
    standard = _logits(model, batch)
    _patch(model, rule)
    got = _logits(model, batch)
    assert _max_live_diff(got, expected, batch) < EXACT
    assert _max_live_diff(got, standard, batch) > 1e-3, "the rule should change the logits"


@pytest.mark.parametrize("arch", ARCHS)
def test_boolean_4d_mask_is_an_equivalent_reference_without_padding(arch):
    model = build_tiny_model(arch)
    layouts = [SampleLayout(num_images=1), SampleLayout(num_images=1, prefix=3)]
    batch = make_batch(arch, BatchSpec(layouts=layouts))
    assert bool(batch["attention_mask"].all())
    segments = _segments(batch)
    additive = _logits(model, explicit_mask_inputs(model, batch, segments, "bottleneck"))
    boolean = _logits(model, explicit_mask_inputs(model, batch, segments, "bottleneck", additive=False))
    assert (additive - boolean).abs().max().item() < EXACT


def _positions(segments, row, kind):
    return (segments[row] == int(kind)).nonzero().flatten()


@pytest.mark.parametrize("arch", ARCHS)
def test_bottleneck_hides_the_image_from_text_but_not_from_answers(arch):
    model = build_tiny_model(arch)
    batch = _batch(arch, "left", pixel_seed=1)
    other_pixels = _batch(arch, "left", pixel_seed=2)
    assert torch.equal(batch["input_ids"], other_pixels["input_ids"])
    segments = _segments(batch)
    standard_a, standard_b = _logits(model, batch), _logits(model, other_pixels)
    _patch(model, "bottleneck")
    logits_a, logits_b = _logits(model, batch), _logits(model, other_pixels)
    for row in range(segments.shape[0]):
        first_image = _positions(segments, row, Segment.IMAGE).min()
        first_latent = _positions(segments, row, Segment.LATENT).min()
        text = _positions(segments, row, Segment.TEXT)
        between = text[(text > first_image) & (text < first_latent)]
        answer = _positions(segments, row, Segment.ANSWER)
        assert len(between) >= 2 and len(answer) >= 2
        assert (logits_a[row, between] - logits_b[row, between]).abs().max().item() < 1e-6
        assert (standard_a[row, between] - standard_b[row, between]).abs().max().item() > 1e-4
        assert (logits_a[row, answer] - logits_b[row, answer]).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_exact_logits_and_set_rule_switches_in_place(arch):
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    original = _logits(model, batch)
    handle = _patch(model, "bottleneck")
    assert get_handle(model) is handle
    bottleneck = _logits(model, batch)
    assert handle.set_rule("standard") is RULES["standard"] and handle.rule.name == "standard"
    assert _max_live_diff(_logits(model, batch), original, batch) < EXACT
    handle.set_rule(RULES["bottleneck"])
    assert torch.equal(_logits(model, batch), bottleneck)
    handle.remove()
    assert torch.equal(_logits(model, batch), original)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert get_handle(model) is None
    handle.remove()
    again = _patch(model, "bottleneck")
    assert torch.equal(_logits(model, batch), bottleneck)
    again.remove()


@pytest.mark.parametrize("patch_first", [True, False], ids=["patch-then-wrap", "wrap-then-patch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_model_patched_through_base_or_wrapper(arch, patch_first):
    base = build_tiny_model(arch)
    batch = _batch(arch, "left")
    # Random LoRA B matrices, so the adapters change the output and the comparison means something.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=get_arch(base).lora_target_regex, init_lora_weights=False)
    reference = get_peft_model(copy.deepcopy(base), config)
    expected = _logits(reference, explicit_mask_inputs(reference.get_base_model(), batch, _segments(batch), "bottleneck"))
    if patch_first:
        handle = _patch(base, "bottleneck")
        model = get_peft_model(base, config)
        model.load_state_dict(reference.state_dict())
    else:
        model = get_peft_model(base, config)
        model.load_state_dict(reference.state_dict())
        handle = _patch(model, "bottleneck")
    assert get_handle(model) is handle
    assert _max_live_diff(_logits(model, batch), expected, batch) < EXACT
    handle.remove()
    assert _max_live_diff(_logits(model, batch), _logits(reference, batch), batch) < EXACT


@pytest.mark.parametrize("arch", ARCHS)
def test_user_segment_ids_override_derivation_for_the_mask_only_ablation(arch):
    model = build_tiny_model(arch)
    layouts = [SampleLayout(num_latents=0, suffix=4), SampleLayout(num_latents=0, suffix=4, prefix=2)]
    batch = make_batch(arch, BatchSpec(layouts=layouts, padding_side="left"))
    segments = _segments(batch)
    assert not (segments == int(Segment.LATENT)).any()
    # Mark the K = 3 text tokens before the answer as latents, by position.
    custom = segments.clone()
    for row in range(custom.shape[0]):
        first_answer = _positions(segments, row, Segment.ANSWER).min()
        custom[row, first_answer - 3 : first_answer] = int(Segment.LATENT)
    expected = _logits(model, explicit_mask_inputs(model, batch, custom, "bottleneck"))
    derived = _logits(model, explicit_mask_inputs(model, batch, segments, "bottleneck"))
    _patch(model, "bottleneck")
    got = _logits(model, dict(batch, segment_ids=custom))
    assert _max_live_diff(got, expected, batch) < EXACT
    assert _max_live_diff(got, derived, batch) > 1e-3


def test_user_segment_ids_without_pad_take_the_padding_from_the_attention_mask():
    """Custom kinds given with TEXT where the batch is padded: the attention_mask still makes those keys PAD."""
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    segments = _segments(batch)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    unpadded = segments.masked_fill(padding, int(Segment.TEXT))
    _patch(model, "bottleneck")
    expected = _logits(model, dict(batch, segment_ids=segments))
    assert _max_live_diff(_logits(model, dict(batch, segment_ids=unpadded)), expected, batch) < EXACT


def test_document_ids_from_the_forward_or_a_callable():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    batch = _batch(arch, "right")
    segments = _segments(batch)
    doc_ids = torch.zeros_like(segments)
    doc_ids[:, segments.shape[1] // 2 :] = 1
    expected = _logits(model, explicit_mask_inputs(model, batch, segments, "bottleneck", doc_ids))
    handle = _patch(model, "bottleneck")
    assert _max_live_diff(_logits(model, dict(batch, doc_ids=doc_ids)), expected, batch) < EXACT
    handle.remove()
    handle = _patch(model, "bottleneck", doc_ids=lambda kwargs: doc_ids)
    assert _max_live_diff(_logits(model, batch), expected, batch) < EXACT
    assert _max_live_diff(_logits(model, batch), _logits(model, dict(batch, doc_ids=torch.zeros_like(doc_ids))), batch) > 1e-3


def test_capture_attention_matches_eager_weights_and_respects_the_rule():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    segments = _segments(batch)
    live = batch["attention_mask"].bool()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    handle = _patch(model, "standard")
    with handle.capture_attention() as capture, torch.no_grad():
        returned = model(**batch, output_attentions=True).attentions
    num_layers = model.config.text_config.num_hidden_layers
    assert len(capture.weights) == num_layers == len(eager)
    assert torch.equal(capture.segment_ids, segments)
    for got, also, want in zip(capture.weights, returned, eager):
        assert torch.equal(got, also)
        assert got.shape == want.shape == (2, 4, segments.shape[1], segments.shape[1])
        assert (got - want).permute(0, 2, 1, 3)[live].abs().max().item() < EXACT

    handle.set_rule("bottleneck")
    with handle.capture_attention() as capture:
        _logits(model, batch)
    answer_rows = (segments == int(Segment.ANSWER))[:, None, :, None]
    image_cols = (segments == int(Segment.IMAGE))[:, None, None, :]
    for weights in capture.weights:
        assert weights[(answer_rows & image_cols).expand_as(weights)].abs().max().item() == 0.0
        row_sums = weights.sum(-1).permute(0, 2, 1)
        torch.testing.assert_close(row_sums[live], torch.ones_like(row_sums[live]))
        assert row_sums[~live].abs().max().item() == 0.0
    answer_to_latent = capture.weights[-1][(answer_rows & (segments == int(Segment.LATENT))[:, None, None, :]).expand_as(capture.weights[-1])]
    assert answer_to_latent.sum().item() > 0
    _logits(model, batch)
    assert len(capture.weights) == num_layers, "forwards after the block are not captured"


def test_inputs_embeds_need_explicit_segment_ids():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    text_only = make_batch(arch, BatchSpec(layouts=[SampleLayout(num_images=0)] * 2))
    segments = _segments(text_only)
    inputs = {k: text_only[k] for k in ("input_ids", "attention_mask", "labels")}
    _patch(model, "bottleneck")
    expected = _logits(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    with pytest.raises(ValueError, match="cannot derive segment ids"):
        _logits(model, from_embeds)
    got = _logits(model, dict(from_embeds, segment_ids=segments))
    assert _max_live_diff(got, expected, text_only) < EXACT


def test_errors_are_value_errors_naming_the_problem():
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    with pytest.raises(ValueError, match="rule must be one of"):
        patch_attention(model, rule="bottlenek", latent_token_ids=TINY_TOKENS.latents)
    for bad in ((TINY_VOCAB,), (-1,)):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            patch_attention(model, latent_token_ids=bad)
    with pytest.raises(ValueError, match="placeholder"):
        patch_attention(model, latent_token_ids=(TINY_TOKENS.image,))
    with pytest.raises(ValueError, match="doc_ids must be None or a callable"):
        patch_attention(model, latent_token_ids=TINY_TOKENS.latents, doc_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        patch_attention(model, latent_token_ids=TINY_TOKENS.latents, kernel_backend="cuda")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        patch_attention(torch.nn.Linear(2, 2))
    missing = build_tiny_model(arch)
    # A remote-code config without the attribute (strict transformers configs refuse None).
    object.__setattr__(missing.config, "image_token_id", None)
    with pytest.raises(ValueError, match="image token id"):
        patch_attention(missing, latent_token_ids=TINY_TOKENS.latents)

    handle = _patch(model, "bottleneck")
    assert model.config.text_config._attn_implementation == "livr"
    with pytest.raises(ValueError, match="rule must be one of"):
        handle.set_rule("nope")
    assert handle.rule.name == "bottleneck"
    with pytest.raises(ValueError, match="already patched"):
        _patch(model)
    segments = _segments(batch)
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        _logits(model, explicit_mask_inputs(model, batch, segments, "bottleneck"))
    with pytest.raises(ValueError, match="segment_ids must cover"):
        _logits(model, dict(batch, segment_ids=segments[:, 1:]))
    with pytest.raises(ValueError, match="segment_ids must have"):
        _logits(model, dict(batch, segment_ids=segments.float()))
    with pytest.raises(ValueError, match="segment_ids"):
        _logits(model, dict(batch, segment_ids=segments + 10))
    model.set_attn_implementation({"text_config": "sdpa"})
    with pytest.raises(ValueError, match="switched to 'sdpa' after patch_attention"):
        _logits(model, batch)
    handle.remove()

    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, **{cache_kwarg(model): cache}, use_cache=True)
    handle = _patch(model, "bottleneck")
    step = {"input_ids": batch["input_ids"][:, -1:], "attention_mask": torch.ones(2, batch["input_ids"].shape[1] + 1, dtype=torch.long)}
    with pytest.raises(ValueError, match="KV cache holds"):
        _logits(model, dict(step, **{cache_kwarg(model): cache}))
    handle.remove()

    register_backend()
    model.set_attn_implementation({"text_config": "livr"})
    with pytest.raises(ValueError, match="got no segment ids"):
        _logits(model, batch)


def test_custom_rule_object_is_accepted():
    arch = "llava_onevision"
    model = build_tiny_model(arch)
    batch = _batch(arch, "left")
    latents_blind = AttentionRule.from_blocked("latent_blind", [(Segment.ANSWER, Segment.LATENT), (Segment.ANSWER, Segment.IMAGE)])
    expected = _logits(model, explicit_mask_inputs(model, batch, _segments(batch), latents_blind))
    handle = _patch(model, latents_blind)
    assert handle.rule is latents_blind
    assert _max_live_diff(_logits(model, batch), expected, batch) < EXACT


@pytest.mark.interpreter
def test_triton_kernels_inside_the_model_match_the_reference_path():
    # The real kernels (Triton interpreter on CPU) behind the model: one layout shared by the layers,
    # forward and backward through the autograd Function, GQA heads un-repeated.
    arch = "qwen2_5_vl"
    model = build_tiny_model(arch).train()
    batch = _batch(arch, "left")
    handle = _patch(model, "bottleneck", kernel_backend="reference")
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    handle.remove()
    _patch(model, "bottleneck", kernel_backend="triton")
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_model_under_bf16_autocast_trains(arch):
    """Autocast hands the attention fp32 q/k (rotary runs in fp32) and a bf16 v: the patched
    attention must run in the autocast dtype as SDPA does, and match it."""
    model = build_tiny_model(arch)
    batch = _batch(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss.float()
    _patch(model, "standard")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - expected.item()) < 2e-2 * max(1.0, abs(expected.item()))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
