"""Property tests (hypothesis) of the model-side layout: segment kinds from ids, labels and padding;
the prompt encoder of every mode (latents placed, answer-only labels, image placeholders); batching
with left or right padding; the TRL / Trainer collator; packing; and the per-forward layout of a
patched model with a KV cache. Each property is checked against an oracle written from the design's
rules, on random questions, answers, images (0-3, of different token counts), K and modes, with the
tiny offline processor."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from livr_kernels import Segment, segment_mask
from livr_model import LivrCollator, build_segment_ids
from livr_model.app.tiny import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_tiny_processor
from livr_model.app.tiny import build_tiny_model as build_app_model
from livr_model.examples import LETTERS, Example, answer_text, format_prompt
from livr_model.forward_layout import layout_for_forward, remember_keys
from livr_model.latents import latent_token_strings
from livr_model.modes import get_mode
from livr_model.packing import plan_packing, row_starts
from livr_model.prompts import PromptEncoder, vocabulary_latent_ids
from livr_model.segment_ids import IGNORE_INDEX

TEXT, IMAGE, LATENT, ANSWER, PAD = (int(s) for s in (Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER, Segment.PAD))
MAX_K = 16
# The tiny processor at 28 pixels: 7-pixel patches merged 2x2, so an image is 1, 2 or 4 placeholder tokens.
IMAGE_SIDE = 28
IMAGE_SIZES = [(14, 14), (28, 14), (14, 28), (28, 28), (21, 27)]
MERGE_AREA = 4
MAX_IMAGES = 3
MODES = ["livr", "livr-answer-only", "latents-only", "mask-only", "prompt-tuning", "sft", "image-twice"]
# The chat template's text after the user turn's text: where the latents go, and the assistant header.
TEMPLATE_SUFFIX = f"{IM_END}\n{IM_START}assistant\n"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Letters of the template's own words are the texts most likely to be mistaken for its glue.
TEXT_ALPHABET = "astinumer ABC?.,\n01()-é"
TEMPLATE_WORDS = ["a", "t", "n", "ant", "assistant", "user", "s\n"]
# Token-level properties run on a toy vocabulary: two image ids, two latent ids, the rest text.
TOY_VOCAB = 8
TOY_IMAGE_IDS = (0, 1)
TOY_LATENT_IDS = (2, 3)


@pytest.fixture(scope="module")
def tiny():
    processor = build_tiny_processor(IMAGE_SIDE)
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(latent_token_strings(MAX_K), special_tokens=True)
    latent_ids = tuple(tokenizer.convert_tokens_to_ids(latent_token_strings(MAX_K)))
    image_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD))
    vocab_ids = tuple(vocabulary_latent_ids(processor, MAX_K))
    config = build_app_model(processor, text_hidden=32, vision_hidden=32, layers=1, vision_depth=1).config
    return dict(processor=processor, latent_ids=latent_ids, image_ids=image_ids, vocab_ids=vocab_ids, config=config)


def encoder_for(tiny, mode: str, k: int, max_length=None) -> PromptEncoder:
    spec = get_mode(mode)
    return PromptEncoder(
        processor=tiny["processor"], mode=mode,
        latent_text="".join(latent_token_strings(k)) if spec.new_latents else "",
        latent_token_ids=tiny["latent_ids"][:k] if spec.new_latents else (),
        image_token_ids=tiny["image_ids"],
        vocab_latent_ids=tiny["vocab_ids"][:k] if spec.vocab_latents else (),
        max_length=max_length,
    )


def collator_for(tiny, mode: str, k: int, **kwargs) -> LivrCollator:
    spec = get_mode(mode)
    return LivrCollator(tiny["processor"], latent_token_ids=tiny["latent_ids"][:k] if spec.new_latents else (), mode=mode,
                        num_latents=k if spec.vocab_latents else None, **kwargs)


texts = st.one_of(st.sampled_from(TEMPLATE_WORDS), st.text(alphabet=TEXT_ALPHABET, min_size=1, max_size=16).filter(str.strip))


@st.composite
def examples(draw, max_images=MAX_IMAGES):
    sizes = draw(st.lists(st.sampled_from(IMAGE_SIZES), max_size=max_images))
    images = [Image.new("RGB", size, (40 * i, 90, 200)) for i, size in enumerate(sizes)]
    choices = draw(st.one_of(st.just([]), st.lists(texts, min_size=2, max_size=4)))
    answer = draw(st.sampled_from(LETTERS[: len(choices)])) if choices else draw(texts)
    return Example(images=images, question=draw(texts), choices=choices, answer=answer)


def alone(encoder, example, with_answer=True, **kwargs):
    """(ids, kinds, labels, attention mask, token types) of one example batched by itself, as lists."""
    batch, labels, kinds = encoder.batch([example], with_answer=with_answer, padding_side="right", **kwargs)
    return ([batch["input_ids"][0].tolist(), kinds[0].tolist(), labels[0].tolist(), batch["attention_mask"][0].tolist(),
             batch["mm_token_type_ids"][0].tolist()])


def decode(tiny, ids):
    return tiny["processor"].tokenizer.decode(ids)


def runs(flags):
    """(start, length) of each run of True in ``flags``."""
    out, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - start))
            start = None
    return out


def latent_positions(kinds):
    return [i for i, kind in enumerate(kinds) if kind == LATENT]


@given(example=examples(), mode=st.sampled_from(MODES), k=st.integers(1, MAX_K))
@example(example=Example(images=[Image.new("RGB", (28, 28))], question="a", choices=[], answer="3"), mode="mask-only", k=3)
@example(example=Example(images=[Image.new("RGB", (28, 14))], question="Which?", choices=["x", "y"], answer="B"),
         mode="image-twice", k=1)
@FAST
def test_encoded_example_layout(tiny, example, mode, k):
    spec = get_mode(mode)
    encoder = encoder_for(tiny, mode, k)
    ids, kinds, labels, attention, types = alone(encoder, example)
    prompt_ids, prompt_kinds, prompt_labels, _, _ = alone(encoder, example, with_answer=False)
    n, start = len(ids), len(prompt_ids)
    # Training and evaluation encode the same prompt; the answer follows it and is all that is supervised.
    assert ids[:start] == prompt_ids and prompt_kinds == kinds[:start] and set(prompt_labels) == {IGNORE_INDEX}
    assert kinds[start:] == [ANSWER] * (n - start) and labels[start:] == ids[start:]
    assert labels[:start] == [IGNORE_INDEX] * start and attention == [1] * n
    assert decode(tiny, ids[start:]) == answer_text(example) + IM_END
    # IMAGE exactly on the placeholders: one run per image, of the image's own token count.
    assert [kind == IMAGE for kind in kinds] == [i in tiny["image_ids"] for i in ids] == [t == 1 for t in types]
    grid = encoder.batch([example], with_answer=False, padding_side="right")[0].get("image_grid_thw")
    images = len(encoder.prepare(example).images)
    assert [length for _, length in runs(kind == IMAGE for kind in kinds)] == (
        [] if grid is None else (grid.prod(-1) // MERGE_AREA).tolist())
    assert images == (0 if grid is None else len(grid))
    # K latents, contiguous, after every image token and the question, right before the template's end of turn.
    latent_runs = runs(kind == LATENT for kind in kinds)
    if not spec.has_latents:
        assert latent_runs == []
        first = last = start - len(tiny["processor"].tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"])
    else:
        assert len(latent_runs) == 1 and latent_runs[0][1] == k
        first, last = latent_runs[0][0], latent_runs[0][0] + k
        expected = tiny["latent_ids"][:k] if spec.new_latents else tiny["vocab_ids"][:k]
        assert tuple(ids[first:last]) == expected
    assert decode(tiny, ids[last:start]) == TEMPLATE_SUFFIX
    placeholders = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
    user = decode(tiny, ids[:first])
    assert user.replace(IMAGE_PAD, "").replace(VISION_START + VISION_END, placeholders) == (
        f"{IM_START}user\n" + placeholders * images + format_prompt(example))


@given(example=examples(), mode=st.sampled_from(["livr", "latents-only", "mask-only", "prompt-tuning"]),
       k=st.integers(1, MAX_K))
@example(example=Example(images=[], question="t", choices=[], answer="B"), mode="mask-only", k=1)
@FAST
def test_latents_are_the_only_difference_between_modes(tiny, example, mode, k):
    """Removing a mode's LATENT tokens gives the sft encoding; mask-only's borrowed tokens sit exactly
    where livr's new ones do; ``drop_latents`` is the sft encoding."""
    sft = alone(encoder_for(tiny, "sft", k), example)
    encoder = encoder_for(tiny, mode, k)
    ids, kinds, labels, _, types = alone(encoder, example)
    keep = [kind != LATENT for kind in kinds]
    assert [[v for v, kept in zip(column, keep) if kept] for column in (ids, kinds, labels, types)] == [sft[0], sft[1], sft[2], sft[4]]
    assert alone(encoder, example, drop_latents=True) == sft
    livr_kinds = alone(encoder_for(tiny, "livr", k), example)[1]
    assert latent_positions(kinds) == latent_positions(livr_kinds)


