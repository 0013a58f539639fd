"""Checkpoints: atomic files, the on-disk layout of a run, and exact-resume state.

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

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save

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
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_yaml(path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    # safetensors refuses shared or non-contiguous storage; detached contiguous copies are safe.
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(clean, metadata=meta))


def atomic_torch_save(path, obj: Any) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def torch_load(path) -> Any:
    # Our own files: optimizer state holds only tensors and plain containers.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_safetensors(path) -> dict:
    return load_file(str(path), device="cpu")


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
    _fsync_dir(tmp_dir)
    old_dir = final_dir.with_name(final_dir.name + OLD_SUFFIX)
    if final_dir.exists():
        if old_dir.exists():
            shutil.rmtree(old_dir)
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
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
