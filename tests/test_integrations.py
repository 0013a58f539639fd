"""LivrCollator and LivrStageCallback inside TRL's SFTTrainer and transformers' Trainer (issue 9)."""
import json
import math
import shutil
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from livr_kernels import Segment
from livr_model import LivrCollator, LivrStageCallback, add_latent_tokens, get_handle, patch_attention
from livr_model.app.cli import eval_main
from livr_model.app.data.synthetic import make_synthetic_dataset
from livr_model.app.models import load_trained
from livr_model.app.tiny import (IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, build_tiny_model, build_tiny_processor,
                                  load_tiny, save_tiny)
from livr_model.integrations import RUN_FILE, RUN_FILES, STAGE_LOG_KEY
from livr_model.latents import latent_token_strings
from livr_model.prompts import answer_text, format_prompt, vocabulary_latent_ids
from livr_model.segment_ids import IGNORE_INDEX

K = 4
# A 56x56 image is 16 image tokens with the tiny processor.
IMAGE_TOKENS = 16
LR = 1e-3
STEPS_PER_STAGE = 4
TEXT, IMAGE, LATENT, ANSWER, PAD = (int(s) for s in (Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER, Segment.PAD))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_base")
    processor = build_tiny_processor()
    save_tiny(build_tiny_model(processor), processor, path)
    return path


def fresh(base_dir):
    """A tiny model and processor with K latent tokens added (a new tokenizer each time)."""
    model, processor = load_tiny(base_dir)
    ids = add_latent_tokens(model, processor, k=K, seed=0)
    return model, processor, ids


def user_turn(example):
    return {"role": "user", "content": [{"type": "image"} for _ in example.images] + [{"type": "text", "text": format_prompt(example)}]}


def assistant_turn(example):
    return {"role": "assistant", "content": [{"type": "text", "text": answer_text(example)}]}


ROW_FORMATS = {
    "messages": lambda e: {"images": e.images, "messages": [user_turn(e), assistant_turn(e)]},
    "prompt_completion": lambda e: {"images": e.images, "prompt": [user_turn(e)], "completion": [assistant_turn(e)]},
    "prompt_completion_text": lambda e: {"images": e.images, "prompt": format_prompt(e), "completion": answer_text(e)},
    "livr": lambda e: {"images": e.images, "question": e.question, "choices": e.choices, "answer": e.answer, "task": e.task},
}


def expected_row(processor, example, latents: str, vocab_ids=()):
    """(ids, kinds, labels) written out from the tiny template's layout, piece by piece; ``vocab_ids``
    (mask-only) are existing tokens spliced in where new latents would go."""
    pieces = [(f"{IM_START}user\n", TEXT)]
    for _ in example.images:
        pieces += [(VISION_START, TEXT), (IMAGE_PAD * IMAGE_TOKENS, IMAGE), (VISION_END, TEXT)]
    pieces += [(format_prompt(example), TEXT), (latents, LATENT), (f"{IM_END}\n{IM_START}assistant\n", TEXT),
               (answer_text(example) + IM_END, ANSWER)]
    ids, kinds = [], []
    for text, kind in pieces:
        piece = processor.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        kinds += [kind] * len(piece)
    if vocab_ids:
        end = kinds.index(ANSWER) - len(processor.tokenizer(f"{IM_END}\n{IM_START}assistant\n", add_special_tokens=False)["input_ids"])
        ids[end:end] = list(vocab_ids)
        kinds[end:end] = [LATENT] * len(vocab_ids)
    labels = [i if k == ANSWER else IGNORE_INDEX for i, k in zip(ids, kinds)]
    return ids, kinds, labels


def check_batch(batch, expectations, pad_id):
    width = max(len(ids) for ids, _, _ in expectations)
    assert batch["input_ids"].shape == (len(expectations), width)
    for row, (ids, kinds, labels) in enumerate(expectations):
        n, pad = len(ids), width - len(ids)
        assert batch["input_ids"][row].tolist() == ids + [pad_id] * pad
        assert batch["segment_ids"][row].tolist() == kinds + [PAD] * pad
        assert batch["labels"][row].tolist() == labels + [IGNORE_INDEX] * pad
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad
        assert batch["mm_token_type_ids"][row].tolist() == [int(k == IMAGE) for k in kinds] + [0] * pad


