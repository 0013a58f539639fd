"""Answer extraction as BLINK scores it, numeric exact match, and accuracy bookkeeping."""
import dataclasses
import json
import math

import pytest
import torch

from livr_model.app.scoring import (
    EvalResult,
    extract_choice_letter,
    extract_number,
    format_table,
    normalize_number,
    score_reply,
)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("A", "A"),
        ("(B)", "B"),
        ("  c.  ", "C"),
        ("D\n", "D"),
        ("**B**", "B"),
        ("The answer is (C).", "C"),
        ("I think (D) because the dots are red", "D"),
        ("(B) the second image", "B"),
        ("B) the second image", "B"),
        ("B. The red square", "B"),
        ("Answer: B", "B"),
        ("the answer is b", "B"),
        # ambiguous or non-committal replies score as wrong, never as a guess
        ("(A) or (B)", None),
        ("A cat sits on the mat", None),
        ("I am not sure", None),
        ("", None),
        # letters beyond the choices do not count
        ("E", None),
        ("(E)", None),
        ("(E) or (A)", "A"),
        # BLINK's rule: a unique "(X)" anywhere wins over a leading letter
        ("B.\nExplanation: (A) is wrong", "A"),
    ],
)
def test_extract_choice_letter_messy(reply, expected):
    assert extract_choice_letter(reply, 4) == expected


def test_extract_choice_letter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_choices"):
        extract_choice_letter("A", 0)
    with pytest.raises(ValueError, match="text"):
        extract_choice_letter(None, 4)


@pytest.mark.parametrize(
    "reply, expected",
    [("3", "3"), ("There are three dots.", "3"), ("count: 4.0", "4"), ("07 objects", "7"), ("2 or maybe three", "2"), ("none", None)],
)
def test_extract_number(reply, expected):
    assert extract_number(reply) == expected


def test_normalize_number():
    assert normalize_number("3.50") == "3.5"
    assert normalize_number(5) == "5"
    assert normalize_number("twelve") == "12"
    assert normalize_number("abc") is None


def test_score_reply_multiple_choice_and_numeric():
    assert score_reply("(B)", "(B)", 4) == ("B", True)
    assert score_reply("A", "B", 4) == ("A", False)
    assert score_reply("It is (A) or (C)", "A", 4) == (None, False)
    assert score_reply("five", "5", 0) == ("5", True)
    assert score_reply("6 dots", "5", 0) == ("6", False)


def test_eval_result_average_is_per_task_mean():
    result = EvalResult()
    for correct in (True, True, True, False):
        result.add("counting", correct)
    result.add("jigsaw", False)
    assert result.per_task["counting"].accuracy == 0.75
    assert result.average == pytest.approx((0.75 + 0.0) / 2)
    assert result.overall == pytest.approx(3 / 5)
    d = result.to_dict()
    assert d["per_task"]["jigsaw"] == {"accuracy": 0.0, "correct": 0, "total": 1}
    assert math.isnan(EvalResult().average)


def test_format_table_lists_every_task_and_column():
    table = format_table({"counting": {"acc": 0.5, "chance": 0.25}, "jigsaw": {"acc": 1.0, "chance": None}}, ["acc", "chance"])
    lines = table.splitlines()
    assert lines[0].split() == ["task", "acc", "chance"]
    assert lines[2].split() == ["counting", "50.0", "25.0"]
    assert lines[3].split() == ["jigsaw", "100.0", "-"]


@pytest.fixture(scope="module")
def patched_tiny():
    """An untrained tiny Qwen2.5-VL with 4 latent tokens, LoRA and the attention patch."""
    from livr_model.app.tiny import build_tiny_model, build_tiny_processor
    from livr_model.app.config import TrainConfig
    from livr_model.app.models import build_trainable_model, make_encoder

    processor = build_tiny_processor(56)
    model = build_tiny_model(processor, seed=0, text_hidden=64, vision_hidden=32, vision_depth=1)
    cfg = TrainConfig(mode="livr", latents=4)
    model, handle, latent_ids = build_trainable_model(cfg, model, processor)
    handle.set_rule("standard")
    return dict(model=model, handle=handle, encoder=make_encoder(cfg, model, processor, latent_ids),
                processor=processor, latent_ids=latent_ids)


