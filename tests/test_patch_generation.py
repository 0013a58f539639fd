"""model.generate with the KV cache under every rule, against references without a cache."""
import pytest
import torch

from livr_kernels import Segment
from livr_model import build_segment_ids, patch_attention
from livr_model.compat import cache_kwarg
from tiny_models import (
    ARCHS,
    TINY_TOKENS,
    BatchSpec,
    SampleLayout,
    build_tiny_model,
    explicit_mask_inputs,
    image_token_ids,
    make_batch,
    prompt_only,
)

NEW_TOKENS = 5
ANSWER_LEN = 3


def _prompt(arch, **layout):
    layouts = [SampleLayout(num_images=1, **layout), SampleLayout(num_images=2, prefix=1, **layout)]
    return prompt_only(make_batch(arch, BatchSpec(layouts=layouts, padding_side="left")), ANSWER_LEN)


def _prompt_segments(prompt):
    return build_segment_ids(
        prompt["input_ids"],
        image_token_ids=image_token_ids(),
        latent_token_ids=TINY_TOKENS.latents,
        attention_mask=prompt["attention_mask"],
    )


def _generate(model, prompt, **kwargs):
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, prompt["input_ids"].shape[1] :]


def _reference_greedy(model, prompt, prompt_segments, rule):
    """Greedy decoding by the unpatched model, recomputing the whole sequence under an explicit 4-D
    mask at every step; generated tokens are ANSWER."""
    input_ids, attention_mask = prompt["input_ids"], prompt["attention_mask"]
    batch = input_ids.shape[0]
    generated = []
    for step in range(NEW_TOKENS):
        inputs = dict(prompt, input_ids=input_ids, attention_mask=attention_mask)
        if "mm_token_type_ids" in prompt:
            text = torch.zeros(batch, step, dtype=torch.long)
            inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], text], dim=1)
        answers = torch.full((batch, step), int(Segment.ANSWER))
        segments = torch.cat([prompt_segments, answers], dim=1)
        with torch.no_grad():
            logits = model(**explicit_mask_inputs(model, inputs, segments, rule)).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        generated.append(token)
        input_ids = torch.cat([input_ids, token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
    return torch.cat(generated, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_standard_rule_reproduces_unpatched_greedy_tokens(arch):
    model = build_tiny_model(arch)
    prompt = _prompt(arch)
    expected = _generate(model, prompt)
    handle = patch_attention(model, rule="standard", latent_token_ids=TINY_TOKENS.latents)
    assert torch.equal(_generate(model, prompt), expected)
    handle.remove()
    # The reference loop itself reproduces the cached generation under the standard rule.
    assert torch.equal(_reference_greedy(model, prompt, _prompt_segments(prompt), "standard"), expected)


@pytest.mark.parametrize("rule", ["bottleneck", "bottleneck_answer_only"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rules_in_generation_equal_a_full_recompute_reference(arch, rule):
    model = build_tiny_model(arch)
    prompt = _prompt(arch)
    segments = _prompt_segments(prompt)
    expected = _reference_greedy(model, prompt, segments, rule)
    handle = patch_attention(model, rule=rule, latent_token_ids=TINY_TOKENS.latents)
    with handle.capture_attention() as capture:
        got = _generate(model, prompt)
    assert torch.equal(got, expected)
    # The last decode step saw the prompt's kinds followed by ANSWER for every generated token.
    prompt_len = segments.shape[1]
    assert capture.segment_ids.shape == (2, prompt_len + NEW_TOKENS - 1)
    assert torch.equal(capture.segment_ids[:, :prompt_len], segments)
    assert (capture.segment_ids[:, prompt_len:] == int(Segment.ANSWER)).all()
    assert capture.weights[0].shape[2] == 1, "decode steps attend from one new query over the cached keys"


def test_generated_tokens_are_answer_not_text():
    # Under bottleneck_answer_only, TEXT may see the image and ANSWER may not: treating generated
    # tokens as TEXT would follow a different trajectory than the reference.
    arch = "qwen3_vl"
    model = build_tiny_model(arch)
    prompt = _prompt(arch)
    segments = _prompt_segments(prompt)
    as_answer = _reference_greedy(model, prompt, segments, "bottleneck_answer_only")
    as_text = _reference_greedy(model, prompt, segments, "standard")
    assert not torch.equal(as_answer, as_text), "the check needs the two readings to disagree"
    patch_attention(model, rule="bottleneck_answer_only", latent_token_ids=TINY_TOKENS.latents)
    assert torch.equal(_generate(model, prompt), as_answer)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava_onevision"])
def test_generation_with_user_segment_ids(arch):
    # The mask-only ablation at test time: no latent tokens, K prompt tokens marked LATENT by position.
    model = build_tiny_model(arch)
    prompt = _prompt(arch, num_latents=0, suffix=4)
    custom = _prompt_segments(prompt)
    custom[:, -3:] = int(Segment.LATENT)
    expected = _reference_greedy(model, prompt, custom, "bottleneck")
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=())
    with handle.use_segment_ids(custom):
        assert torch.equal(_generate(model, prompt), expected)
    assert not torch.equal(_generate(model, prompt), expected), "outside the block the kinds are derived again"


def test_offered_prompt_kinds_never_label_generated_tokens():
    # Regression: with use_segment_ids, a decode step as long as the prompt (1 token each) took the
    # prompt's kinds for the new token instead of ANSWER.
    model = build_tiny_model("qwen2_5_vl", num_layers=1)
    handle = patch_attention(model, rule="bottleneck_answer_only", latent_token_ids=TINY_TOKENS.latents)
    input_ids = torch.full((1, 1), TINY_TOKENS.first_special - 1)
    prompt = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": torch.zeros_like(input_ids)}
    with handle.use_segment_ids(torch.full((1, 1), int(Segment.TEXT))), handle.capture_attention() as capture:
        _generate(model, prompt)
    keys = capture.segment_ids.shape[1]
    assert keys > 1 and capture.segment_ids.tolist() == [[int(Segment.TEXT)] + [int(Segment.ANSWER)] * (keys - 1)]


def test_manual_decode_with_the_returned_cache_and_documents():
    # A cache the model creates itself (no cache passed in) and document ids that continue into decode.
    arch = "llava_onevision"
    model = build_tiny_model(arch)
    prompt = _prompt(arch)
    segments = _prompt_segments(prompt)
    docs = torch.zeros_like(segments)
    docs[:, segments.shape[1] // 2 :] = 1
    patch_attention(model, rule="bottleneck", latent_token_ids=TINY_TOKENS.latents)
    with torch.no_grad():
        prefill = model(**prompt, doc_ids=docs, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(token)], dim=1)
        name = cache_kwarg(model)
        step = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: getattr(prefill, name)})
        full_ids = torch.cat([prompt["input_ids"], token], dim=1)
        full_segments = torch.cat([segments, torch.full_like(token, int(Segment.ANSWER))], dim=1)
        full_docs = torch.cat([docs, docs[:, -1:]], dim=1)
        recompute = model(
            input_ids=full_ids, attention_mask=mask, pixel_values=prompt["pixel_values"],
            image_sizes=prompt["image_sizes"], batch_num_images=prompt["batch_num_images"],
            segment_ids=full_segments, doc_ids=full_docs, use_cache=False,
        )
        without_docs = model(
            input_ids=full_ids, attention_mask=mask, pixel_values=prompt["pixel_values"],
            image_sizes=prompt["image_sizes"], batch_num_images=prompt["batch_num_images"],
            segment_ids=full_segments, use_cache=False,
        )
        # Kinds given over every key at the decode step: the new token still continues the cached last document.
        prefill = model(**prompt, doc_ids=docs, use_cache=True)
        given = model(input_ids=token, attention_mask=mask, segment_ids=full_segments, use_cache=True,
                      **{name: getattr(prefill, name)})
    assert (step.logits[:, -1] - recompute.logits[:, -1]).abs().max().item() < 1e-5
    assert (given.logits[:, -1] - recompute.logits[:, -1]).abs().max().item() < 1e-5
    assert (step.logits[:, -1] - without_docs.logits[:, -1]).abs().max().item() > 1e-3
