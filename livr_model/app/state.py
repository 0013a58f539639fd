"""Run state: the on-disk layout of a run, saving a checkpoint, and exact resume.

A run's output directory holds

    run_config.yaml / run_config.json   the TrainConfig that produced it
    checkpoints/step-00000040/          one directory per save
        adapter_model.safetensors       LoRA weights (peft's own key names)
        adapter_config.json             the peft LoraConfig
        latents.safetensors             the K latent embedding rows and their token ids
        tokenizer_additions.json        the latent token strings and ids
        run_config.json                 the run's config (so a checkpoint stands alone)
        training_state.pt               optimizer, scheduler, data position, best metric
        rng_state_rank{R}.pt            python/numpy/torch RNG of process R
        info.json                       step, epoch, stage, validation metric
    latest.json                         pointer to the newest complete checkpoint (resume)
    selected.json                       pointer to the checkpoint to evaluate: best validation
                                        accuracy for a single-task run, the last one otherwise

Every file is written to a temporary name, fsynced and renamed; a checkpoint directory is
assembled under a temporary name and renamed into place only when complete, and the pointers
are updated after that, so a crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from peft import get_peft_model_state_dict

from livr_model.latents import DELTA_PARAMETER, STATE_EMBEDDINGS, STATE_TOKEN_IDS, latent_state_dict, latent_token_strings

from .config import RESUME_KEYS, TrainConfig
from .files import (TMP_SUFFIX, fsync_dir, atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, atomic_write_json,
                    atomic_write_text, torch_load)

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest.json"
SELECTED_POINTER = "selected.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LATENT_WEIGHTS = "latents.safetensors"
TOKENIZER_ADDITIONS = "tokenizer_additions.json"
RUN_CONFIG_JSON = "run_config.json"
RUN_CONFIG_YAML = "run_config.yaml"
TRAINING_STATE = "training_state.pt"
RNG_STATE_TEMPLATE = "rng_state_rank{rank}.pt"
INFO = "info.json"
STEP_DIR_TEMPLATE = "step-{step:08d}"
OLD_SUFFIX = ".old"
# Each process stages its RNG state here until the main process assembles the checkpoint.
RNG_STAGING_DIR = "rng-staging"


def get_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class ResumeState:
    """Where a run stands, enough to continue it exactly.

    ``epoch`` counts epochs over the whole run (stage 2's first epoch follows stage 1's last);
    ``batch_in_epoch`` is the number of optimizer steps already taken inside that epoch. The data
    order of an epoch is a pure function of (seed, epoch), so these two integers pin it down.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResumeState":
        return cls(
            global_step=int(d["global_step"]),
            epoch=int(d["epoch"]),
            batch_in_epoch=int(d["batch_in_epoch"]),
            best_metric=d.get("best_metric"),
            best_step=d.get("best_step"),
            history=list(d.get("history", [])),
        )


def checkpoint_dir_name(step: int) -> str:
    return STEP_DIR_TEMPLATE.format(step=step)


def write_checkpoint_dir(final_dir, files: Mapping[str, Any]) -> Path:
    """Assemble a checkpoint directory atomically.

    ``files`` maps a file name to bytes, str, or a callable that writes that file given its path.
    Everything is written into ``<final_dir>.tmp`` and the directory is renamed into place at the
    end; an existing directory of the same name is replaced (moved aside first, then deleted).
    """
    final_dir = Path(final_dir)
    tmp_dir = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    for name, content in files.items():
        target = tmp_dir / name
        if callable(content):
            content(target)
        elif isinstance(content, bytes):
            atomic_write_bytes(target, content)
        elif isinstance(content, str):
            atomic_write_text(target, content)
        else:
            raise ValueError(f"files[{name!r}] must be bytes, str or a callable writer; got {type(content).__name__}")
    fsync_dir(tmp_dir)
    old_dir = final_dir.with_name(final_dir.name + OLD_SUFFIX)
    if final_dir.exists():
        if old_dir.exists():
            shutil.rmtree(old_dir)
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old_dir.exists():
        shutil.rmtree(old_dir)
    return final_dir