def _examples(task, n):
    from livr_model.app.data import make_synthetic_dataset

    return make_synthetic_dataset(task, n, seed=3, image_size=56)


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def test_latents_go_right_after_the_question_and_can_be_dropped(patched_tiny):
    encoder, processor = patched_tiny["encoder"], patched_tiny["processor"]
    example = _examples("counting", 1)[0]
    with_latents = _tokens(processor, encoder.encode(example, with_answer=False)["input_ids"])
    latent_strings = [f"<|latent_{i}|>" for i in range(4)]
    start = with_latents.index(latent_strings[0])
    assert with_latents[start:start + 4] == latent_strings
    assert with_latents[start + 4] == "<|im_end|>", "latents end the user turn"
    without = _tokens(processor, encoder.encode(example, with_answer=False, drop_latents=True)["input_ids"])
    assert without == with_latents[:start] + with_latents[start + 4:]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mask_only_appends_existing_tokens_as_latent(patched_tiny, padding_side):
    from livr_kernels import Segment
    from livr_model.prompts import vocabulary_latent_ids

    slots = 5
    processor = patched_tiny["processor"]
    borrowed = tuple(vocabulary_latent_ids(processor, slots))
    encoder = dataclasses.replace(patched_tiny["encoder"], mode="mask-only", latent_text="", latent_token_ids=(),
                                  vocab_latent_ids=borrowed)
    plain = dataclasses.replace(encoder, mode="sft", vocab_latent_ids=())
    examples = _examples("counting", 1) + _examples("jigsaw", 1)
    batch, labels, segments = encoder.collate([encoder.encode(e, with_answer=True) for e in examples], padding_side=padding_side)
    plain_encoded = [plain.encode(e, with_answer=True) for e in examples]
    for row in range(len(examples)):
        latent = (segments[row] == int(Segment.LATENT)).nonzero().flatten()
        assert len(latent) == slots and torch.equal(latent, torch.arange(int(latent[0]), int(latent[0]) + slots))
        assert batch["input_ids"][row, latent].tolist() == list(borrowed), "the borrowed tokens are the slots"
        after = _tokens(processor, batch["input_ids"][row, int(latent[-1]) + 1:int(latent[-1]) + 2])
        assert after == ["<|im_end|>"], "they end the user's turn, where new latents would go"
        # Take them out again and the row is the plain prompt, token for token.
        kept = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
        kept[latent] = False
        real = batch["attention_mask"][row].bool() & kept
        assert torch.equal(batch["input_ids"][row][real], plain_encoded[row]["input_ids"])
        assert (labels[row][latent] == -100).all(), "no loss on the latents"



def test_image_twice_doubles_the_image_tokens(patched_tiny):
    encoder = patched_tiny["encoder"]
    twice = dataclasses.replace(encoder, mode="image-twice", latent_text="")
    example = _examples("counting", 1)[0]
    image_id = encoder.image_token_ids[0]
    once = int((encoder.encode(example, with_answer=False)["input_ids"] == image_id).sum())
    assert int((twice.encode(example, with_answer=False)["input_ids"] == image_id).sum()) == 2 * once


def test_likelihood_scores_do_not_depend_on_batching(patched_tiny):
    from livr_model.app.predict import answer_logprobs, predict

    model, encoder = patched_tiny["model"], patched_tiny["encoder"]
    examples = _examples("counting", 2) + _examples("jigsaw", 1)
    batched = answer_logprobs(model, encoder, examples, batch_size=3)
    single = [answer_logprobs(model, encoder, [e], batch_size=1)[0] for e in examples]
    assert batched == pytest.approx(single, abs=1e-4)
    records = predict(model, encoder, examples, method="likelihood", batch_size=8)
    for example, record in zip(examples, records):
        options = [dataclasses.replace(example, answer=letter) for letter in "ABCD"[: len(example.choices)]]
        scores = answer_logprobs(model, encoder, options)
        assert record["prediction"] == "ABCD"[scores.index(max(scores))]
        assert record["correct"] == (record["prediction"] == example.answer)


def test_answer_logprob_is_the_models_own_answer_loss_summed(patched_tiny):
    """transformers' causal-LM loss (labels shifted by the model) over the answer tokens, summed."""
    from livr_model.app.predict import answer_logprobs, eval_mode

    model, encoder = patched_tiny["model"], patched_tiny["encoder"]
    example = _examples("counting", 1)[0]
    batch, labels, segment_ids = encoder.batch([example], with_answer=True, padding_side="right")
    with eval_mode(model), torch.no_grad():
        loss = model(**batch, labels=labels, segment_ids=segment_ids).loss.item()
    answer_tokens = int((labels[:, 1:] != -100).sum())
    assert answer_logprobs(model, encoder, [example])[0] == pytest.approx(-loss * answer_tokens, rel=1e-4)


def test_generated_replies_hold_only_the_new_tokens(patched_tiny):
    from livr_model.app.predict import generate_replies

    model, encoder = patched_tiny["model"], patched_tiny["encoder"]
    examples = _examples("counting", 2)
    replies = generate_replies(model, encoder, examples, handle=patched_tiny["handle"], max_new_tokens=3)
    assert len(replies) == 2
    for example, reply in zip(examples, replies):
        assert example.question not in reply and "assistant" not in reply, reply