def test_mask_only_latents_follow_a_question_the_template_also_contains(tiny):
    """Regression: mask-only found the latent slot at the last occurrence of the question's text in the
    rendered prompt; "a" also occurs in the template's "assistant", so the borrowed tokens landed inside
    the assistant header (for "e", from "<|im_end|>", among the image tokens), and the count was cached
    for every later question with as many images."""
    image = Image.new("RGB", (28, 14))
    questions = [Example([image], "a", [], "3"), Example([image], "How many dots?", [], "3"), Example([image], "e", [], "3")]
    mask_only, livr = encoder_for(tiny, "mask-only", 2), encoder_for(tiny, "livr", 2)
    collator = collator_for(tiny, "mask-only", 2)
    for case in questions:
        expected = latent_positions(alone(livr, case)[1])
        assert latent_positions(alone(mask_only, case)[1]) == expected, case.question
        assert latent_positions(collator([row_formats(case)["messages"]])["segment_ids"][0].tolist()) == expected


@given(batch=st.lists(examples(max_images=2), min_size=1, max_size=4), mode=st.sampled_from(MODES),
       k=st.integers(1, MAX_K), side=st.sampled_from(["left", "right"]), with_answer=st.booleans())
@FAST
def test_batch_is_each_example_alone_padded(tiny, batch, mode, k, side, with_answer):
    encoder = encoder_for(tiny, mode, k)
    inputs, labels, kinds = encoder.batch(batch, with_answer=with_answer, padding_side=side)
    pad_id = encoder.pad_token_id
    width = inputs["input_ids"].shape[1]
    singles = [encoder.batch([e], with_answer=with_answer, padding_side=side) for e in batch]
    assert width == max(s[0]["input_ids"].shape[1] for s in singles)
    for row, (one, one_labels, one_kinds) in enumerate(singles):
        n = one["input_ids"].shape[1]
        span = slice(width - n, width) if side == "left" else slice(0, n)
        pad = [i for i in range(width) if not span.start <= i < span.stop]
        for name, got, want, fill in (("input_ids", inputs["input_ids"], one["input_ids"], pad_id),
                                      ("attention_mask", inputs["attention_mask"], one["attention_mask"], 0),
                                      ("mm_token_type_ids", inputs["mm_token_type_ids"], one["mm_token_type_ids"], 0),
                                      ("labels", labels, one_labels, IGNORE_INDEX), ("kinds", kinds, one_kinds, PAD)):
            assert got[row, span].tolist() == want[0].tolist(), name
            assert got[row, pad].tolist() == [fill] * len(pad), name
    for key in ("pixel_values", "image_grid_thw"):
        parts = [s[0][key] for s in singles if key in s[0]]
        assert (key in inputs) == bool(parts)
        if parts:
            assert torch.equal(inputs[key], torch.cat(parts))