@pytest.mark.parametrize("row_format", list(ROW_FORMATS))
def test_collator_output_on_each_row_format(base_dir, row_format):
    _, processor, ids = fresh(base_dir)
    examples = make_synthetic_dataset("counting", 1, seed=3) + make_synthetic_dataset("visual_similarity", 1, seed=3)
    batch = LivrCollator(processor, latent_token_ids=ids)([ROW_FORMATS[row_format](e) for e in examples])
    latents = "".join(latent_token_strings(K))
    check_batch(batch, [expected_row(processor, e, latents) for e in examples], processor.tokenizer.pad_token_id)
    images = sum(len(e.images) for e in examples)
    assert batch["image_grid_thw"].shape == (images, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())


@pytest.mark.parametrize("mode", ["sft", "mask-only"])
def test_collator_places_latents_per_mode(base_dir, mode):
    _, processor, ids = fresh(base_dir)
    examples = make_synthetic_dataset("counting", 2, seed=4)
    rows = [ROW_FORMATS["messages"](e) for e in examples]
    collator = LivrCollator(processor, mode=mode, num_latents=K if mode == "mask-only" else None)
    vocab = vocabulary_latent_ids(processor, K) if mode == "mask-only" else ()
    assert collator.latent_rows == tuple(vocab)
    check_batch(collator(rows), [expected_row(processor, e, "", vocab) for e in examples], processor.tokenizer.pad_token_id)


def test_collator_labels_only_the_last_assistant_turn(base_dir):
    _, processor, ids = fresh(base_dir)
    example = make_synthetic_dataset("counting", 1, seed=5)[0]
    earlier = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    row = {"images": example.images, "messages": earlier + [user_turn(example), assistant_turn(example)]}
    batch = LivrCollator(processor, latent_token_ids=ids)([row])
    _, kinds, labels = expected_row(processor, example, "".join(latent_token_strings(K)))
    assert batch["labels"][0, -len(labels):].tolist() == labels
    assert (batch["labels"][0, :-len(labels)] == IGNORE_INDEX).all(), "the earlier assistant turn is prompt"
    assert batch["segment_ids"][0, -len(kinds):].tolist() == kinds


def test_collator_errors_say_what_to_do(base_dir):
    _, processor, ids = fresh(base_dir)
    example = make_synthetic_dataset("counting", 1, seed=6)[0]
    collator = LivrCollator(processor, latent_token_ids=ids)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{}])
    with pytest.raises(ValueError, match="batch row 0 has 1 image part.* but 2 image"):
        collator([{**ROW_FORMATS["messages"](example), "images": example.images * 2}])
    with pytest.raises(ValueError, match="no assistant turn after its last user turn"):
        collator([{"images": example.images, "messages": [user_turn(example)]}])
    with pytest.raises(ValueError, match="needs latent_token_ids"):
        LivrCollator(processor)
    image_pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for wrong in ([image_pad], [ids[0], 100]):
        with pytest.raises(ValueError, match="not latent tokens added to this processor"):
            LivrCollator(processor, latent_token_ids=wrong)
    with pytest.raises(ValueError, match="give it livr rows"):
        LivrCollator(processor, mode="image-twice")([ROW_FORMATS["messages"](example)])
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token; set processor.tokenizer.pad_token"):
        LivrCollator(processor, latent_token_ids=ids)


def pixels_changed(batch):
    changed = dict(batch)
    changed["pixel_values"] = torch.randn_like(batch["pixel_values"])
    return changed


@torch.no_grad()
def logits_before_latents_unchanged(model, batch) -> tuple:
    """(text logits before the latents bit-identical, answer logits identical) when the pixels change."""
    kinds = batch["segment_ids"][0]
    first_latent = int((kinds == LATENT).nonzero()[0])
    text = (kinds == TEXT) & (torch.arange(kinds.numel()) < first_latent)
    assert int(text.sum()) > 10 and bool((kinds[:first_latent] == IMAGE).any()), "the probe has text after the image"
    answer = kinds == ANSWER
    a = model(**batch).logits[0]
    b = model(**pixels_changed(batch)).logits[0]
    return torch.equal(a[text], b[text]), torch.equal(a[answer], b[answer])


