"""The two-stage trainer on a tiny Qwen2.5-VL: what trains, what stays frozen, which rule each stage
runs, answer-only loss, checkpoints and exact resume."""
import json
import math

import pytest
import torch

from livr_model.app import checkpoints as ckpt
from livr_model.compat import is_activation_checkpointing
from livr_model.app.data import make_synthetic_dataset
from livr_model.patch import STATE_KWARG
from livr_model.app.tiny import build_tiny_model, build_tiny_processor
from livr_model.app.config import TrainConfig, stage_plan
from livr_model.app.callbacks import Callback
from livr_model.app.models import load_trained
from livr_model.app.state import trainable_state_dict
from livr_model.app.schedule import StageSchedule, accumulation_groups, epoch_order, rank_batches, stage_peaks, steps_per_epoch
from livr_model.app.train import answer_nll, train

IMAGE_SIZE = 28
TEXT_HIDDEN = 64
VISION_HIDDEN = 32
NUM_TRAIN = 8
NUM_VAL = 4
LATENTS = 4


def tiny_setup(seed=0):
    processor = build_tiny_processor(IMAGE_SIZE)
    model = build_tiny_model(processor, seed=seed, text_hidden=TEXT_HIDDEN, vision_hidden=VISION_HIDDEN, vision_depth=1)
    return model, processor


def tiny_data(task="counting"):
    return (
        make_synthetic_dataset(task, NUM_TRAIN, seed=0, image_size=IMAGE_SIZE),
        make_synthetic_dataset(task, NUM_VAL, seed=1, image_size=IMAGE_SIZE),
    )