def row_formats(example):
    user = {"role": "user", "content": [{"type": "image"} for _ in example.images] + [{"type": "text", "text": format_prompt(example)}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": answer_text(example)}]}
    return {
        "messages": {"images": example.images, "messages": [user, reply]},
        "prompt_completion": {"images": example.images, "prompt": [user], "completion": [reply]},
        "prompt_completion_text": {"images": example.images, "prompt": format_prompt(example), "completion": answer_text(example)},
        "livr": {"images": example.images, "question": example.question, "choices": example.choices, "answer": example.answer},
    }


@given(batch=st.lists(st.tuples(examples(max_images=2), st.sampled_from(list(row_formats(Example([], "q", [], "a"))))),
                      min_size=1, max_size=4),
       mode=st.sampled_from(["livr", "mask-only", "sft", "livr-answer-only"]), k=st.integers(1, MAX_K), packing=st.booleans())
@FAST
def test_collator_equals_the_encoder_on_examples(tiny, batch, mode, k, packing):
    collator = collator_for(tiny, mode, k, packing=packing, model=tiny["config"] if packing else None)
    out = collator([row_formats(e)[name] for e, name in batch])
    encoder = encoder_for(tiny, mode, k)
    # The trainer's encoder and the collator must call the same tokens IMAGE (video placeholders included).
    assert collator.encoder.image_token_ids == encoder.image_token_ids
    encoded = [encoder.encode(e, with_answer=True) for e, _ in batch]
    if packing:
        inputs, labels, kinds = encoder.collate_packed(encoded, None, tiny["config"])
    else:
        inputs, labels, kinds = encoder.collate(encoded, padding_side="right")
    assert torch.equal(out["segment_ids"], kinds) and torch.equal(out["labels"], labels)
    for key, value in inputs.items():
        assert torch.equal(out[key], value), key


@given(example=examples(max_images=2), history=st.lists(st.tuples(texts, texts), min_size=1, max_size=2),
       mode=st.sampled_from(["livr", "mask-only", "sft"]), k=st.integers(1, MAX_K))
@FAST
def test_earlier_turns_are_prompt_text(tiny, example, history, mode, k):
    """A chat history before the last user turn adds its own tokens, all TEXT and unsupervised, in front
    of the row and changes nothing else: latents and labels go with the last user turn and its reply."""
    collator = collator_for(tiny, mode, k)
    turns = [turn for question, reply in history for turn in ({"role": "user", "content": question},
                                                              {"role": "assistant", "content": reply})]
    row = row_formats(example)["messages"]
    without, with_history = collator([row]), collator([dict(row, messages=turns + row["messages"])])
    rendered = tiny["processor"].apply_chat_template(turns, tokenize=False)
    prefix = tiny["processor"].tokenizer(rendered, add_special_tokens=False)["input_ids"]
    n = len(prefix)
    assert with_history["input_ids"][0].tolist() == prefix + without["input_ids"][0].tolist()
    assert with_history["segment_ids"][0].tolist() == [TEXT] * n + without["segment_ids"][0].tolist()
    assert with_history["labels"][0].tolist() == [IGNORE_INDEX] * n + without["labels"][0].tolist()


def dense(kinds, rule):
    """The dense mask of one row of kinds, (N, N)."""
    return segment_mask(torch.as_tensor(kinds)[None], rule)[0]


@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=12), extra=st.integers(0, 100), unbounded=st.booleans())
@settings(max_examples=80, deadline=None)
def test_packing_plan_places_each_example_once_and_never_leaves_mergeable_rows(lengths, extra, unbounded):
    max_length = None if unbounded else max(lengths) + extra
    plan = plan_packing(lengths, max_length)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in plan]
    if max_length is None:
        assert len(plan) == 1
    else:
        assert max(loads) <= max_length
        # A row is opened only for an example that fits in no open row, so no two rows fit together.
        assert all(a + b > max_length for i, a in enumerate(loads) for b in loads[i + 1:])
    starts = row_starts(plan, lengths)
    for row, indices in enumerate(plan):
        assert [starts[i] for i in indices] == [(row, sum(lengths[j] for j in indices[:slot])) for slot in range(len(indices))]