def lora(ids=None):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      trainable_token_indices=ids)


@pytest.mark.parametrize("order", ["peft_then_patch", "patch_then_peft"])
def test_patch_order_does_not_matter(base_dir, order):
    model, processor, ids = fresh(base_dir)
    rows = [ROW_FORMATS["messages"](e) for e in make_synthetic_dataset("counting", 1, seed=7)]
    batch = LivrCollator(processor, latent_token_ids=ids)(rows)
    if order == "peft_then_patch":
        model = get_peft_model(model, lora(ids))
        handle = patch_attention(model, rule="bottleneck", latent_token_ids=ids)
    else:
        handle = patch_attention(model, rule="bottleneck", latent_token_ids=ids)
        model = get_peft_model(model, lora(ids))
    assert get_handle(model) is handle
    model.train()
    assert logits_before_latents_unchanged(model, batch) == (True, False)
    handle.set_rule("standard")
    assert logits_before_latents_unchanged(model, batch)[0] is False, "under the standard rule the text sees the image"


class Recorder(TrainerCallback):
    """Per optimizer step: the LR the optimizer uses, the rule, AdamW's step count after the step,
    and the pixel check on a probe batch."""

    def __init__(self, handle, probe):
        self.handle, self.probe, self.steps = handle, probe, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({"step": state.global_step, "lr": optimizer.param_groups[0]["lr"], "rule": self.handle.rule.name})

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        adam = next(iter(optimizer.state.values()))
        self.steps[-1]["adam_step"] = int(adam["step"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["pixels"] = logits_before_latents_unchanged(model, self.probe)


def sft_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), num_train_epochs=2, per_device_train_batch_size=2, learning_rate=LR,
                    warmup_steps=0.1, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                    logging_steps=1, save_strategy="epoch", report_to=[], use_cpu=True, bf16=False, max_length=None,
                    gradient_checkpointing=False, disable_tqdm=True, seed=0)
    settings.update(overrides)
    return SFTConfig(**settings)


def chat_rows(n, seed=0):
    return [ROW_FORMATS["messages"](e) for e in make_synthetic_dataset("counting", n, seed=seed)]


@pytest.fixture(scope="module")
def trl_run(base_dir, tmp_path_factory):
    """Patch the bare model, then let SFTTrainer(peft_config=...) wrap it; two stages of 4 steps."""
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="standard", latent_token_ids=ids)
    collator = LivrCollator(processor, latent_token_ids=ids)
    rows = chat_rows(2 * STEPS_PER_STAGE)
    recorder = Recorder(handle, collator(rows[:1]))
    output_dir = tmp_path_factory.mktemp("trl_run")
    trainer = SFTTrainer(model=model, args=sft_args(output_dir), train_dataset=Dataset.from_list(rows), data_collator=collator,
                         processing_class=processor, peft_config=lora(ids),
                         callbacks=[LivrStageCallback(handle, stage_epochs=(1, 1)), recorder])
    trainer.train()
    return trainer, handle, recorder, output_dir, collator, rows


def test_callback_switches_rule_and_restarts_schedule(trl_run):
    trainer, handle, recorder, *_ = trl_run
    assert isinstance(trainer.model, PeftModel) and get_handle(trainer.model) is handle
    # 4 steps a stage, warmup ceil(0.1 * 4) = 1 step at (0 + 1) / (1 + 1), then cosine over 3 steps.
    per_stage = [LR * 0.5, LR * 1.0, LR * 0.75, LR * 0.25]
    assert [s["lr"] for s in recorder.steps] == pytest.approx(per_stage * 2, rel=1e-9)
    assert [s["rule"] for s in recorder.steps] == ["bottleneck"] * 4 + ["standard"] * 4
    assert [s["adam_step"] for s in recorder.steps] == [1, 2, 3, 4, 1, 2, 3, 4], "stage 2 starts with fresh AdamW state"
    logged = [entry[STAGE_LOG_KEY] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [1] * 4 + [2] * 4


def test_resume_at_the_boundary_continues_like_the_uninterrupted_run(trl_run, base_dir, tmp_path):
    *_, output_dir, _, rows = trl_run
    recorded = trl_run[2].steps
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="standard", latent_token_ids=ids)
    collator = LivrCollator(processor, latent_token_ids=ids)
    recorder = Recorder(handle, collator(rows[:1]))
    boundary_checkpoint = tmp_path / f"checkpoint-{STEPS_PER_STAGE}"
    shutil.copytree(output_dir / boundary_checkpoint.name, boundary_checkpoint)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(rows), data_collator=collator,
                         processing_class=processor, peft_config=lora(ids),
                         callbacks=[LivrStageCallback(handle, stage_epochs=(1, 1)), recorder])
    trainer.train(resume_from_checkpoint=str(boundary_checkpoint))
    keys = ("step", "lr", "rule", "adam_step")
    assert [tuple(s[k] for k in keys) for s in recorder.steps] == [tuple(s[k] for k in keys) for s in recorded[STEPS_PER_STAGE:]]