def write_pointer(output_dir, pointer_name: str, checkpoint_dir, extra: Optional[dict] = None) -> Path:
    output_dir = Path(output_dir)
    rel = os.path.relpath(Path(checkpoint_dir), output_dir)
    payload = {"path": rel}
    payload.update(extra or {})
    return atomic_write_json(output_dir / pointer_name, payload)


def read_pointer(output_dir, pointer_name: str) -> Optional[Path]:
    pointer = Path(output_dir) / pointer_name
    if not pointer.is_file():
        return None
    rel = json.loads(pointer.read_text())["path"]
    path = Path(output_dir) / rel
    return path if path.is_dir() else None


def resolve_checkpoint(path, prefer: str = SELECTED_POINTER) -> Path:
    """A checkpoint directory from either itself or a run's output directory.

    For an output directory the ``prefer`` pointer is followed (``selected.json`` by default, the
    checkpoint to evaluate; ``latest.json`` for resuming), falling back to the other pointer.
    """
    path = Path(path)
    if (path / INFO).is_file():
        return path
    for name in (prefer, LATEST_POINTER, SELECTED_POINTER):
        found = read_pointer(path, name)
        if found is not None:
            return found
    raise ValueError(
        f"checkpoint: {str(path)!r} is neither a checkpoint directory (no {INFO}) nor a run output "
        f"directory with {SELECTED_POINTER} or {LATEST_POINTER}"
    )


def list_checkpoints(output_dir) -> list:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / INFO).is_file() and not d.name.endswith((TMP_SUFFIX, OLD_SUFFIX))]
    return sorted(dirs, key=lambda d: json.loads((d / INFO).read_text())["global_step"])