@given(batch=st.lists(examples(max_images=2), min_size=1, max_size=5),
       mode=st.sampled_from(["livr", "mask-only", "sft", "image-twice"]),
       k=st.integers(1, MAX_K), slack=st.integers(0, 60), unbounded=st.booleans())
@FAST
def test_packed_rows_are_the_examples_alone_block_diagonal(tiny, batch, mode, k, slack, unbounded):
    encoder = encoder_for(tiny, mode, k)
    encoded = [encoder.encode(e, with_answer=True) for e in batch]
    lengths = [e["input_ids"].numel() for e in encoded]
    max_length = None if unbounded else max(lengths) + slack
    inputs, labels, kinds = encoder.collate_packed(encoded, max_length, tiny["config"])
    plan = plan_packing(lengths, max_length)
    starts = row_starts(plan, lengths)
    docs = inputs["doc_ids"]
    # The dense mask of a packed row is the block diagonal of its examples' own masks.
    for rule in ("bottleneck", "standard"):
        packed_mask = segment_mask(kinds, rule, docs)
        expected = torch.zeros_like(packed_mask)
        for index, e in enumerate(encoded):
            one, one_labels, one_kinds = encoder.collate([e], padding_side="right")
            row, start = starts[index]
            span = slice(start, start + lengths[index])
            assert kinds[row, span].tolist() == one_kinds[0].tolist()
            assert inputs["input_ids"][row, span].tolist() == one["input_ids"][0].tolist()
            assert labels[row, span][1:].tolist() == one_labels[0, 1:].tolist()
            assert docs[row, span].tolist() == [plan[row].index(index)] * lengths[index]
            positions = inputs["position_ids"][:, row, span]
            alone_positions = encoder.collate_packed([e], None, tiny["config"])[0]["position_ids"][:, 0]
            assert torch.equal(positions, alone_positions)
            expected[row, span, span] = segment_mask(one_kinds, rule)[0]
        assert torch.equal(packed_mask, expected), rule
    # The model scatters image features into placeholders row by row: vision inputs follow the packed order.
    packed_order = [index for row in plan for index in row]
    for key in ("pixel_values", "image_grid_thw"):
        parts = [encoded[i][key] for i in packed_order if key in encoded[i]]
        assert (key in inputs) == bool(parts)
        if parts:
            assert torch.equal(inputs[key], torch.cat(parts)), key
    for row, indices in enumerate(plan):
        used = sum(lengths[i] for i in indices)
        assert kinds[row, used:].tolist() == [PAD] * (kinds.shape[1] - used)
        assert inputs["attention_mask"][row, used:].sum() == 0
        assert docs[row, used:].tolist() == [len(indices)] * (kinds.shape[1] - used)


