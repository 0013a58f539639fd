"""The paper's ablation modes beyond the registry walk: which vocabulary tokens mask-only borrows,
and that its trained rows and prompt tuning's soft tokens come back from a checkpoint."""
import pytest
import torch

from livr_model.app.models import load_trained
from livr_model.app.state import LATEST_POINTER, read_pointer
from livr_model.app.train import train
from livr_model.prompts import CHOICES_HEADER, vocabulary_latent_ids
from test_train import LATENTS, tiny_config, tiny_data, tiny_setup


def test_borrowed_tokens_are_ordinary_rare_and_deterministic():
    _, processor = tiny_setup()
    tokenizer = processor.tokenizer
    ids = vocabulary_latent_ids(processor, LATENTS)
    assert ids == vocabulary_latent_ids(processor, LATENTS) and len(set(ids)) == LATENTS
    assert not set(ids) & set(tokenizer.all_special_ids) and not set(ids) & set(tokenizer.get_added_vocab().values())
    glue = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "?"}]}], tokenize=False)
    fixed = set(tokenizer(glue + CHOICES_HEADER + "(A) (B)", add_special_tokens=False)["input_ids"])
    assert not set(ids) & fixed, "the prompt's own glue is never borrowed"
    # Highest ids first: a larger K extends the list, it does not reshuffle it.
    assert vocabulary_latent_ids(processor, LATENTS + 3)[:LATENTS] == ids
    assert ids == sorted(ids, reverse=True)
    with pytest.raises(ValueError, match="too many"):
        vocabulary_latent_ids(processor, tokenizer.vocab_size)
    with pytest.raises(ValueError, match="positive int"):
        vocabulary_latent_ids(processor, 0)


@pytest.mark.parametrize("mode", ["mask-only", "prompt-tuning"])
def test_trained_latent_rows_come_back_from_the_checkpoint(tmp_path, mode):
    model, processor = tiny_setup()
    before = model.get_input_embeddings().weight.detach().clone()
    train_examples, val_examples = tiny_data()
    result = train(tiny_config(tmp_path, mode=mode), model=model, processor=processor,
                   train_examples=train_examples, val_examples=val_examples)
    ids = list(result.latent_token_ids)
    embedding = result.model.get_input_embeddings()
    with torch.no_grad():
        trained_rows = embedding(torch.tensor(ids)).clone()
    if mode == "mask-only":
        assert ids == vocabulary_latent_ids(processor, LATENTS)
        assert not torch.allclose(trained_rows, before[ids]), "the borrowed rows trained"

    fresh_model, fresh_processor = tiny_setup()
    # The last checkpoint holds the rows as training left them (the selected one is the best epoch's).
    run = load_trained(read_pointer(tmp_path, LATEST_POINTER), model=fresh_model, processor=fresh_processor)
    assert list(run.latent_token_ids) == ids
    with torch.no_grad():
        loaded = run.model.get_input_embeddings()(torch.tensor(ids))
    assert torch.allclose(loaded, trained_rows, atol=1e-6)
    assert run.encoder.vocab_latent_ids == (tuple(ids) if mode == "mask-only" else ())
    assert run.encoder.latent_token_ids == (tuple(ids) if mode == "prompt-tuning" else ())


@pytest.mark.parametrize("mode", ["livr", "mask-only"])
def test_only_new_latent_tokens_are_marked_latent_by_id(mode):
    """A borrowed vocabulary token may also occur in a question; it is LATENT only in its slot, so
    the patch must not mark it by id (new latent tokens occur nowhere else and are)."""
    from livr_model.app.config import TrainConfig
    from livr_model.app.models import build_trainable_model

    model, processor = tiny_setup()
    _, handle, latent_ids = build_trainable_model(TrainConfig(mode=mode, latents=LATENTS), model, processor)
    assert len(latent_ids) == LATENTS
    assert handle.latent_token_ids == (tuple(latent_ids) if mode == "livr" else ())