def prune_checkpoints(output_dir, keep_last: int, protect=()) -> list:
    """Delete all but the newest ``keep_last`` checkpoints, never those in ``protect``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1; got {keep_last}")
    protect = {Path(p).resolve() for p in protect if p is not None}
    ckpts = list_checkpoints(output_dir)
    removed = []
    for d in ckpts[:-keep_last]:
        if d.resolve() in protect:
            continue
        shutil.rmtree(d)
        removed.append(d)
    return removed


def read_info(checkpoint_dir) -> dict:
    return json.loads((Path(checkpoint_dir) / INFO).read_text())


def is_fsdp(accelerator) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def unwrap(accelerator, model):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def trainable_state_dict(model) -> dict:
    """Every trainable tensor by name (LoRA and the latent-row offset): the exact state to resume."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _trained_tensors(accelerator, model, latent_ids) -> tuple:
    """(peft adapter state, every trainable tensor by name, latent rows) on CPU.

    Under FSDP the full state dict is gathered first (a collective: every process calls this)."""
    unwrapped = unwrap(accelerator, model)
    if not is_fsdp(accelerator):
        rows = latent_state_dict(unwrapped, list(latent_ids)) if latent_ids else None
        return get_peft_model_state_dict(unwrapped), trainable_state_dict(unwrapped), rows
    full = accelerator.get_state_dict(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    trainable = {n: full[n].detach().cpu().clone() for n in names if n in full}
    rows = None
    if latent_ids:
        delta_key = next(k for k in full if k.endswith(DELTA_PARAMETER))
        weight = full[delta_key[: -len(DELTA_PARAMETER)] + "weight"]
        ids = torch.tensor(list(latent_ids))
        rows = {STATE_EMBEDDINGS: (weight[ids].float() + full[delta_key].float()).cpu(), STATE_TOKEN_IDS: ids}
    return get_peft_model_state_dict(unwrapped, state_dict=full), trainable, rows


def save_training_checkpoint(accelerator, cfg: TrainConfig, model, optimizer, scheduler, state: ResumeState,
                             latent_ids, stage, val_metric: Optional[float], select: bool) -> Path:
    """Write one checkpoint: every process stages its RNG state, the main process assembles the
    directory (atomically) and moves the pointers. ``output_dir`` must be shared by all processes."""
    output_dir = Path(cfg.output_dir)
    final_dir = output_dir / CHECKPOINTS_DIR / checkpoint_dir_name(state.global_step)
    staging = output_dir / CHECKPOINTS_DIR / RNG_STAGING_DIR
    rng_name = RNG_STATE_TEMPLATE.format(rank=accelerator.process_index)
    atomic_torch_save(staging / rng_name, get_rng_state())
    adapter, trainable, latent_rows = _trained_tensors(accelerator, model, latent_ids)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = unwrap(accelerator, model)
        peft_config = unwrapped.peft_config["default"].to_dict()
        peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
        training_state = {
            "trainable": trainable,
            # FSDP shards the optimizer state; a rank-0 copy could not resume the run (see load_resume).
            "optimizer": None if is_fsdp(accelerator) else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "resume": state.to_dict(),
            "world_size": accelerator.num_processes,
        }
        info = {
            "global_step": state.global_step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "stage": stage.name, "rule": stage.rule, "val_accuracy": val_metric, "mode": cfg.mode,
        }
        files = {
            ADAPTER_WEIGHTS: lambda p: atomic_save_safetensors(p, adapter, {"format": "pt"}),
            ADAPTER_CONFIG: json.dumps(peft_config, indent=2, sort_keys=True, default=str) + "\n",
            RUN_CONFIG_JSON: json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n",
            TRAINING_STATE: lambda p: atomic_torch_save(p, training_state),
            INFO: json.dumps(info, indent=2) + "\n",
        }
        if latent_rows is not None:
            files[LATENT_WEIGHTS] = lambda p: atomic_save_safetensors(p, latent_rows)
        if cfg.mode_spec.new_latents:
            files[TOKENIZER_ADDITIONS] = json.dumps(
                {"tokens": latent_token_strings(len(latent_ids)), "ids": list(latent_ids)}, indent=2) + "\n"
        for rank in range(accelerator.num_processes):
            staged = staging / RNG_STATE_TEMPLATE.format(rank=rank)
            files[staged.name] = lambda p, staged=staged: atomic_write_bytes(p, staged.read_bytes())
        write_checkpoint_dir(final_dir, files)
        shutil.rmtree(staging, ignore_errors=True)
        write_pointer(output_dir, LATEST_POINTER, final_dir, {"global_step": state.global_step})
        if select:
            write_pointer(output_dir, SELECTED_POINTER, final_dir,
                               {"global_step": state.global_step, "val_accuracy": val_metric})
        prune_checkpoints(output_dir, cfg.keep_checkpoints,
                               protect=[read_pointer(output_dir, SELECTED_POINTER), final_dir])
    accelerator.wait_for_everyone()
    return final_dir


def load_resume(accelerator, cfg: TrainConfig, model, optimizer, scheduler) -> Optional[ResumeState]:
    latest = read_pointer(cfg.output_dir, LATEST_POINTER)
    if latest is None:
        if accelerator.is_main_process:
            print(f"--resume: no checkpoint in {cfg.output_dir}; starting a new run", flush=True)
        return None
    saved = json.loads((latest / RUN_CONFIG_JSON).read_text())
    current = cfg.to_dict()
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(
            f"--resume: the run in {cfg.output_dir} was made with different settings for {diffs} "
            f"(saved {[saved.get(k) for k in diffs]}, now {[current.get(k) for k in diffs]}); an exact resume needs the same ones"
        )
    training = torch_load(latest / TRAINING_STATE)
    if is_fsdp(accelerator) or training["optimizer"] is None:
        raise ValueError(
            "--resume: exact resume (optimizer state included) is supported for single-process and DDP runs, not FSDP; "
            f"the checkpoints in {cfg.output_dir} still hold the adapter and latent rows for evaluation"
        )
    if training["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"--resume: the checkpoint was written by {training['world_size']} processes, this run has "
            f"{accelerator.num_processes}; the data order per process would differ"
        )
    unwrapped = unwrap(accelerator, model)
    params = dict(unwrapped.named_parameters())
    missing = sorted(set(training["trainable"]) - set(params))
    if missing:
        raise ValueError(f"--resume: the checkpoint holds trainable tensors this model lacks: {missing[:5]}")
    with torch.no_grad():
        # The exact tensors, not the exported adapter: bit-identical continuation.
        for name, value in training["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    set_rng_state(torch_load(latest / RNG_STATE_TEMPLATE.format(rank=accelerator.process_index)))
    state = ResumeState.from_dict(training["resume"])
    if accelerator.is_main_process:
        print(f"resuming from {latest} (step {state.global_step}, epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)
    return state