@given(example=examples(), mode=st.sampled_from(["livr", "livr-answer-only", "mask-only"]), k=st.integers(1, MAX_K),
       with_answer=st.booleans())
@FAST
def test_bottleneck_routes_the_image_through_the_latents(tiny, example, mode, k, with_answer):
    kinds = torch.tensor(alone(encoder_for(tiny, mode, k), example, with_answer=with_answer)[1])
    rule = get_mode(mode).stage_rules[0]
    allowed = dense(kinds, rule)
    query, key = kinds[:, None], kinds[None, :]
    blocked_queries = [ANSWER] if rule == "bottleneck_answer_only" else [TEXT, ANSWER]
    blocked = torch.isin(query, torch.tensor(blocked_queries)) & (key == IMAGE)
    assert not allowed[blocked.expand_as(allowed)].any()
    causal = torch.ones_like(allowed).tril()
    # Every latent sees every image token and all the text before it; every answer token sees every latent.
    assert allowed[(kinds == LATENT)[:, None] & causal].all()
    assert allowed[(kinds == ANSWER)[:, None] & (key == LATENT)].all()
    assert torch.equal(dense(kinds, "standard"), causal)


@given(example=examples(), mode=st.sampled_from(["livr", "mask-only", "image-twice"]), k=st.integers(1, MAX_K),
       margin=st.integers(-3, 3))
@FAST
def test_max_length_refuses_and_never_truncates(tiny, example, mode, k, margin):
    needed = len(alone(encoder_for(tiny, mode, k), example)[0])
    cap = max(1, needed + margin)
    encoder = encoder_for(tiny, mode, k, max_length=cap)
    if needed > cap:
        with pytest.raises(ValueError, match="max_length"):
            encoder.encode(example, with_answer=True)
    else:
        assert encoder.encode(example, with_answer=True)["input_ids"].numel() == needed


