"""Run state: saving a training checkpoint and exact resume (the on-disk layout, pointers and
pruning are in ``checkpoints.py``).

``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled objects (a planted file is refused, not run). RNG states are stored as
tensors and plain values for that reason.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from peft import get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from livr_model.latents import DELTA_PARAMETER, STATE_EMBEDDINGS, STATE_TOKEN_IDS, latent_state_dict, latent_token_strings

from .checkpoints import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS_DIR, INFO, LATENT_WEIGHTS, LATEST_POINTER,
                          RNG_STATE_TEMPLATE, RUN_CONFIG_JSON, TOKENIZER_ADDITIONS, TRAINING_STATE, checkpoint_dir_name,
                          prune_checkpoints, read_pointer, require_complete, write_checkpoint_dir, write_pointer,
                          write_selected_pointer)
from .config import RESUME_KEYS, TrainConfig
from .files import atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, torch_load

# Each process stages its RNG state here until the main process assembles the checkpoint.
RNG_STAGING_DIR = "rng-staging"


def get_rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["algorithm"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached_gaussian"]))
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
    # Step of the checkpoint to evaluate (selected.json's target), committed with every checkpoint.
    selected_step: Optional[int] = None
    # Content hashes of the training and validation data (``dataset_fingerprint``), checked on resume.
    data_fingerprints: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": list(self.history),
            "selected_step": self.selected_step,
            "data_fingerprints": dict(self.data_fingerprints),
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
            selected_step=d.get("selected_step"),
            data_fingerprints=dict(d.get("data_fingerprints", {})),
        )


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
    if not accelerator.is_main_process:
        # The full state dict is gathered onto the main process only; the others write nothing.
        return {}, {}, None
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    trainable = {n: full[n].detach().cpu().clone() for n in names if n in full}
    rows = None
    if latent_ids:
        delta_key = next(k for k in full if k.endswith(DELTA_PARAMETER))
        weight = full[delta_key[: -len(DELTA_PARAMETER)] + "weight"]
        ids = torch.tensor(list(latent_ids))
        rows = {STATE_EMBEDDINGS: (weight[ids].float() + full[delta_key].float()).cpu(), STATE_TOKEN_IDS: ids}
    return get_peft_model_state_dict(unwrapped, state_dict=full), trainable, rows


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimizer state to save; under FSDP the shards gathered into one full state keyed by
    parameter name (a collective: every process calls this; the main process gets the result)."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, _inner_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
    optimizer_state = _optimizer_state(accelerator, model, optimizer)
    accelerator.wait_for_everyone()
    if select:
        state.selected_step = state.global_step
    if accelerator.is_main_process:
        unwrapped = unwrap(accelerator, model)
        peft_config = unwrapped.peft_config["default"].to_dict()
        peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
        training_state = {
            "trainable": trainable,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "resume": state.to_dict(),
            "world_size": accelerator.num_processes,
        }
        info = {
            "global_step": state.global_step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "stage": stage.name, "rule": stage.rule, "val_accuracy": val_metric, "mode": cfg.mode,
            "selected_step": state.selected_step,
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
        # The commit point: from here on this checkpoint, and the selection its info.json records, hold.
        write_pointer(output_dir, LATEST_POINTER, final_dir, {"global_step": state.global_step})
        selected = write_selected_pointer(output_dir)
        prune_checkpoints(output_dir, cfg.keep_checkpoints, protect=[selected, final_dir])
    accelerator.wait_for_everyone()
    return final_dir


def load_resume(accelerator, cfg: TrainConfig, model, optimizer, scheduler,
                data_fingerprints: Optional[Mapping[str, str]] = None) -> Optional[ResumeState]:
    """The state of the run in ``cfg.output_dir`` loaded into model, optimizer and scheduler, or
    None when it has no checkpoint yet. Refuses changed settings and, when ``data_fingerprints``
    are given, changed data."""
    latest = read_pointer(cfg.output_dir, LATEST_POINTER)
    pointer = Path(cfg.output_dir) / LATEST_POINTER
    if latest is None and pointer.is_file():
        # Starting over here would silently drop the run the pointer commits.
        raise ValueError(f"--resume: {str(pointer)!r} names {json.loads(pointer.read_text())['path']!r}, which is "
                         "missing (deleted or moved); put it back, or start over with --overwrite instead of --resume")
    if latest is None:
        if accelerator.is_main_process:
            print(f"--resume: no checkpoint in {cfg.output_dir}; starting a new run", flush=True)
        return None
    require_complete(latest)
    saved = json.loads((latest / RUN_CONFIG_JSON).read_text())
    current = cfg.to_dict()
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(
            f"--resume: the run in {cfg.output_dir} was made with different settings for {diffs} "
            f"(saved {[saved.get(k) for k in diffs]}, now {[current.get(k) for k in diffs]}); an exact resume needs the same ones"
        )
    training = torch_load(latest / TRAINING_STATE)
    saved_data = training["resume"].get("data_fingerprints", {})
    if data_fingerprints and not saved_data:
        raise ValueError(f"--resume: the checkpoint {str(latest)!r} records no data fingerprint (an older livr wrote it), "
                         "so livr cannot check that the data are the same; start a new run")
    for name, fingerprint in (data_fingerprints or {}).items():
        if saved_data.get(name) != fingerprint:
            raise ValueError(
                f"--resume: the {name} data differ from the data the run in {cfg.output_dir} was trained on "
                "(reordered, cut, extended or relabelled examples, or changed images); an exact resume needs the same data"
            )
    if training["optimizer"] is None:
        raise ValueError(
            f"--resume: the checkpoints in {cfg.output_dir} hold no optimizer state (an FSDP run of an older livr wrote "
            "them); they still hold the adapter and latent rows for evaluation, but cannot continue the run exactly"
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
    # The exact tensors, not the exported adapter: bit-identical continuation.
    if is_fsdp(accelerator):
        # Every process reads the full tensors and keeps its own shard.
        set_model_state_dict(model, training["trainable"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, _inner_optimizer(optimizer), training["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            for name, value in training["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    set_rng_state(torch_load(latest / RNG_STATE_TEMPLATE.format(rank=accelerator.process_index)))
    state = ResumeState.from_dict(training["resume"])
    if accelerator.is_main_process:
        # A crash between the two pointer writes of the last save left selected.json behind.
        write_selected_pointer(cfg.output_dir)
        print(f"resuming from {latest} (step {state.global_step}, epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)
    return state


