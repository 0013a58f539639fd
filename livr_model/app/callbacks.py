"""Callbacks of the training loop: the progress bar, validation, checkpoints, and user hooks.

The loop (``train.py``) only steps the optimizer and walks stages and epochs; everything else it
does at a step or an epoch end is a ``Callback`` in a list, called in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from livr_model.modes import Stage

from .config import TrainConfig
from .predict import predict, rule_forced
from .scoring import result_from_records
from .state import ResumeState, is_fsdp, save_training_checkpoint, unwrap


@dataclass
class StepInfo:
    """What ``step_callback`` sees after every optimizer step."""

    global_step: int
    stage: str
    rule: str
    epoch: int
    loss: float
    lr: float


@dataclass
class RunContext:
    """The run as callbacks see it; the loop keeps the position fields current."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    handle: Any
    encoder: Any
    latent_ids: tuple
    state: ResumeState
    val_examples: list
    single_task: bool
    stage: Optional[Stage] = None
    epoch: int = 0
    epoch_in_stage: int = 0
    # Set by the loop before on_step_end: this step ends the epoch / reaches max_steps.
    at_epoch_end: bool = False
    hit_max_steps: bool = False
    # Set by Validate at an epoch end.
    val_metric: Optional[float] = None
    val_per_task: Optional[dict] = None
    is_best: bool = False


class Callback:
    def on_epoch_begin(self, run: RunContext, num_steps: int) -> None:
        pass

    def on_step_end(self, run: RunContext, info: StepInfo) -> None:
        pass

    def on_epoch_close(self, run: RunContext) -> None:
        """After the last step of an epoch, complete or cut short by max_steps."""

    def on_epoch_end(self, run: RunContext) -> None:
        """After a complete epoch."""


class StepFunction(Callback):
    """A plain function called with the ``StepInfo`` of every optimizer step."""

    def __init__(self, fn: Callable[[StepInfo], None]):
        self.fn = fn

    def on_step_end(self, run, info):
        self.fn(info)


class ProgressBar(Callback):
    def __init__(self):
        self.bar = None

    def on_epoch_begin(self, run, num_steps):
        stage = run.stage
        self.bar = tqdm(total=num_steps, initial=run.state.batch_in_epoch,
                        disable=not (run.accelerator.is_main_process and run.cfg.progress),
                        desc=f"{stage.name} ({stage.rule}) epoch {run.epoch_in_stage + 1}/{stage.epochs}", dynamic_ncols=True)

    def on_step_end(self, run, info):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", stage=info.stage)

    def on_epoch_close(self, run):
        self.bar.close()


def validation_accuracy(run: RunContext, rule: Optional[str] = None) -> Optional[float]:
    """Validation accuracy (average over tasks) under ``rule`` (default ``cfg.eval_rule``), or None
    without validation data; the per-task accuracies go to ``run.val_per_task``. Each process scores
    a shard and the records are gathered."""
    cfg, accelerator = run.cfg, run.accelerator
    rule = cfg.eval_rule if rule is None else rule
    if not run.val_examples:
        return None
    examples = run.val_examples[: cfg.val_limit] if cfg.val_limit else run.val_examples
    sharded = is_fsdp(accelerator)
    # Under FSDP every forward gathers weights collectively, so every process must run the same
    # forwards: all of them score every example. Generation enters below the wrapped root
    # module, so the root's own weights (embeddings, vision tower, head) are gathered by hand.
    shard = examples if sharded else examples[accelerator.process_index::accelerator.num_processes]
    unwrapped = unwrap(accelerator, run.model)
    if sharded:
        unwrapped.unshard()
    try:
        with rule_forced(run.handle, rule):
            records = predict(unwrapped, run.encoder, shard, method=cfg.eval_method, handle=run.handle,
                              batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens) if shard else []
    finally:
        if sharded:
            unwrapped.reshard()
    if accelerator.num_processes > 1 and not sharded:
        records = gather_object(records)
    result = result_from_records(records)
    run.val_per_task = {t: score.accuracy for t, score in sorted(result.per_task.items())}
    return result.average


class Validate(Callback):
    """At each epoch end: validation accuracy, the run's history and its best epoch.

    In a stage that trains under another rule than ``cfg.eval_rule`` (LIVR's bottleneck stage), the
    accuracy under the stage's own rule is recorded too (``stage_rule_accuracy``): it is what that
    stage teaches (answering through the latents alone), and the standard-rule accuracy of a model
    that has never answered with the image in view says little about it. It does not select checkpoints.
    """

    def on_epoch_end(self, run):
        state, stage = run.state, run.stage
        own_rule = None
        if stage.rule != run.cfg.eval_rule:
            own_rule = validation_accuracy(run, rule=stage.rule)
        run.val_per_task = None
        val = validation_accuracy(run)
        run.handle.set_rule(stage.rule)
        per_task = run.val_per_task
        state.history.append({"epoch": run.epoch, "stage": stage.name, "global_step": state.global_step,
                              "val_accuracy": val, "val_per_task": per_task, "rule": stage.rule,
                              "stage_rule_accuracy": own_rule})
        run.is_best = val is not None and (state.best_metric is None or val > state.best_metric)
        if run.is_best:
            state.best_metric, state.best_step = val, state.global_step
        run.val_metric = val
        if run.accelerator.is_main_process:
            shown = "n/a" if val is None else f"{100 * val:.1f}%"
            if per_task and len(per_task) > 1:
                shown += " (" + ", ".join(f"{t} {100 * a:.1f}%" for t, a in per_task.items()) + ")"
            if own_rule is not None:
                shown += f"; with the {stage.rule} rule it trains under {100 * own_rule:.1f}%"
            print(f"{stage.name} epoch {run.epoch_in_stage + 1}/{stage.epochs}: validation accuracy {shown}", flush=True)


class Checkpoint(Callback):
    """Checkpoints every ``save_steps`` steps and where ``max_steps`` stops the run (resumable), and
    at each epoch end (after ``Validate``, whose result selects the checkpoint to evaluate)."""

    def on_step_end(self, run, info):
        cfg = run.cfg
        periodic = cfg.save_steps and run.state.global_step % cfg.save_steps == 0
        if not run.at_epoch_end and (run.hit_max_steps or periodic):
            # Selected only by multi-task runs (they keep the last one); a single-task run selects by
            # validation accuracy, which only epoch ends have.
            self._save(run, None, select=not run.single_task)

    def on_epoch_end(self, run):
        val = run.val_metric
        self._save(run, val, select=(not run.single_task) or val is None or run.is_best)

    @staticmethod
    def _save(run, val, select):
        save_training_checkpoint(run.accelerator, run.cfg, run.model, run.optimizer, run.scheduler, run.state,
                                 run.latent_ids, run.stage, val, select=select)


def default_callbacks(step_callback: Optional[Callable[[StepInfo], None]] = None) -> List[Callback]:
    """The loop's standard list: progress bar, the caller's step function, validation, checkpoints."""
    callbacks: List[Callback] = [ProgressBar()]
    if step_callback is not None:
        callbacks.append(StepFunction(step_callback))
    return callbacks + [Validate(), Checkpoint()]
