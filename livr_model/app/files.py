"""Atomic file writes of the application's formats (``livr_model.atomic`` does the writing)."""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml
from safetensors.torch import load_file, save

from ..atomic import TMP_SUFFIX, atomic_write_bytes, fsync_dir  # noqa: F401  (re-exported)


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
    """A ``.pt`` file of tensors and plain containers; anything holding pickled objects (which
    could run code when loaded) is refused, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds pickled objects, not only tensors and plain values "
            f"({_unpickler_reason(error)}). livr never unpickles objects from files (unpickling can run code): if this "
            "checkpoint was written by this livr, the file was replaced; an older livr's checkpoint cannot "
            "be resumed, but its adapter and latent rows (safetensors) still load for evaluation"
        ) from None


def _unpickler_reason(error: Exception) -> str:
    """What torch's weights-only unpickler refused (its line naming the GLOBAL), without the preamble
    around it (terminal escape codes, and how to load the file anyway)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    named = [line for line in lines if "GLOBAL" in line]
    if not named:
        return next((line for line in lines if line), type(error).__name__)
    reason = named[0].split("WeightsUnpickler error:", 1)[-1].strip()
    return reason.split(". ")[0].rstrip(".")


def load_safetensors(path) -> dict:
    return load_file(str(path), device="cpu")
