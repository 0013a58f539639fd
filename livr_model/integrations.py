"""LIVR inside the trainers people already use: TRL's ``SFTTrainer`` and transformers' ``Trainer``.

* ``LivrCollator``: dataset rows (TRL conversational, TRL prompt/completion, livr JSONL; see
  ``livr_model.rows``) -> a padded batch with the mode's latents placed, labels on the answer
  only, and ``segment_ids``. It encodes through ``livr_model.prompts``, the same path as livr-train.
* ``LivrStageCallback``: the mode's stage plan inside one ``Trainer.train()``: the rule switch at
  the stage boundary, a fresh warmup + cosine schedule and reset optimizer state for stage 2, the
  stage in the logs, the guards against silent mistakes, and the files ``livr-eval`` reads
  written into every checkpoint the trainer saves (``RUN_FILES``).

transformers' callback API loads accelerate and peft, so ``livr_model`` imports this module only
when one of its names is asked for; TRL itself is never imported here.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save as save_safetensors
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from livr_kernels import Segment

from .archs import tokenizer_of
from .atomic import atomic_write_bytes
from .latents import HANDLE_ATTRIBUTE, _peft_token_layer, latent_state_dict, latent_token_strings
from .lr import WARMUP_OFFSET, warmup_cosine
from .modes import LATENTS_NONE, TRAIN_LATENT_ROWS, get_mode
from .patch import STATE_KWARG, LivrAttentionHandle
from .prompts import PromptEncoder, vocabulary_latent_ids
from .segment_ids import IGNORE_INDEX

logger = logging.getLogger(__name__)

# The files a TRL / Trainer checkpoint directory holds for livr-eval, besides peft's adapter
# (adapter_model.safetensors, adapter_config.json) that the trainer writes itself.
RUN_FILE = "livr_run.json"
LATENT_WEIGHTS = "latents.safetensors"
TOKENIZER_ADDITIONS = "tokenizer_additions.json"
RUN_FILES = (RUN_FILE, LATENT_WEIGHTS, TOKENIZER_ADDITIONS)  # the last two only for modes with new latents
RUN_FORMAT = 1
STAGE_LOG_KEY = "livr_stage"
EVAL_RULE = "standard"


class LivrCollator:
    """A data collator for ``SFTTrainer(data_collator=...)`` and ``Trainer(data_collator=...)``.

    ``processor``: the model's processor (with the latent tokens added, see ``add_latent_tokens``).
    ``latent_token_ids``: the K latent ids (modes that add new latents). ``mode``: a name from
    ``livr_model.modes``; ``livr`` puts the latents at the end of the last user turn, right before
    the assistant turn. ``num_latents``: K for ``mask-only`` (the last K text tokens of the user
    turn are marked LATENT). ``max_length``: rows longer than this are an error (never truncated:
    truncation would cut image tokens or the answer). ``image_root``: folder for image paths.
    ``packing=True`` packs the batch's rows into rows of at most ``max_length`` tokens
    (``livr_model.packing``; ``model`` gives the rotary positions each sample restarts), and adds
    ``doc_ids`` (no token attends across samples) and ``position_ids``.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 except on the answer and its
    end-of-turn token), the vision tensors (``pixel_values``, ``image_grid_thw``), ``mm_token_type_ids``
    when the processor lists it as a model input, and ``segment_ids`` (``return_segment_ids``).
    """

    def __init__(self, processor, latent_token_ids: Sequence[int] = (), mode="livr", max_length: Optional[int] = None, *,
                 num_latents: Optional[int] = None, image_token_ids: Optional[Sequence[int]] = None, image_root=None,
                 return_segment_ids: bool = True, packing: bool = False, model=None):
        spec = get_mode(mode)
        if not isinstance(packing, bool):
            raise ValueError(f"packing must be True or False; got {packing!r}")
        if packing and model is None:
            raise ValueError("packing=True needs model= (the model, or its config): packed samples restart their "
                             "rotary positions, which the model's own position rule computes")
        latent_ids = tuple(int(i) for i in (latent_token_ids.tolist() if torch.is_tensor(latent_token_ids) else latent_token_ids))
        tokenizer = tokenizer_of(processor)
        if tokenizer.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set processor.tokenizer.pad_token (e.g. to its eos token)")
        if image_token_ids is None:
            image_token_ids = [getattr(processor, name) for name in ("image_token_id", "video_token_id")
                               if isinstance(getattr(processor, name, None), int)]
            if not image_token_ids:
                raise ValueError(f"{type(processor).__name__} names no image_token_id; pass image_token_ids=[...]")
        image_token_ids = tuple(int(i) for i in image_token_ids)
        latent_text = ""
        if spec.new_latents:
            if not latent_ids:
                raise ValueError(f"mode {spec.name!r} needs latent_token_ids (the ids add_latent_tokens returned)")
            latent_text = "".join(tokenizer.convert_ids_to_tokens(list(latent_ids)))
            added = set(tokenizer.get_added_vocab().values()) - set(image_token_ids)
            if not set(latent_ids) <= added or tokenizer(latent_text, add_special_tokens=False)["input_ids"] != list(latent_ids):
                raise ValueError(f"latent_token_ids {list(latent_ids)} are not latent tokens added to this processor's tokenizer; "
                                 "pass the ids add_latent_tokens(model, processor, k) returned for this processor")
        elif latent_ids:
            raise ValueError(f"mode {spec.name!r} adds no latent tokens; pass latent_token_ids=() "
                             f"(got {list(latent_ids)})")
        vocab_ids = ()
        if spec.vocab_latents:
            if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 1:
                raise ValueError(f"mode {spec.name!r} appends K existing vocabulary tokens as its latents: pass num_latents=K")
            vocab_ids = tuple(vocabulary_latent_ids(processor, num_latents))
        self.encoder = PromptEncoder(processor=processor, mode=spec.name, latent_text=latent_text,
                                     latent_token_ids=latent_ids, image_token_ids=image_token_ids,
                                     vocab_latent_ids=vocab_ids, max_length=max_length)
        # The embedding rows this mode's latents use (train them, e.g. LoraConfig(trainable_token_indices=...)).
        self.latent_rows = tuple(latent_ids) if spec.new_latents else vocab_ids
        self.mode = spec.name
        self.image_root = image_root
        self.return_segment_ids = return_segment_ids
        self.keep_token_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
        self.packing = packing
        self.max_length = max_length
        self.model = model

    def encode(self, rows: Sequence[dict]) -> list:
        encoded = []
        for index, row in enumerate(rows):
            if isinstance(row, dict) and not row:
                raise ValueError(f"batch row {index} is empty: with transformers' Trainer set "
                                 "TrainingArguments(remove_unused_columns=False) so the dataset's columns reach the collator")
            encoded.append(self.encoder.encode_row(row, image_root=self.image_root, what=f"batch row {index}"))
        return encoded

    def __call__(self, rows: Sequence[dict]) -> dict:
        if not rows:
            raise ValueError("the collator got an empty batch")
        if self.packing:
            batch, labels, segment_ids = self.encoder.collate_packed(self.encode(rows), self.max_length, self.model)
        else:
            batch, labels, segment_ids = self.encoder.collate(self.encode(rows), padding_side="right")
        if not self.keep_token_types:
            batch.pop("mm_token_type_ids", None)
        batch["labels"] = labels
        if self.return_segment_ids:
            batch["segment_ids"] = segment_ids
        return batch


def stage_lr_factor(step: int, boundary: int, total: int, warmups: Sequence[int], stage2_scale: float = 1.0) -> float:
    """LR factor of optimizer step ``step``: stage 1 is ``[0, boundary)``, stage 2 ``[boundary, total)``;
    each has a linear warmup over its ``warmups[i]`` steps, then a cosine decay to 0. Stage 2 peaks
    at ``stage2_scale``."""
    if step < boundary or boundary >= total:
        return warmup_cosine(step, boundary, warmups[0], warmup_extra=WARMUP_OFFSET)
    return stage2_scale * warmup_cosine(step - boundary, total - boundary, warmups[1], warmup_extra=WARMUP_OFFSET)


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def latent_rows_trainable(model, latent_token_ids: Sequence[int]) -> bool:
    """Whether the optimizer can move the latent rows: peft's trainable_token_indices, livr's
    ``restrict_embedding_grad``, or a trainable embedding matrix."""
    embedding = model.get_input_embeddings()
    ids = set(int(i) for i in latent_token_ids)
    peft_layer = _peft_token_layer(embedding)
    if peft_layer is not None:
        layer, adapter = peft_layer
        return ids <= set(layer.token_indices[adapter]) and layer.trainable_tokens_delta[adapter].requires_grad
    rows = getattr(embedding, HANDLE_ATTRIBUTE, None)
    if rows is not None:
        return ids <= set(rows.token_ids) and rows.delta.requires_grad
    return bool(getattr(embedding, "weight", None) is not None and embedding.weight.requires_grad)


class BatchGuard:
    """A forward pre-hook, after the patch's own: stops a training batch that runs under a rule
    hiding the image with no LATENT token in a row that has image tokens (nothing could carry the
    image to the answer), and warns once when labels cover image tokens or tokens before the latents."""

    def __init__(self, handle: LivrAttentionHandle, mode: str):
        self.mode = get_mode(mode)
        self.warned = False
        self._hook = handle.model.register_forward_pre_hook(self, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()

    def __call__(self, module, args, kwargs):
        state = kwargs.get(STATE_KWARG)
        if state is None or not module.training or not torch.is_grad_enabled():
            return None
        kinds = state.layout.segment_ids
        image, latent = kinds == int(Segment.IMAGE), kinds == int(Segment.LATENT)
        hides_image = not state.rule.allows(Segment.ANSWER, Segment.IMAGE)
        stranded = image.any(1) & ~latent.any(1)
        if hides_image and bool(stranded.any()):
            rows = stranded.nonzero().flatten().tolist()
            raise ValueError(
                f"rule {state.rule.name!r} hides the image from the answer, but batch rows {rows} hold image tokens and no "
                "LATENT token, so nothing carries the image to the answer. Put the latents in the prompt: use "
                "livr_model.LivrCollator(processor, latent_token_ids=ids), or append the latent token strings to the last "
                "user turn's text; or train this mode under the 'standard' rule"
            )
        labels = kwargs.get("labels")
        if self.warned or self.mode.latents == LATENTS_NONE or labels is None or labels.shape != kinds.shape:
            return None
        supervised = labels.to(kinds.device) != IGNORE_INDEX
        positions = torch.arange(kinds.shape[1], device=kinds.device)
        last_latent = torch.where(latent, positions, -1).amax(1, keepdim=True)
        wrong = supervised & (image | latent | (positions < last_latent))
        if bool(wrong.any()):
            self.warned = True
            warnings.warn(
                f"labels cover {int(wrong.sum())} image, latent or prompt token(s) under mode {self.mode.name!r}: the loss "
                "trains on the prompt and those tokens count as ANSWER for the mask. Label only the answer (-100 "
                "elsewhere): use livr_model.LivrCollator, or TRL's prompt/completion rows with completion_only_loss",
                stacklevel=2,
            )
        return None


class LivrStageCallback(TrainerCallback):
    """The mode's stage plan inside one ``Trainer.train()`` (``SFTTrainer`` included).

    ``handle``: what ``patch_attention`` returned. ``stage_epochs``: (E1, E2); the trainer's
    ``num_train_epochs`` must be E1 + E2. ``mode``: the stage plan and guards come from
    ``livr_model.modes`` (``livr``: bottleneck for E1 epochs, then standard).

    ``restart_schedule=True`` (as livr-train) replaces the trainer's LR schedule by a linear warmup
    (``warmup_steps`` of the arguments, a ratio when below 1, taken per stage) and a cosine decay to
    0 in each stage, and clears the optimizer state (AdamW moments) when stage 2 starts.
    ``stage2_lr_scale``: stage 2's peak as a factor of stage 1's (livr-train's ``--stage2-lr`` over
    ``--lr``; the demo uses 0.25: at the full rate the standard-mask stage erased the latent route
    in 3 of 11 seeds); needs ``restart_schedule=True``.
    ``base_model``: the base model's hub id or folder, recorded for livr-eval (default: the
    model's ``name_or_path``); ``num_latents``: K of ``mask-only`` (else the latent ids count).
    ``guards``: the checks of ``BatchGuard`` and ``latent_rows_trainable``.

    At every save the checkpoint directory gets ``RUN_FILES``; the stage number is logged as
    ``livr_stage``.
    """

    def __init__(self, handle: LivrAttentionHandle, stage_epochs=(4, 6), restart_schedule: bool = True, *, mode="livr",
                 base_model: Optional[str] = None, num_latents: Optional[int] = None, guards: bool = True,
                 stage2_lr_scale: float = 1.0):
        if not isinstance(handle, LivrAttentionHandle):
            raise ValueError(f"handle must be what patch_attention returned; got {type(handle).__name__}")
        epochs = tuple(stage_epochs)
        if len(epochs) != 2 or any(not isinstance(e, int) or e < 0 for e in epochs) or sum(epochs) == 0:
            raise ValueError(f"stage_epochs must be two non-negative ints, not both 0; got {stage_epochs!r}")
        self.handle = handle
        self.mode = get_mode(mode)
        if self.mode.vocab_latents and not (isinstance(num_latents, int) and num_latents > 0):
            raise ValueError(f"mode {self.mode.name!r} appends K vocabulary tokens as latents: pass num_latents=K (as to LivrCollator)")
        if (isinstance(stage2_lr_scale, bool) or not isinstance(stage2_lr_scale, (int, float))
                or not 0 < stage2_lr_scale < math.inf):
            raise ValueError(f"stage2_lr_scale must be a finite number > 0; got {stage2_lr_scale!r}")
        if stage2_lr_scale != 1.0 and not restart_schedule:
            raise ValueError("stage2_lr_scale needs restart_schedule=True (the trainer's own schedule knows no stages)")
        self.stages = self.mode.stage_plan(epochs)
        self.stage_epochs = epochs
        self.stage2_lr_scale = float(stage2_lr_scale)
        self.num_latents = num_latents
        self.restart_schedule = restart_schedule
        self.base_model = base_model
        self.guards = guards
        self.boundary = None
        self.total_steps = None
        self.stage_index = 0
        self._guard = None

    @property
    def stage(self):
        return self.stages[self.stage_index]

    def _stage_at(self, step: int) -> int:
        return int(len(self.stages) > 1 and step >= self.boundary)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, train_dataloader=None, **kwargs):
        total_epochs = sum(s.epochs for s in self.stages)
        if args.max_steps <= 0 and args.num_train_epochs != total_epochs:
            raise ValueError(f"num_train_epochs is {args.num_train_epochs} but the stages of mode {self.mode.name!r} take "
                             f"{total_epochs} epochs ({', '.join(f'{s.name} {s.epochs}' for s in self.stages)}); "
                             f"set num_train_epochs={total_epochs}")
        if not hasattr(train_dataloader, "__len__"):
            raise ValueError("LivrStageCallback places the stage boundary by epochs; the training data must have a length "
                             "(a datasets.Dataset or a list, not an IterableDataset)")
        batches = len(train_dataloader)
        per_epoch = max(1, batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0))
        self.total_steps = int(state.max_steps)
        self.boundary = min(self.stages[0].epochs * per_epoch, self.total_steps)
        # The stage of the last step taken: a run resumed exactly at the boundary switches (and resets
        # the optimizer) in on_step_begin, as the uninterrupted run did.
        self.stage_index = self._stage_at(state.global_step - 1) if state.global_step > 0 else 0
        self.handle.set_rule(self.stage.rule)
        if self.restart_schedule:
            self._install_schedule(args, optimizer, lr_scheduler, state.global_step)
        if self.guards:
            self.on_train_end(args, state, control)
            self._guard = BatchGuard(self.handle, self.mode.name)
            if TRAIN_LATENT_ROWS in self.mode.trains and not latent_rows_trainable(self.handle.model, self.handle.latent_token_ids):
                warnings.warn(
                    f"the latent rows {list(self.handle.latent_token_ids)} are not trainable: mode {self.mode.name!r} needs "
                    "them to learn. Add LoraConfig(trainable_token_indices=latent_ids) (or peft_config= for SFTTrainer), "
                    "or call livr_model.latents.restrict_embedding_grad(model, latent_ids) after get_peft_model",
                    stacklevel=2,
                )
        if self._base_model(model) is None:
            warnings.warn("the base model has no name_or_path: livr-eval cannot reload this run; pass "
                          "LivrStageCallback(..., base_model='<hub id or folder>')", stacklevel=2)
        logger.info("livr: %s (rule %s) from step %d; stage boundary at step %d of %d",
                    self.stage.name, self.stage.rule, state.global_step, self.boundary, self.total_steps)

    def _install_schedule(self, args, optimizer, lr_scheduler, step: int) -> None:
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"restart_schedule=True rewrites the trainer's LambdaLR schedule; this trainer has "
                             f"{type(lr_scheduler).__name__}. Pass restart_schedule=False to keep it")
        boundary, total = self.boundary, self.total_steps
        warmups = [args.get_warmup_steps(boundary), args.get_warmup_steps(max(0, total - boundary))]

        def factor(current: int) -> float:
            return stage_lr_factor(current, boundary, total, warmups, self.stage2_lr_scale)

        lr_scheduler.lr_lambdas = [factor] * len(lr_scheduler.lr_lambdas)
        last = [base * factor(step) for base in lr_scheduler.base_lrs]
        for group, lr in zip(optimizer.param_groups, last):
            group["lr"] = lr
        lr_scheduler._last_lr = last

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        index = self._stage_at(state.global_step)
        if index == self.stage_index:
            return
        self.stage_index = index
        self.handle.set_rule(self.stage.rule)
        if self.restart_schedule:
            # Fresh AdamW moments for the new stage; the optimizer re-creates them on its next step.
            getattr(optimizer, "optimizer", optimizer).state.clear()
        logger.info("livr: %s starts at step %d (rule %s)", self.stage.name, state.global_step, self.stage.rule)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs[STAGE_LOG_KEY] = self.stage_index + 1
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][STAGE_LOG_KEY] = self.stage_index + 1

    def on_train_end(self, args, state, control, **kwargs):
        if self._guard is not None:
            self._guard.remove()
            self._guard = None

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.write_run_files(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", model, state.global_step)

    def _base_model(self, model) -> Optional[str]:
        if self.base_model:
            return str(self.base_model)
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:
            name = next(iter(peft_config.values())).base_model_name_or_path
            if name:
                return str(name)
        return getattr(self.handle.model.config, "_name_or_path", None) or None

    def write_run_files(self, directory, model=None, step: Optional[int] = None) -> Path:
        """Write ``RUN_FILES`` into ``directory`` (a checkpoint the trainer saved, or the folder of
        ``trainer.save_model()``): what livr-eval needs besides the adapter."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        latent_ids = list(self.handle.latent_token_ids)
        if self.mode.new_latents and latent_ids:
            rows = latent_state_dict(self.handle.model, latent_ids)
            atomic_write_bytes(directory / LATENT_WEIGHTS, save_safetensors(rows))
            _write_json(directory / TOKENIZER_ADDITIONS, {"tokens": latent_token_strings(len(latent_ids)), "ids": latent_ids})
        _write_json(directory / RUN_FILE, {
            "format": RUN_FORMAT,
            "base_model": self._base_model(model),
            "mode": self.mode.name,
            "num_latents": self.num_latents or len(latent_ids),
            "stage_epochs": list(self.stage_epochs),
            "stage": self.stage.name,
            "rule": self.stage.rule,
            "eval_rule": EVAL_RULE,
            "global_step": step,
        })
        return directory
