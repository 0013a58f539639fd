"""Latent tokens: adding them, where they land in a prompt, training only their rows, checkpointing them."""
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from livr_model.archs import get_arch
from livr_model.app.data.synthetic import make_synthetic_dataset
from livr_model.prompts import collate, encode_example, format_prompt
from livr_model.segment_ids import IGNORE_INDEX
from livr_model.latents import (
    add_latent_tokens,
    latent_state_dict,
    latent_token_strings,
    load_latent_state_dict,
    restrict_embedding_grad,
)
from livr_model.app.tiny import IM_END, IM_START, build_tiny_model, build_tiny_processor

K = 4
TRAIN_STEPS = 3
LR = 1e-2
# AdamW's decoupled weight decay would shrink every row it is given: the mechanisms must not give it any other.
WEIGHT_DECAY = 0.1


@pytest.fixture
def tiny():
    processor = build_tiny_processor()
    return build_tiny_model(processor, text_hidden=64, layers=1, vision_hidden=32, vision_depth=1), processor


def test_token_strings():
    assert latent_token_strings(3) == ["<|latent_0|>", "<|latent_1|>", "<|latent_2|>"]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            latent_token_strings(bad)


def test_add_grows_tokenizer_and_model(tiny):
    model, processor = tiny
    vocab = len(processor.tokenizer)
    weight_before = model.get_input_embeddings().weight.detach().clone()
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    assert ids == list(range(vocab, vocab + K))
    assert len(processor.tokenizer) == vocab + K
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == vocab + K == model.get_output_embeddings().weight.shape[0]
    assert torch.equal(weight[:vocab], weight_before)
    rows = weight[ids]
    assert rows.std() > 0.5 * weight_before.std() and len({tuple(r.tolist()) for r in rows}) == K
    # Drawn from the old rows' per-dimension statistics: standardised by them, the new rows look
    # like unit normal draws (a unit-variance draw, or the mean alone, would not).
    z = (rows - weight_before.mean(0)) / weight_before.std(0)
    assert abs(z.mean().item()) < 0.5 and 0.5 < z.std().item() < 2.0
    # The new output rows are the mean old output row: no logit preference for a latent token.
    output = model.get_output_embeddings().weight
    assert output.data_ptr() != weight.data_ptr(), "the tiny model's embeddings are untied"
    mean_output_row = output[:vocab].mean(0)
    for token_id in ids:
        torch.testing.assert_close(output[token_id], mean_output_row)
    # Each latent is one special token that decoding with skip_special_tokens drops.
    text = "".join(latent_token_strings(K))
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == ""


def test_add_is_reproducible_and_reuses(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=3)
    rows = model.get_input_embeddings().weight[ids].detach().clone()
    assert add_latent_tokens(model, processor, k=K, seed=99) == ids
    assert torch.equal(model.get_input_embeddings().weight[ids], rows)
    with pytest.raises(ValueError, match="already holds 4 of the 8 latent tokens"):
        add_latent_tokens(model, processor, k=8)
    other_processor = build_tiny_processor()
    other = build_tiny_model(other_processor, text_hidden=64, layers=1, vision_hidden=32, vision_depth=1)
    add_latent_tokens(other, other_processor, k=K, seed=3)
    assert torch.equal(other.get_input_embeddings().weight[ids], rows)


def test_add_uses_spare_rows_without_shrinking(tiny):
    """Qwen checkpoints have more embedding rows than tokenizer entries; the matrix must not shrink."""
    _, processor = tiny
    model = build_tiny_model(processor, text_hidden=64, layers=1, vision_hidden=32, vision_depth=1)
    spare = 8
    model.resize_token_embeddings(len(processor.tokenizer) + spare)
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) - K + spare
    assert max(ids) < model.get_input_embeddings().weight.shape[0]


def test_latents_sit_between_question_and_end_of_user_turn(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    example = make_synthetic_dataset("visual_correspondence", 1)[0]
    latents = "".join(latent_token_strings(K))
    encoded = encode_example(processor, example, latent_tokens=latents)
    plain = encode_example(processor, example)
    input_ids = encoded["input_ids"].tolist()
    start = input_ids.index(ids[0])
    assert input_ids[start:start + K] == ids
    before = processor.tokenizer.decode(input_ids[:start])
    after = processor.tokenizer.decode(input_ids[start + K:])
    assert before.endswith(format_prompt(example))
    assert after == f"{IM_END}\n{IM_START}assistant\n({example.answer}){IM_END}"
    # Latents carry no loss and are the only difference from the plain encoding.
    assert (encoded["labels"][start:start + K] == IGNORE_INDEX).all()
    assert input_ids[:start] + input_ids[start + K:] == plain["input_ids"].tolist()
    assert torch.equal(encoded["pixel_values"], plain["pixel_values"])
    assert (encoded["mm_token_type_ids"][start:start + K] == 0).all()


@pytest.mark.parametrize("where", ["question", "choices"])
def test_latent_token_text_in_the_data_is_refused(tiny, where):
    """A latent written in the question would tokenize as one more latent, which the bottleneck
    lets see the images, in the middle of the question: the encoder refuses it, naming it."""
    import dataclasses

    model, processor = tiny
    add_latent_tokens(model, processor, k=K, seed=0)
    example = make_synthetic_dataset("visual_correspondence", 1)[0]
    strings = latent_token_strings(K)
    if where == "question":
        bad = dataclasses.replace(example, question=example.question + " " + strings[2])
    else:
        bad = dataclasses.replace(example, choices=[example.choices[0] + strings[2], *example.choices[1:]])
    with pytest.raises(ValueError, match=rf"contains the latent token '{re.escape(strings[2])}'"):
        encode_example(processor, bad, latent_tokens="".join(strings))
    assert encode_example(processor, example, latent_tokens="".join(strings))["input_ids"].numel() > K


def train_steps(model, processor, ids, parameters):
    latents = "".join(latent_token_strings(len(ids)))
    examples = make_synthetic_dataset("counting", 2, seed=5)
    batch = collate([encode_example(processor, e, latent_tokens=latents) for e in examples], processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=WEIGHT_DECAY)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def all_rows(model):
    """Every row the model's input embedding produces (through wrappers and hooks)."""
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        return embedding(torch.arange(embedding.weight.shape[0]))


def assert_only_latent_rows_changed(before, after, ids):
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others]), "a non-latent embedding row changed"
    assert ((after[ids] - before[ids]).abs().amax(-1) > 0).all(), "a latent row did not train"


