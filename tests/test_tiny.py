"""The offline tiny processor and model: tokenizer, chat template, forward on real encoded examples,
padding, save/load, and the demo base pretraining."""
import pytest
import torch

from livr_model.app.data.synthetic import SYNTHETIC_TASKS, make_synthetic_dataset
from livr_model.prompts import collate, encode_example
from livr_model.app.tiny import (
    CHAT_TEMPLATE,
    IM_END,
    SPECIAL_TOKENS,
    TinyQwen2_5_VLProcessor,
    build_tiny_model,
    build_tiny_processor,
    load_tiny,
    pretrain_demo_base,
    save_tiny,
)

SMALL = dict(text_hidden=64, layers=1, vision_hidden=32, vision_depth=1)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def test_processor_is_deterministic_and_has_qwen_specials(processor):
    again = build_tiny_processor()
    assert processor.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    vocab = processor.tokenizer.get_vocab()
    assert all(token in vocab for token in SPECIAL_TOKENS)
    ids = processor.tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == vocab["<|im_start|>"] and ids[-1] == vocab[IM_END]
    # Byte-level: any text survives a round trip.
    text = "Ünïcode ✓ and 12345 (Z)"
    assert processor.tokenizer.decode(processor.tokenizer(text)["input_ids"]) == text
    assert processor.image_token_id == vocab["<|image_pad|>"]


def test_chat_template_is_qwen_style(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    assert processor.chat_template == CHAT_TEMPLATE


def test_image_token_budget(processor):
    """56x56 -> 8x8 patches of 7 px -> 16 tokens after the 2x2 merge; larger images are shrunk to that budget."""
    for size, tokens in ((56, 16), (112, 16), (28, 4)):
        example = make_synthetic_dataset("counting", 1, image_size=max(size, 28))[0]
        example.images = [example.images[0].resize((size, size))]
        encoded = encode_example(processor, example)
        assert int((encoded["input_ids"] == processor.image_token_id).sum()) == tokens
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 14"):
        build_tiny_processor(50)


def test_model_matches_the_tokenizer(processor):
    model = build_tiny_model(processor, **SMALL)
    config = model.config
    tokenizer = processor.tokenizer
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == processor.image_token_id
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_config.patch_size == processor.image_processor.patch_size
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids(IM_END)
    with pytest.raises(ValueError, match="text_hidden must be a positive multiple of 32"):
        build_tiny_model(processor, text_hidden=48)
    with pytest.raises(ValueError, match="layers must be a positive int"):
        build_tiny_model(processor, layers=0)


def test_model_is_reproducible(processor):
    first, second = build_tiny_model(processor, seed=5, **SMALL), build_tiny_model(processor, seed=5, **SMALL)
    other = build_tiny_model(processor, seed=6, **SMALL)
    state, other_state = first.state_dict(), other.state_dict()
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in state.items())
    assert any(not torch.equal(v, other_state[k]) for k, v in state.items())


def test_forward_and_backward_on_every_task(processor):
    model = build_tiny_model(processor, **SMALL)
    examples = [make_synthetic_dataset(task, 1, seed=1)[0] for task in SYNTHETIC_TASKS]
    batch = collate([encode_example(processor, e) for e in examples], processor.tokenizer.pad_token_id)
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_left_padding_matches_unpadded_rows(processor):
    """A left-padded batch gives each row the next-token logits it gets alone (what generation relies on)."""
    model = build_tiny_model(processor, **SMALL)
    examples = make_synthetic_dataset("counting", 1, seed=2) + make_synthetic_dataset("jigsaw", 1, seed=2)
    prompts = [encode_example(processor, e, with_answer=False) for e in examples]
    batch = collate(prompts, processor.tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        batched = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, -1]
        for row, prompt in enumerate(prompts):
            single = collate([prompt], processor.tokenizer.pad_token_id)
            alone = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=1e-4)
        generated = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] <= batch["input_ids"].shape[1] + 3


def test_save_and_load_round_trip(processor, tmp_path):
    model = build_tiny_model(processor, **SMALL)
    save_tiny(model, processor, tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    loaded_model, loaded_processor = load_tiny(tmp_path / "tiny")
    assert isinstance(loaded_processor, TinyQwen2_5_VLProcessor)
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    example = make_synthetic_dataset("visual_similarity", 1)[0]
    encoded = encode_example(processor, example)
    assert all(torch.equal(v, encode_example(loaded_processor, example)[k]) for k, v in encoded.items())
    batch = collate([encoded], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded_model(**batch).logits)
    with pytest.raises(ValueError, match="written by save_tiny"):
        load_tiny(tmp_path / "missing")


def test_pretrain_lowers_the_loss_and_keeps_vision_frozen(processor):
    model = build_tiny_model(processor, **SMALL)
    vision_before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    embed_before = model.get_input_embeddings().weight.detach().clone()
    model.model.visual.blocks[0].mlp.gate_proj.weight.requires_grad_(False)
    examples = make_synthetic_dataset("counting", 16, seed=0)
    steps = 100
    losses = pretrain_demo_base(model, processor, examples, steps=steps, batch_size=2, seed=0)
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    window = 5
    assert sum(losses[-window:]) / window < 0.5 * sum(losses[:window]) / window
    assert all(torch.equal(v, model.model.visual.state_dict()[k]) for k, v in vision_before.items())
    assert not torch.equal(model.get_input_embeddings().weight, embed_before)
    # requires_grad flags and eval mode come back as they were.
    assert not model.model.visual.blocks[0].mlp.gate_proj.weight.requires_grad
    assert model.lm_head.weight.requires_grad and not model.training
    with pytest.raises(ValueError, match="steps must be a positive int"):
        pretrain_demo_base(model, processor, examples, steps=0)