def tiny_config(tmp_path, **overrides):
    settings = dict(
        model="in-memory tiny",
        data="synthetic:counting",
        mode="livr",
        latents=LATENTS,
        stage_epochs=(1, 1),
        output_dir=str(tmp_path),
        lr=1e-2,
        grad_accum=2,
        max_new_tokens=3,
        eval_batch_size=4,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


class RuleSpy:
    """Records the rule every attention call of the first text layer actually received."""

    def __init__(self, model):
        layer = model.model.language_model.layers[0].self_attn
        self.calls = []
        self._hook = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training:
            self.calls.append(kwargs[STATE_KWARG].rule.name)

    def remove(self):
        self._hook.remove()


class AdamSteps(Callback):
    """AdamW's step count after every optimizer step (its state restarts when a stage resets it)."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, run, info):
        inner = getattr(run.optimizer, "optimizer", run.optimizer)
        self.counts.append(int(next(iter(inner.state.values()))["step"]))


@pytest.fixture(scope="module")
def livr_run(tmp_path_factory):
    """One short LIVR run (2 stages x 1 epoch x 4 optimizer steps) shared by several tests."""
    out = tmp_path_factory.mktemp("livr_run")
    model, processor = tiny_setup()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    spy = RuleSpy(model)
    steps = []
    train_examples, val_examples = tiny_data()
    cfg = tiny_config(out)
    adam = AdamSteps()
    result = train(cfg, model=model, processor=processor, train_examples=train_examples, val_examples=val_examples,
                   step_callback=steps.append, callbacks=[adam])
    spy.remove()
    return dict(result=result, before=before, spy=spy, steps=steps, cfg=cfg, out=out, adam_steps=adam.counts)


def test_stage_plan_per_mode():
    def plan(mode):
        return [(s.rule, s.epochs) for s in stage_plan(TrainConfig(mode=mode))]

    assert plan("livr") == [("bottleneck", 4), ("standard", 6)]
    assert plan("mask-only") == [("bottleneck", 4), ("standard", 6)]
    assert plan("latents-only") == [("standard", 4), ("standard", 6)]
    assert plan("sft") == [("standard", 10)]
    assert plan("image-twice") == [("standard", 10)]


def test_stage_plan_honours_sft_epochs_and_drops_empty_stages():
    def plan(**settings):
        return [(s.name, s.rule, s.epochs) for s in stage_plan(TrainConfig(**settings))]

    # sft_epochs sets the one-stage modes' length; the two-stage modes keep theirs.
    assert plan(mode="sft", sft_epochs=3) == [("sft", "standard", 3)]
    assert plan(mode="prompt-tuning", sft_epochs=2) == [("prompt-tuning", "standard", 2)]
    assert plan(mode="livr", sft_epochs=3) == [("stage1", "bottleneck", 4), ("stage2", "standard", 6)]
    # A stage of zero epochs is not run (nor logged, nor switched to).
    assert plan(mode="livr", stage_epochs=(0, 5)) == [("stage2", "standard", 5)]
    assert plan(mode="livr", stage_epochs=(3, 0)) == [("stage1", "bottleneck", 3)]


def test_train_config_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert (cfg.lr, cfg.weight_decay, cfg.betas) == (1e-4, 0.01, (0.9, 0.999))
    assert (cfg.batch_size, cfg.grad_accum, cfg.warmup_ratio) == (1, 8, 0.05)
    assert (cfg.latents, cfg.seed, cfg.stage_epochs) == (16, 42, (4, 6))


@pytest.mark.parametrize(
    "field, value, match",
    [("mode", "prefix-tuning", "mode"), ("stage_epochs", (1, 2, 3), "stage_epochs"), ("grad_accum", 0, "grad_accum"),
     ("warmup_ratio", 1.5, "warmup_ratio"), ("eval_method", "vibes", "eval_method")],
)
def test_train_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_schedule_warms_up_then_decays_and_restarts_per_stage():
    schedule = StageSchedule([40, 60], warmup_ratio=0.05)
    stage1 = [schedule(s) for s in range(40)]
    stage2 = [schedule(s) for s in range(40, 100)]
    warm1, warm2 = math.ceil(0.05 * 40), math.ceil(0.05 * 60)
    assert stage1[0] > 0, "the first update of a stage must not be wasted with lr 0"
    assert stage1[:warm1 + 1] == sorted(stage1[:warm1 + 1]) and stage1[warm1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(stage1[warm1:], stage1[warm1 + 1:])), "cosine decay is monotone"
    assert stage1[-1] < 0.01
    # stage 2 starts over: warmup from small to peak again
    assert stage2[0] == pytest.approx(stage1[0] * (warm1 + 1) / (warm2 + 1))
    assert stage2[warm2] == pytest.approx(1.0) and stage2[-1] < 0.01
    # A fractional warmup rounds up, as transformers' get_warmup_steps does for the TRL callback: 0.05 * 30 -> 2 steps.
    short = StageSchedule([30], warmup_ratio=0.05)
    assert [short(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_stage2_lr_scales_only_the_second_stage():
    cfg = TrainConfig(lr=2e-3, stage2_lr=5e-4)
    plan = stage_plan(cfg)
    assert stage_peaks(cfg, plan) == [1.0, 0.25]
    plain, scaled = StageSchedule([40, 60], 0.05), StageSchedule([40, 60], 0.05, stage_peaks(cfg, plan))
    assert [scaled(s) for s in range(40)] == [plain(s) for s in range(40)]
    assert [scaled(s) for s in range(40, 100)] == pytest.approx([0.25 * plain(s) for s in range(40, 100)])
    # Without stage 1 the only stage is stage 2; one-stage modes and no stage2_lr leave every peak at lr.
    only2 = TrainConfig(lr=2e-3, stage2_lr=5e-4, stage_epochs=(0, 3))
    assert stage_peaks(only2, stage_plan(only2)) == [0.25]
    assert stage_peaks(TrainConfig(lr=2e-3, stage2_lr=5e-4, mode="sft"), stage_plan(TrainConfig(mode="sft"))) == [1.0]
    assert stage_peaks(TrainConfig(), stage_plan(TrainConfig())) == [1.0, 1.0]
    with pytest.raises(ValueError, match="stage2_lr"):
        TrainConfig(stage2_lr=0)
    with pytest.raises(ValueError, match="peaks"):
        StageSchedule([40, 60], 0.05, [1.0])


def test_data_order_depends_only_on_seed_and_epoch():
    torch.manual_seed(123)
    a = epoch_order(50, seed=42, epoch=3)
    torch.manual_seed(999)
    assert epoch_order(50, seed=42, epoch=3) == a
    assert epoch_order(50, seed=42, epoch=4) != a
    assert sorted(a) == list(range(50))


@pytest.mark.parametrize("n, batch, world", [(10, 1, 2), (7, 2, 2), (9, 3, 1)])
def test_rank_batches_cover_data_evenly(n, batch, world):
    order = epoch_order(n, seed=0, epoch=0)
    per_rank = [rank_batches(order, batch, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "every rank needs the same number of micro-batches"
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(n))
    assert len(seen) == math.ceil(n / (batch * world)) * batch * world
    cfg = TrainConfig(batch_size=batch, grad_accum=2)
    assert len(accumulation_groups(per_rank[0], 2)) == steps_per_epoch(n, cfg, world)


def test_answer_nll_ignores_everything_but_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 4:] = torch.tensor([3, 5])
    labels[1, 5] = 7
    loss = answer_nll(logits, labels)
    loss.backward()
    # position t predicts label t+1: only rows 0 (t=3,4) and 1 (t=4) carry gradient
    carries = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 3:5] = True
    expected[1, 4] = True
    assert torch.equal(carries, expected)
    manual = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 3], logits[0, 4], logits[1, 4]]), torch.tensor([3, 5, 7])
    )
    assert loss.item() == pytest.approx(manual.item())
    with pytest.raises(ValueError, match="supervise no token"):
        answer_nll(logits, torch.full((2, 6), -100))


def test_training_labels_cover_the_answer_only(livr_run):
    encoder = livr_run["result"].encoder
    tokenizer = encoder.processor.tokenizer
    example = livr_run["result"].train_examples[0]
    encoded = encoder.encode(example, with_answer=True)
    supervised = encoded["labels"][encoded["labels"] != -100]
    assert tokenizer.decode(supervised, skip_special_tokens=True) == f"({example.answer})"
    assert tokenizer.convert_ids_to_tokens(int(supervised[-1])) == "<|im_end|>"


def test_stages_run_with_their_rules(livr_run):
    steps, spy = livr_run["steps"], livr_run["spy"]
    assert [s.stage for s in steps] == ["stage1"] * 4 + ["stage2"] * 4
    assert [s.rule for s in steps] == ["bottleneck"] * 4 + ["standard"] * 4
    # what the attention layer itself received on every training forward (2 micro-batches a step)
    assert spy.calls == ["bottleneck"] * 8 + ["standard"] * 8
    assert all(math.isfinite(s.loss) for s in steps)


def test_stage2_starts_with_fresh_optimizer_state(livr_run):
    assert livr_run["adam_steps"] == [1, 2, 3, 4, 1, 2, 3, 4]


def test_optimizer_state_runs_on_across_stages_without_the_reset(tmp_path):
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    adam = AdamSteps()
    train(tiny_config(tmp_path, reset_optimizer_per_stage=False, max_steps=6), model=model, processor=processor,
          train_examples=train_examples, val_examples=val_examples, callbacks=[adam])
    assert adam.counts == [1, 2, 3, 4, 5, 6]


def test_only_lora_and_latent_rows_train(livr_run):
    result, before = livr_run["result"], livr_run["before"]
    base = result.model.get_base_model()
    latent_ids = list(result.latent_token_ids)
    assert len(latent_ids) == LATENTS
    after = dict(base.named_parameters())
    for name, old in before.items():
        if name.startswith("model.visual."):
            assert torch.equal(after[name], old), f"vision tower/projector weight {name} changed"
    embedding = base.get_input_embeddings().weight
    old_embedding = before["model.language_model.embed_tokens.weight"]
    assert torch.equal(embedding[: old_embedding.shape[0]], old_embedding), "a pre-existing embedding row changed"
    other = [i for i in range(embedding.shape[0]) if i not in latent_ids]
    effective = base.get_input_embeddings()(torch.arange(embedding.shape[0]))
    assert torch.equal(effective[other], embedding[other])
    assert not torch.allclose(effective[latent_ids], embedding[latent_ids]), "the latent rows did not train"
    assert torch.equal(base.lm_head.weight[: old_embedding.shape[0]], before["lm_head.weight"])
    trained = trainable_state_dict(result.model)
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in trained.items()), "LoRA B starts at 0 and must move"
    assert not any("visual" in n for n in trained)


def test_checkpoints_and_selection(livr_run):
    out, result = livr_run["out"], livr_run["result"]
    latest = ckpt.read_pointer(out, ckpt.LATEST_POINTER)
    selected = ckpt.read_pointer(out, ckpt.SELECTED_POINTER)
    assert latest.name == "step-00000008"
    history = result.state.history
    best = max(history, key=lambda h: h["val_accuracy"])
    first_best = next(h for h in history if h["val_accuracy"] == best["val_accuracy"])
    assert selected.name == ckpt.checkpoint_dir_name(first_best["global_step"]), "single task: best validation accuracy"
    for name in (ckpt.ADAPTER_WEIGHTS, ckpt.ADAPTER_CONFIG, ckpt.LATENT_WEIGHTS, ckpt.TOKENIZER_ADDITIONS,
                 ckpt.RUN_CONFIG_JSON, ckpt.TRAINING_STATE, ckpt.INFO):
        assert (latest / name).is_file(), name
    assert not list(out.rglob("*.tmp")), "no temporary files may be left behind"
    assert json.loads((latest / ckpt.TOKENIZER_ADDITIONS).read_text())["ids"] == list(result.latent_token_ids)
    assert (out / ckpt.RUN_CONFIG_YAML).is_file()


def test_load_trained_reproduces_the_trained_model(livr_run):
    result = livr_run["result"]
    out = livr_run["out"]
    fresh_model, fresh_processor = tiny_setup()
    run = load_trained(out / ckpt.CHECKPOINTS_DIR / "step-00000008", model=fresh_model, processor=fresh_processor)
    example = result.val_examples[0]
    encoded = [result.encoder.encode(example, with_answer=True)]
    batch, _, segments = result.encoder.collate(encoded, padding_side="right")
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch, segment_ids=segments).logits
        got = run.model(**batch, segment_ids=segments).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert run.handle.rule.name == "standard"


def _run(tmp_path, **overrides):
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    cfg = tiny_config(tmp_path, save_steps=3, **overrides)
    return train(cfg, model=model, processor=processor, train_examples=train_examples, val_examples=val_examples)


@pytest.mark.slow
@pytest.mark.parametrize("stage2_lr", [None, 1e-4])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, stage2_lr):
    full = _run(tmp_path / "full", stage2_lr=stage2_lr)
    # Interrupted in the middle of stage 2's epoch (step 6 of 8); the last save is step 6.
    partial = _run(tmp_path / "resumed", max_steps=6, stage2_lr=stage2_lr)
    assert partial.state.global_step == 6
    resumed = _run(tmp_path / "resumed", resume=True, stage2_lr=stage2_lr)
    assert resumed.state.global_step == full.state.global_step == 8
    want, got = trainable_state_dict(full.model), trainable_state_dict(resumed.model)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    assert resumed.state.history == full.state.history
    # a run that stopped early would differ: the comparison can fail
    assert any(not torch.equal(want[n], trainable_state_dict(partial.model)[n]) for n in want)


def test_resume_refuses_changed_settings(tmp_path):
    _run(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="different settings"):
        _run(tmp_path, resume=True, lr=5e-3)
    with pytest.raises(ValueError, match=r"different settings for \['stage2_lr'\]"):
        _run(tmp_path, resume=True, stage2_lr=5e-3)


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    ckpt.atomic_write_json(target, {"step": 1})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_json(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "the temporary file is cleaned up"


def test_checkpoint_directory_is_all_or_nothing(tmp_path):
    final = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(5)
    ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": 5}), "a.txt": "old"})
    ckpt.write_pointer(tmp_path, ckpt.LATEST_POINTER, final)

    def half_written(path):
        path.write_text("partial")
        raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError, match="killed"):
        ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": 5}), "a.txt": "new", "b.bin": half_written})
    assert (final / "a.txt").read_text() == "old" and not (final / "b.bin").exists()
    assert ckpt.resolve_checkpoint(tmp_path, ckpt.LATEST_POINTER) == final
    # the next save of the same step replaces the directory and leaves nothing temporary behind
    ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": 5}), "a.txt": "new"})
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_replacing_a_checkpoint_moves_the_old_one_aside_before_the_rename(tmp_path, monkeypatch):
    """A kill at the rename that puts the new directory in place must not have deleted the old one."""
    final = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(5)
    ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": 5}), "a.txt": "old"})
    real_replace = ckpt.os.replace

    def killed_at_the_final_rename(src, dst):
        if str(src).endswith(ckpt.TMP_SUFFIX) and str(dst) == str(final):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_final_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": 5}), "a.txt": "new"})
    survivors = [p for p in final.parent.iterdir() if (p / "a.txt").is_file() and (p / "a.txt").read_text() == "old"]
    assert survivors, "the old checkpoint was deleted before the new one was in place"


def test_validation_selects_the_first_epoch_with_the_best_accuracy(monkeypatch):
    from types import SimpleNamespace

    from livr_model.app import callbacks
    from livr_model.app.state import ResumeState
    from livr_model.modes import Stage

    accuracies = iter([0.5, 0.5, 0.75, 0.75, 0.25])
    monkeypatch.setattr(callbacks, "validation_accuracy", lambda run, rule=None: next(accuracies))
    state = ResumeState()
    run = SimpleNamespace(state=state, stage=Stage("stage2", "standard", 5), cfg=SimpleNamespace(eval_rule="standard"),
                          handle=SimpleNamespace(set_rule=lambda rule: None), accelerator=SimpleNamespace(is_main_process=False),
                          epoch=0, epoch_in_stage=0, val_per_task=None)
    chosen = []
    for step in (10, 20, 30, 40, 50):
        state.global_step = step
        callbacks.Validate().on_epoch_end(run)
        chosen.append(run.is_best)
    # A tie does not move the selection to a later checkpoint; a worse epoch never takes it.
    assert chosen == [True, False, True, False, False]
    assert (state.best_metric, state.best_step) == (0.75, 30)


def test_prune_keeps_the_newest_and_the_selected(tmp_path):
    dirs = []
    for step in (1, 2, 3, 4):
        final = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_dir_name(step)
        dirs.append(ckpt.write_checkpoint_dir(final, {ckpt.INFO: json.dumps({"global_step": step})}))
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, protect=[dirs[0]])
    assert removed == [dirs[1]]
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == [dirs[0].name, dirs[2].name, dirs[3].name]
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_multi_task_selects_the_last_checkpoint_and_checkpointing_trains(tmp_path):
    """Two tasks: the selected checkpoint is the last one whatever validation says; gradient
    checkpointing on (the layer replay must see the same segment ids) still trains."""
    model, processor = tiny_setup()
    counting, counting_val = tiny_data("counting")
    similarity, similarity_val = tiny_data("visual_similarity")
    cfg = tiny_config(tmp_path, data="synthetic:counting,visual_similarity", gradient_checkpointing=True)
    steps = []
    result = train(cfg, model=model, processor=processor, train_examples=counting + similarity,
                   val_examples=counting_val + similarity_val, step_callback=steps.append)
    assert is_activation_checkpointing(result.model.get_base_model())
    assert ckpt.read_pointer(tmp_path, ckpt.SELECTED_POINTER) == ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER)
    assert ckpt.read_info(ckpt.read_pointer(tmp_path, ckpt.LATEST_POINTER))["global_step"] == len(steps) == 16
    assert steps[-1].loss < steps[0].loss


def test_examples_that_do_not_fit_fail_before_training(tmp_path):
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    cfg = tiny_config(tmp_path, max_length=20)
    steps = []
    with pytest.raises(ValueError, match="training example 0 .*max_length=20"):
        train(cfg, model=model, processor=processor, train_examples=train_examples, val_examples=val_examples,
              step_callback=steps.append)
    assert steps == []