def test_restrict_trains_only_latent_rows(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    handle = restrict_embedding_grad(model, ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == handle.parameters() and trainable[0].shape == (K, weight.shape[1])
    train_steps(model, processor, ids, trainable)
    assert torch.equal(weight, before), "the frozen matrix itself must not move while restricted"
    assert_only_latent_rows_changed(before, all_rows(model), ids)
    state = latent_state_dict(model, ids)
    handle.remove()
    assert_only_latent_rows_changed(before, weight.detach(), ids)
    assert torch.equal(weight[ids], state["embeddings"])
    assert not any(name.endswith("livr_latent_delta") for name, _ in model.named_parameters())


@pytest.mark.parametrize("trainable_before", [True, False])
def test_remove_gives_the_embedding_back_its_requires_grad(tiny, trainable_before):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(trainable_before)
    handle = restrict_embedding_grad(model, ids)
    assert not weight.requires_grad, "the matrix is frozen while only the latent rows train"
    handle.remove()
    assert weight.requires_grad is trainable_before


def test_restrict_rejects_bad_use(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    handle = restrict_embedding_grad(model, ids)
    with pytest.raises(ValueError, match="already active"):
        restrict_embedding_grad(model, ids)
    handle.remove()
    handle.remove()
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=r"token_ids must be ints in \[0, "):
        restrict_embedding_grad(model, [rows])
    with pytest.raises(ValueError, match="token_ids must be distinct"):
        restrict_embedding_grad(model, [ids[0], ids[0]])
    with pytest.raises(ValueError, match="non-empty list"):
        restrict_embedding_grad(model, [])


def test_peft_trainable_token_indices_train_only_latent_rows(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    before = all_rows(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=get_arch(model.config).lora_target_regex,
                        trainable_token_indices=ids)
    peft_model = get_peft_model(model, config)
    train_steps(peft_model, processor, ids, [p for p in peft_model.parameters() if p.requires_grad])
    assert_only_latent_rows_changed(before, all_rows(peft_model), ids)
    vision = dict(model.model.visual.named_parameters())
    assert not any(p.requires_grad for p in vision.values())
    # The same rows come out of latent_state_dict and load back into a fresh copy.
    state = latent_state_dict(peft_model, ids)
    assert torch.equal(state["embeddings"], all_rows(peft_model)[ids])
    fresh_processor = build_tiny_processor()
    fresh = build_tiny_model(fresh_processor, text_hidden=64, layers=1, vision_hidden=32, vision_depth=1)
    fresh_ids = add_latent_tokens(fresh, fresh_processor, k=K, seed=1)
    load_latent_state_dict(fresh, state, fresh_ids)
    assert torch.equal(latent_state_dict(fresh, fresh_ids)["embeddings"], state["embeddings"])


def test_state_dict_round_trip_through_a_handle_and_peft(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    state = {"embeddings": torch.randn(K, model.config.text_config.hidden_size), "token_ids": torch.tensor(ids)}
    handle = restrict_embedding_grad(model, ids)
    load_latent_state_dict(model, state, ids)
    assert torch.allclose(latent_state_dict(model, ids)["embeddings"], state["embeddings"], atol=1e-6)
    handle.remove()
    assert torch.allclose(model.get_input_embeddings().weight[ids], state["embeddings"], atol=1e-6)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=get_arch(model.config).lora_target_regex,
                                                   trainable_token_indices=ids))
    other = {"embeddings": torch.randn(K, state["embeddings"].shape[1]), "token_ids": torch.tensor(ids)}
    load_latent_state_dict(peft_model, other, ids)
    assert torch.equal(latent_state_dict(peft_model, ids)["embeddings"], other["embeddings"])


def test_load_rejects_mismatched_state(tiny):
    model, processor = tiny
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    state = latent_state_dict(model, ids)
    with pytest.raises(ValueError, match="differ from the ids the state was saved with"):
        load_latent_state_dict(model, state, list(reversed(ids)))
    with pytest.raises(ValueError, match="must be shaped"):
        load_latent_state_dict(model, state, ids[:2])
    with pytest.raises(ValueError, match="must be a latent_state_dict"):
        load_latent_state_dict(model, {"rows": state["embeddings"]}, ids)
