"""The two-stage LIVR training loop: LoRA on the language model, K trainable latent rows,
answer-only loss.

Stage 1 trains with the bottleneck rule (prompt and answer tokens cannot see the image, so the
answer must read it through the latents); stage 2 returns to the standard causal mask. Each stage
has its own warmup + cosine schedule. What each comparison mode puts into the prompt and which
rule each stage uses is the mode's (``livr_model.modes``). Stage 2 may peak at its own learning rate
(``stage2_lr``). Validation, checkpoints, the progress
bar and user hooks are callbacks (``callbacks.py``).

The trainer runs under a plain ``python``, ``torchrun`` and ``accelerate launch`` (DDP, or FSDP
through an accelerate config): ``accelerate.Accelerator`` owns the process group and the device.
Data order is our own: the permutation of epoch e is a pure function of (seed, e) and each rank
takes its slice of every global batch, so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from livr_model.segment_ids import IGNORE_INDEX

from .callbacks import Callback, RunContext, StepInfo, default_callbacks
from .checkpoints import RUN_CONFIG_JSON, RUN_CONFIG_YAML, claim_output_dir, selected_from_latest
from .cli_errors import user_input
from .config import TrainConfig, stage_plan
from .data import DataSplit, split_data
from .data.fingerprint import dataset_fingerprint
from .data.records import GIVEN, write_data_records
from .files import atomic_write_json, atomic_write_yaml
from .models import build_trainable_model, load_model_and_processor, make_encoder, trainable_summary
from .schedule import StageSchedule, accumulation_groups, epoch_order, rank_batches, stage_peaks, steps_per_epoch
from .state import ResumeState, load_resume, unwrap

# Encoded examples are cached in memory while their total size stays under this budget.
ENCODE_CACHE_BYTES = 2 << 30


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the supervised (answer) positions only: position t predicts label t+1."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits (B, N, V) and labels (B, N) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != IGNORE_INDEX).any():
        raise ValueError("labels supervise no token: every position is -100 (was the answer truncated?)")
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class TrainResult:
    model: Any
    processor: Any
    handle: Any
    encoder: Any
    latent_token_ids: tuple
    state: ResumeState
    selected_checkpoint: Optional[Path]
    train_examples: list
    val_examples: list
    accelerator: Any = None


class EncodedCache:
    """Encoded training examples, kept in memory while they fit ``ENCODE_CACHE_BYTES``; every
    example is encoded once up front so a bad one fails before training starts."""

    def __init__(self, encoder, examples: Sequence, *, budget: int = ENCODE_CACHE_BYTES):
        self.encoder = encoder
        self.examples = list(examples)
        self.cache = {}
        used = 0
        for index, example in enumerate(self.examples):
            try:
                enc = encoder.encode(example, with_answer=True)
            except ValueError as error:
                raise ValueError(f"training example {index} ({example.task}): {error}") from None
            size = sum(v.numel() * v.element_size() for v in enc.values() if isinstance(v, torch.Tensor))
            if used + size <= budget:
                self.cache[index] = enc
                used += size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        if index in self.cache:
            return self.cache[index]
        return self.encoder.encode(self.examples[index], with_answer=True)


def _make_accelerator(cfg: TrainConfig):
    cuda = torch.cuda.is_available()
    # Without cpu=True accelerate ignores torchrun's environment on a CPU-only machine (no gloo group).
    return Accelerator(mixed_precision="bf16" if (cfg.bf16 and cuda) else "no", cpu=not cuda)


def _is_multitask(examples) -> bool:
    return len({e.task for e in examples}) > 1


def _clear_optimizer_state(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()


def _start_run(cfg: TrainConfig, model, processor, train_examples, val_examples) -> tuple:
    """Everything before the first step: model, encoder, encoded data, optimizer, schedule, resume
    state. Returns (run context, encoded training set, stage plan, processor, training examples)."""
    accelerator = _make_accelerator(cfg)
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):
        raise ValueError(
            "livr-train does not run under DeepSpeed: its loop accumulates gradients itself and reads the trainable "
            "tensors directly for checkpoints and exact resume, which ZeRO partitions. Launch with FSDP instead "
            "(examples/accelerate_fsdp.yaml); DeepSpeed fits the Trainer route (examples/accelerate_deepspeed_zero3.yaml)"
        )
    main = accelerator.is_main_process
    claim_output_dir(cfg, main)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    # The data before the model: a missing data file is reported at once, not after hub retries.
    if train_examples is None:
        # A resumed run reuses the validation split it recorded.
        data = split_data(cfg, record_dir=Path(cfg.output_dir) if cfg.resume else None)
        if val_examples is not None:
            data = DataSplit(data.train, list(val_examples), GIVEN, pool_size=len(data.train))
    else:
        data = DataSplit(list(train_examples), list(val_examples or []), GIVEN, pool_size=len(train_examples))
    train_examples, val_examples = data.train, data.val
    if model is None or processor is None:
        model, processor = load_model_and_processor(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not train_examples:
        raise ValueError("train_examples must hold at least one Example")

    model, handle, latent_ids = build_trainable_model(cfg, model, processor)
    encoder = make_encoder(cfg, model, processor, latent_ids)
    dataset = EncodedCache(encoder, train_examples)
    for index, example in enumerate(val_examples):
        # Fail now, not at the end of the first epoch, on a validation example that does not fit.
        try:
            encoder.encode(example, with_answer=False)
        except ValueError as error:
            raise ValueError(f"validation example {index} ({example.task}): {error}") from None
    if main:
        print(trainable_summary(model, latent_ids), flush=True)

    plan = stage_plan(cfg)
    per_epoch = steps_per_epoch(len(dataset), cfg, accelerator.num_processes)
    schedule = StageSchedule([s.epochs * per_epoch for s in plan], cfg.warmup_ratio, stage_peaks(cfg, plan))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)

    fingerprints = {"training": dataset_fingerprint(train_examples), "validation": dataset_fingerprint(val_examples)}
    state = load_resume(accelerator, cfg, model, optimizer, scheduler, fingerprints) if cfg.resume else None
    state = state or ResumeState(data_fingerprints=fingerprints)
    # Only now: a refused resume leaves the run's own config files untouched.
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(output_dir / RUN_CONFIG_YAML, cfg.to_dict())
        atomic_write_json(output_dir / RUN_CONFIG_JSON, cfg.to_dict())
        write_data_records(output_dir, data)
    run = RunContext(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, handle=handle,
                     encoder=encoder, latent_ids=latent_ids, state=state, val_examples=val_examples,
                     single_task=not (cfg.multi_task or _is_multitask(train_examples)))
    return run, dataset, plan, processor, train_examples


def _optimizer_step(run: RunContext, dataset: EncodedCache, group: Sequence) -> tuple:
    """One optimizer step over a group of micro-batches (gradient accumulation); (loss, lr used)."""
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    total_loss = 0.0
    for micro_index, indices in enumerate(group):
        encoded = [dataset[i] for i in indices]
        if cfg.packing:
            batch, labels, segment_ids = run.encoder.collate_packed(encoded, cfg.max_length, run.handle.model,
                                                                    device=accelerator.device)
        else:
            batch, labels, segment_ids = run.encoder.collate(encoded, padding_side="right", device=accelerator.device)
        last = micro_index == len(group) - 1
        with (nullcontext() if last else accelerator.no_sync(model)):
            with accelerator.autocast():
                logits = model(**batch, segment_ids=segment_ids).logits
            loss = answer_nll(logits, labels) / len(group)
            accelerator.backward(loss)
        total_loss += loss.item()
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, lr


def train(cfg: TrainConfig, *, model=None, processor=None, train_examples=None, val_examples=None,
          step_callback: Optional[Callable[[StepInfo], None]] = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run (or, with ``cfg.resume``, continue) a LIVR training run; returns the trained model.

    ``model``/``processor`` default to loading ``cfg.model``; ``train_examples``/``val_examples``
    default to ``prepare_data(cfg)``. ``step_callback`` is called after every optimizer step;
    ``callbacks`` run after the standard ones (progress, validation, checkpoints).
    """
    # Errors before the first step are about the given settings, data, model or output directory.
    with user_input():
        run, dataset, plan, processor, train_examples = _start_run(cfg, model, processor, train_examples, val_examples)
    accelerator, handle, state = run.accelerator, run.handle, run.state
    hooks = default_callbacks(step_callback) + list(callbacks)
    stop = False
    epoch_index = 0
    for stage_index, stage in enumerate(plan):
        stage_first_epoch = epoch_index
        for _ in range(stage.epochs):
            epoch = epoch_index
            epoch_index += 1
            if epoch < state.epoch or stop:
                continue
            handle.set_rule(stage.rule)
            if epoch == stage_first_epoch and stage_index > 0 and state.batch_in_epoch == 0 and cfg.reset_optimizer_per_stage:
                _clear_optimizer_state(run.optimizer)
            order = epoch_order(len(dataset), cfg.seed, epoch)
            my_batches = rank_batches(order, cfg.batch_size, accelerator.num_processes, accelerator.process_index)
            groups_of_epoch = accumulation_groups(my_batches, cfg.grad_accum)
            run.stage, run.epoch, run.epoch_in_stage = stage, epoch, epoch - stage_first_epoch
            for hook in hooks:
                hook.on_epoch_begin(run, len(groups_of_epoch))
            run.model.train()
            for group_index in range(state.batch_in_epoch, len(groups_of_epoch)):
                loss, lr = _optimizer_step(run, dataset, groups_of_epoch[group_index])
                state.global_step += 1
                state.epoch = epoch
                state.batch_in_epoch = group_index + 1
                run.at_epoch_end = group_index + 1 == len(groups_of_epoch)
                run.hit_max_steps = cfg.max_steps is not None and state.global_step >= cfg.max_steps
                info = StepInfo(state.global_step, stage.name, handle.rule.name, epoch, loss, lr)
                for hook in hooks:
                    hook.on_step_end(run, info)
                if run.hit_max_steps:
                    stop = True
                    break
            for hook in hooks:
                hook.on_epoch_close(run)
            if stop and state.batch_in_epoch < len(groups_of_epoch):
                break
            # End of epoch: the next one starts at its first batch.
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            for hook in hooks:
                hook.on_epoch_end(run)
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                stop = True
        if stop:
            break

    handle.set_rule(cfg.eval_rule)
    return TrainResult(
        model=unwrap(accelerator, run.model), processor=processor, handle=handle, encoder=run.encoder,
        latent_token_ids=run.latent_ids, state=state, selected_checkpoint=selected_from_latest(cfg.output_dir),
        train_examples=list(train_examples), val_examples=run.val_examples, accelerator=accelerator,
    )