def trainer_steps(base_dir, tmp_path, callback_kwargs: dict, **arguments) -> list:
    """The Recorder's steps of a plain Trainer run (LoRA, two stages of STEPS_PER_STAGE) with
    ``LivrStageCallback(**callback_kwargs)`` and ``TrainingArguments(**arguments)``."""
    model, processor, ids = fresh(base_dir)
    model = get_peft_model(model, lora(ids))
    handle = patch_attention(model, rule="standard", latent_token_ids=ids)
    collator = LivrCollator(processor, latent_token_ids=ids)
    rows = chat_rows(2 * STEPS_PER_STAGE)
    recorder = Recorder(handle, collator(rows[:1]))
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=2, learning_rate=LR,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, **arguments)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
            callbacks=[LivrStageCallback(handle, stage_epochs=(1, 1), **callback_kwargs), recorder]).train()
    return recorder.steps


def test_a_one_stage_mode_runs_one_schedule_under_its_rule(base_dir, tmp_path):
    # prompt-tuning: one standard-rule stage of E1 + E2 epochs: one warmup and one cosine, no boundary.
    steps = trainer_steps(base_dir, tmp_path, {"mode": "prompt-tuning"}, warmup_steps=0.1)
    total = 2 * STEPS_PER_STAGE
    warmup = math.ceil(0.1 * total)
    want = [LR * (s + 1) / (warmup + 1) if s < warmup else LR * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
            for s in range(total)]
    assert [s["lr"] for s in steps] == pytest.approx(want, rel=1e-9)
    assert [s["rule"] for s in steps] == ["standard"] * total
    assert [s["adam_step"] for s in steps] == list(range(1, total + 1)), "no stage boundary resets AdamW"


def test_without_restart_the_trainer_keeps_its_schedule_and_optimizer(base_dir, tmp_path):
    steps = trainer_steps(base_dir, tmp_path, {"restart_schedule": False}, lr_scheduler_type="linear")
    total = 2 * STEPS_PER_STAGE
    assert [s["lr"] for s in steps] == pytest.approx([LR * (1 - step / total) for step in range(total)], rel=1e-9)
    assert [s["adam_step"] for s in steps] == list(range(1, total + 1))
    assert [s["rule"] for s in steps] == ["bottleneck"] * 4 + ["standard"] * 4


def test_stage2_lr_scale_lowers_only_the_second_stage(base_dir, tmp_path):
    steps = trainer_steps(base_dir, tmp_path, {"stage2_lr_scale": 0.25}, warmup_steps=0.1)
    per_stage = [LR * 0.5, LR * 1.0, LR * 0.75, LR * 0.25]
    assert [s["lr"] for s in steps] == pytest.approx(per_stage + [0.25 * lr for lr in per_stage], rel=1e-9)


@pytest.mark.parametrize("scale, restart, message", [
    (0.0, True, "stage2_lr_scale must be a finite number > 0"),
    ("0.5", True, "stage2_lr_scale must be a finite number > 0"),
    (float("inf"), True, "stage2_lr_scale must be a finite number > 0"),
    (0.5, False, "stage2_lr_scale needs restart_schedule=True"),
])
def test_stage2_lr_scale_is_checked(base_dir, scale, restart, message):
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="standard", latent_token_ids=ids)
    with pytest.raises(ValueError, match=message):
        LivrStageCallback(handle, stage_epochs=(1, 1), restart_schedule=restart, stage2_lr_scale=scale)