@st.composite
def id_batches(draw):
    """(input_ids, labels, attention_mask) over the toy vocabulary, left or right padding, labels on any
    token (placeholders included) and on padding too."""
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    ids = torch.tensor(draw(st.lists(st.integers(0, TOY_VOCAB - 1), min_size=batch * n, max_size=batch * n))).view(batch, n)
    supervised = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * n, max_size=batch * n))).view(batch, n)
    lengths = draw(st.lists(st.integers(0, n), min_size=batch, max_size=batch))
    left = draw(st.booleans())
    positions = torch.arange(n)
    lengths = torch.tensor(lengths)[:, None]
    valid = positions >= n - lengths if left else positions < lengths
    return ids, torch.where(supervised, ids, IGNORE_INDEX), valid.long()


@given(batch=id_batches(), use_labels=st.booleans(), use_mask=st.booleans())
@settings(max_examples=80, deadline=None)
def test_segment_ids_follow_the_design_table(batch, use_labels, use_mask):
    ids, labels, mask = batch
    kinds = build_segment_ids(ids, image_token_ids=list(TOY_IMAGE_IDS), latent_token_ids=TOY_LATENT_IDS,
                              labels=labels if use_labels else None, attention_mask=mask if use_mask else None)
    for i, label, valid, kind in zip(ids.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist(),
                                     kinds.flatten().tolist()):
        if use_mask and not valid:
            assert kind == PAD
        elif i in TOY_IMAGE_IDS:
            assert kind == IMAGE
        elif i in TOY_LATENT_IDS:
            assert kind == LATENT
        else:
            assert kind == (ANSWER if use_labels and label != IGNORE_INDEX else TEXT)


class FakeCache:
    """What layout_for_forward reads of a KV cache: its length and the layout it carries."""

    def __init__(self):
        self.length = 0

    def get_seq_length(self):
        return self.length


@given(batch=id_batches(), steps=st.lists(st.lists(st.sampled_from([1, 1, 0]), min_size=1, max_size=3), max_size=4),
       with_docs=st.booleans(), full_mask=st.booleans(), offered=st.booleans())
@example(batch=(torch.tensor([[4]]), torch.tensor([[IGNORE_INDEX]]), torch.tensor([[1]])), steps=[[1]], with_docs=False,
         full_mask=False, offered=True)
@settings(max_examples=60, deadline=None)
def test_decode_steps_extend_the_prompt_layout(batch, steps, with_docs, full_mask, offered):
    """A prompt then decode steps with a cache: the kinds (and documents) of the keys equal the prompt's,
    then ANSWER for every generated token, PAD wherever the padding mask is 0. ``offered``: the prompt's
    kinds given as segment ids at every step (as ``handle.use_segment_ids`` does for ``generate``)."""
    ids, _, mask = batch
    rows, n = ids.shape
    derive = lambda: build_segment_ids(ids, image_token_ids=TOY_IMAGE_IDS, latent_token_ids=TOY_LATENT_IDS)  # noqa: E731
    docs = (torch.arange(n) >= n // 2).long().expand(rows, n) if with_docs else None
    cache = FakeCache()
    user = derive() if offered else None
    layout = layout_for_forward({"input_ids": ids, "attention_mask": mask, "cache": cache}, user, docs, derive,
                                offered_prompt=offered)
    expected = derive().masked_fill(mask == 0, PAD)
    assert torch.equal(layout.segment_ids.long(), expected)
    full_masks = mask
    for step_bits in steps:
        step = len(step_bits)
        cache.length = layout.shape[1]
        remember_keys(cache, layout)
        step_mask = torch.tensor(step_bits).expand(rows, step)
        full_masks = torch.cat([full_masks, step_mask], 1)
        kwargs = {"input_ids": torch.zeros(rows, step, dtype=torch.long), "cache": cache,
                  "attention_mask": full_masks if full_mask else step_mask}
        layout = layout_for_forward(kwargs, user, None, derive, offered_prompt=offered)
        expected = torch.cat([expected, torch.full((rows, step), ANSWER).masked_fill(step_mask == 0, PAD)], 1)
        assert torch.equal(layout.segment_ids.long(), expected)
        if with_docs:
            assert torch.equal(layout.raw_doc_ids[:, n:], docs[:, -1:].expand(rows, layout.shape[1] - n))