def test_latent_heatmap_follows_the_patch_grid(patched_tiny, tmp_path):
    from PIL import Image

    from livr_model.app.figures import draw_heatmap
    from livr_model.app.probes import latent_image_attention

    model, handle, encoder = patched_tiny["model"], patched_tiny["handle"], patched_tiny["encoder"]
    jigsaw = _examples("jigsaw", 1)[0]
    maps = latent_image_attention(model, handle, encoder, jigsaw)
    merge = 2
    expected = [(img.height // 7 // merge, img.width // 7 // merge) for img in jigsaw.images]
    assert [tuple(m.shape) for m in maps] == expected
    assert all((m >= 0).all() for m in maps) and sum(float(m.sum()) for m in maps) > 0
    path = draw_heatmap(jigsaw.images, maps, tmp_path / "heat.png")
    with Image.open(path) as png:
        assert png.height >= 224 and png.width > png.height


def test_answer_to_latent_attention_is_the_answer_rows_mass_on_latent_keys():
    """The probe's number from hand-made attention: answer queries put 0.4 (layer 1, mean of two
    heads) and 0.2 (layer 2) on the two latent keys, more on the image, so the answer is 0.3."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from livr_kernels import Segment
    from livr_model.app.probes import answer_latent_attention

    T, I, L, A = (int(s) for s in (Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER))
    kinds = torch.tensor([[T, I, I, L, L, A, A]])
    # Per layer and head: the probabilities of each answer row over keys T I I L L A A (rows sum to 1).
    answer_rows = {(0, 0): [0.1, 0.3, 0.3, 0.1, 0.2, 0.0, 0.0], (0, 1): [0.0, 0.2, 0.3, 0.2, 0.3, 0.0, 0.0],
                   (1, 0): [0.2, 0.3, 0.3, 0.1, 0.1, 0.0, 0.0], (1, 1): [0.1, 0.4, 0.3, 0.1, 0.1, 0.0, 0.0]}
    weights = [torch.zeros(1, 2, 7, 7) for _ in range(2)]
    for (layer, head), row in answer_rows.items():
        weights[layer][0, head, 5:] = torch.tensor(row)
        weights[layer][0, head, :5, 0] = 1.0  # prompt rows: all on the first token
    encoder = SimpleNamespace(batch=lambda chunk, **kwargs: ({}, None, kinds))

    class Handle:
        @contextmanager
        def capture_attention(self):
            yield SimpleNamespace(weights=weights, segment_ids=kinds)

    model = torch.nn.Linear(1, 1)
    model.forward = lambda **kwargs: None
    assert answer_latent_attention(model, Handle(), encoder, ["one example"]) == pytest.approx(0.3)


def test_evaluate_model_writes_metrics_and_runs_the_probes(patched_tiny, tmp_path, monkeypatch):
    from livr_model.app import probes as probes_module
    from livr_model.patch import STATE_KWARG

    model, handle, encoder = patched_tiny["model"], patched_tiny["handle"], patched_tiny["encoder"]
    examples = _examples("counting", 3) + _examples("visual_similarity", 2)
    rules = []
    layer = model.get_base_model().model.language_model.layers[0].self_attn
    hook = layer.register_forward_pre_hook(lambda m, a, kw: rules.append(kw[STATE_KWARG].rule.name), with_kwargs=True)
    real_predict = probes_module.predict
    predictions_asked = []

    def recording_predict(*args, **kwargs):
        predictions_asked.append((handle.rule.name, kwargs.get("drop_latents", False)))
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(probes_module, "predict", recording_predict)
    try:
        metrics = evaluate_model_quiet(model, handle, encoder, examples, tmp_path)
    finally:
        hook.remove()
    # Accuracy, then the latents-removed probe (latents dropped), then the bottleneck-forced probe.
    assert predictions_asked == [("standard", False), ("standard", True), ("bottleneck", False)]
    assert handle.rule.name == "standard", "the rule in force before evaluation is restored"
    assert "bottleneck" in rules and "standard" in rules, "the bottleneck probe must really run under the bottleneck"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"]["per_task"].keys() == {"counting", "visual_similarity"}
    assert saved["chance"] == {"counting": 0.25, "visual_similarity": 0.5}
    # The verdict's other baseline: always giving the task's most common gold answer.
    for task in ("counting", "visual_similarity"):
        golds = [e.answer for e in examples if e.task == task]
        assert saved["majority"][task] == pytest.approx(max(golds.count(a) for a in golds) / len(golds))
    assert saved["options"] == {"counting": 4, "visual_similarity": 2}
    probes = saved["probes"]
    assert 0.0 < probes["answer_to_latent_attention"] < 1.0
    assert probes["latents_removed"]["per_task"]["counting"]["total"] == 3
    assert probes["bottleneck_forced"]["per_task"]["visual_similarity"]["total"] == 2
    assert (tmp_path / probes["heatmap"]).is_file()
    assert len(saved["predictions"]) == len(examples) == metrics["num_examples"]


def evaluate_model_quiet(model, handle, encoder, examples, out):
    from livr_model.app.probes import evaluate_model

    return evaluate_model(model, handle, encoder, examples, method="generate", max_new_tokens=3, output_dir=out, verbose=False)