def test_stage1_text_before_latents_never_sees_the_pixels(trl_run):
    recorder = trl_run[2]
    stage1, stage2 = recorder.steps[:STEPS_PER_STAGE], recorder.steps[STEPS_PER_STAGE:]
    assert all(s["pixels"] == (True, False) for s in stage1), "stage 1: text before the latents ignores pixels; the answer does not"
    assert all(not s["pixels"][0] for s in stage2), "stage 2 (standard): the text sees the image"


def test_trl_run_is_scored_by_livr_eval_with_probes(trl_run, tmp_path, capsys):
    trainer, handle, _, output_dir, collator, rows = trl_run
    checkpoint = output_dir / f"checkpoint-{2 * STEPS_PER_STAGE}"
    assert all((checkpoint / name).is_file() for name in RUN_FILES + ("adapter_model.safetensors",))
    run = json.loads((checkpoint / RUN_FILE).read_text())
    assert (run["mode"], run["num_latents"], run["stage"], run["global_step"]) == ("livr", K, "stage2", 8)

    loaded = load_trained(output_dir)
    assert loaded.checkpoint_dir == checkpoint, "the newest checkpoint-N of a Trainer output directory"
    batch = collator(rows[:2])
    handle.set_rule("standard")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, trainer.model(**batch).logits, atol=1e-5, rtol=1e-5)
    handle.set_rule("bottleneck")
    with torch.no_grad():
        assert not torch.allclose(loaded.model(**batch).logits, trainer.model(**batch).logits), "the rules differ"

    eval_dir = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(output_dir), "--data", "synthetic:counting", "--limit", "4"]) == 2
    assert "no train_fingerprints.json in the run" in capsys.readouterr().err
    # A Trainer run records no training fingerprints: the user vouches for held-out data.
    assert eval_main(["--checkpoint", str(output_dir), "--data", "synthetic:counting", "--limit", "4",
                      "--output-dir", str(eval_dir), "--allow-overlap"]) == 0
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_examples"] == 4 and metrics["mode"] == "livr"
    probes = metrics["probes"]
    assert 0.0 < probes["answer_to_latent_attention"] < 1.0
    assert probes["latents_removed"] is not None and probes["bottleneck_forced"] is not None
    assert eval_main(["--checkpoint", str(output_dir)]) == 2
    assert "livr-eval: error: --data is required" in capsys.readouterr().err
    no_adapter = tmp_path / "no_adapter"
    shutil.copytree(checkpoint, no_adapter, ignore=shutil.ignore_patterns("adapter_*"))
    with pytest.raises(ValueError, match="no adapter_config.json: livr-eval scores LoRA"):
        load_trained(no_adapter)


def livr_collator(processor, ids):
    return LivrCollator(processor, latent_token_ids=ids)


def run_steps(base_dir, tmp_path, *, ids_trainable=True, make_collator=livr_collator, max_steps=1):
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=ids)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=max_steps, save_strategy="no"),
                         train_dataset=Dataset.from_list(chat_rows(4)), data_collator=make_collator(processor, ids),
                         processing_class=processor, peft_config=lora(ids if ids_trainable else None),
                         callbacks=[LivrStageCallback(handle, stage_epochs=(1, 1))])
    trainer.train()


def test_guard_batch_without_latents_under_bottleneck_is_an_error(base_dir, tmp_path):
    with pytest.raises(ValueError, match="no LATENT token.*LivrCollator"):
        run_steps(base_dir, tmp_path, make_collator=lambda processor, ids: LivrCollator(processor, mode="sft"))


def _guard_check(rule, rows):
    """BatchGuard on one training forward whose tokens have the kinds in ``rows`` (strings of T I L A)."""
    from types import SimpleNamespace

    from livr_kernels import SegmentLayout, resolve_rule
    from livr_model.forward_layout import ForwardState
    from livr_model.integrations import BatchGuard
    from livr_model.patch import STATE_KWARG

    kind = {"T": Segment.TEXT, "I": Segment.IMAGE, "L": Segment.LATENT, "A": Segment.ANSWER}
    segment_ids = torch.tensor([[int(kind[c]) for c in row] for row in rows])
    model = torch.nn.Module()
    guard = BatchGuard(SimpleNamespace(model=model), "livr")
    state = ForwardState(SegmentLayout(segment_ids), resolve_rule(rule), "auto")
    guard(model, (), {STATE_KWARG: state})


@pytest.mark.parametrize("rule", ["bottleneck", "bottleneck_answer_only"])
def test_guard_stops_rows_with_an_image_and_no_latent_under_each_rule_hiding_it(rule):
    with pytest.raises(ValueError, match=r"batch rows \[1\] hold image tokens and no LATENT token"):
        _guard_check(rule, ["TIITLLAA", "TIIITTAA"])
    _guard_check("standard", ["TIITLLAA", "TIIITTAA"])


def test_guard_lets_text_only_rows_through():
    # A row without an image has nothing to carry: no latent is needed there.
    _guard_check("bottleneck", ["TIITLLAA", "TTTTTTAA"])


def test_guard_labels_on_the_prompt_warn_once(base_dir, tmp_path):
    def everything_labelled(processor, ids):
        inner = LivrCollator(processor, latent_token_ids=ids)

        def collate(rows):
            batch = inner(rows)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            batch.pop("segment_ids")
            return batch
        return collate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_steps(base_dir, tmp_path, make_collator=everything_labelled, max_steps=2)
    hits = [w for w in caught if "labels cover" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]


def test_guard_untrainable_latent_rows_warn(base_dir, tmp_path):
    with pytest.warns(UserWarning, match="latent rows .* are not trainable.*trainable_token_indices"):
        run_steps(base_dir, tmp_path, ids_trainable=False)


def test_callback_checks_the_epoch_count(base_dir, tmp_path):
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=ids)
    trainer = Trainer(model=get_peft_model(model, lora(ids)), data_collator=LivrCollator(processor, latent_token_ids=ids),
                      args=TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, remove_unused_columns=False,
                                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True),
                      train_dataset=chat_rows(2), callbacks=[LivrStageCallback(handle, stage_epochs=(1, 1))])
    with pytest.raises(ValueError, match="set num_train_epochs=2"):
        trainer.train()


def test_packing_collator_gives_the_loss_of_the_padded_batch(base_dir):
    model, processor, ids = fresh(base_dir)
    handle = patch_attention(model, rule="bottleneck", latent_token_ids=ids)
    examples = make_synthetic_dataset("counting", 2, seed=8) + make_synthetic_dataset("visual_similarity", 1, seed=8)
    rows = [ROW_FORMATS["messages"](e) for e in examples]
    padded = LivrCollator(processor, latent_token_ids=ids)(rows)
    packed = LivrCollator(processor, latent_token_ids=ids, packing=True, model=model, max_length=4096)(rows)
    assert packed["input_ids"].shape[0] == 1 < padded["input_ids"].shape[0]
    assert packed["doc_ids"].unique().numel() == len(rows)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    model.eval()
    with torch.no_grad():
        want, got = model(**padded).loss, model(**packed).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packing=True needs model="):
        LivrCollator(processor, latent_token_ids=ids, packing=True)
    handle.remove()


def test_run_files_are_written_atomically(base_dir, tmp_path, monkeypatch):
    """The callback's run files go through livr_model.atomic: a save that fails half-way (the latent
    rows, say) leaves the files of the previous save whole and no temporary file behind."""
    import livr_model.integrations as integrations

    model, _, ids = fresh(base_dir)
    callback = LivrStageCallback(patch_attention(model, rule="bottleneck", latent_token_ids=ids), stage_epochs=(1, 1))
    folder = callback.write_run_files(tmp_path / "ckpt", model, step=1)
    before = {name: (folder / name).read_bytes() for name in RUN_FILES}

    def failing_save(rows):
        raise OSError("disk full")

    monkeypatch.setattr(integrations, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        callback.write_run_files(folder, model, step=2)
    assert {name: (folder / name).read_bytes() for name in RUN_FILES} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(RUN_FILES)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(integrations, "atomic_write_bytes", lambda path, data: calls.append(path.name) or path.write_bytes(data))
    callback.write_run_files(folder, model, step=3)
    assert sorted(calls) == sorted(RUN_FILES)
    assert json.loads((folder / RUN_FILE).read_text())["global_step"] == 3
