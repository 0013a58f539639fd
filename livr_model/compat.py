"""Shims that let older remote model code load under transformers 5.

LLaVA-OneVision-1.5's public remote code (``modeling_llavaonevision1_5.py``, written against
transformers 4.5x) does two things transformers 5 no longer supports:

* ``from transformers.modeling_attn_mask_utils import AttentionMaskConverter``: the module is gone.
  ``install_remote_code_shims`` registers a small module of that name holding an
  ``AttentionMaskConverter`` with the two helpers that code calls, written here:
  ``_ignore_causal_mask_sdpa`` always answers False (build the explicit mask: always correct,
  sometimes slower) and ``_unmask_unattended`` lets fully masked rows attend everywhere (what the
  memory-efficient SDPA kernel needs for left padding).
* its text rotary embedding looks up ``ROPE_INIT_FUNCTIONS["default"]``, which transformers 5
  dropped; the shim adds a ``"default"`` entry (plain RoPE: ``1 / theta^(2i/d)``, scaling 1).

Nothing is registered on import: ``livr_model.app.models.load_model_and_processor`` calls
``install_remote_code_shims()`` only when a model is loaded with ``trust_remote_code=True``; code
that loads such a model itself calls it before ``from_pretrained``. An existing module or rope
entry is never replaced. Under a livr patch the masks these helpers build are not used (the
segment layout carries padding and the rule), but unpatched forwards still run them.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import List, Optional

import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

MASK_UTILS_MODULE = "transformers.modeling_attn_mask_utils"
DEFAULT_ROPE = "default"
SHIM_MARKER = "__livr_shim__"


class AttentionMaskConverter:
    """The two static helpers of transformers 4's class that remote code calls (see module docstring)."""

    @staticmethod
    def _ignore_causal_mask_sdpa(attention_mask, inputs_embeds=None, past_key_values_length=0, sliding_window=None,
                                 is_training=False) -> bool:
        return False

    @staticmethod
    def _unmask_unattended(expanded_mask: torch.Tensor, min_dtype: float) -> torch.Tensor:
        fully_masked = torch.all(expanded_mask == min_dtype, dim=-1, keepdim=True)
        return expanded_mask.mul(~fully_masked)


def default_rope_parameters(config, device=None, seq_len: Optional[int] = None) -> tuple:
    """Plain RoPE inverse frequencies for ``config`` (``rope_theta``, head dim, partial factor) and
    attention scaling 1.0: transformers 4's ``"default"`` rope initialisation."""
    base = getattr(config, "rope_theta", None)
    if base is None:
        base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if base is None:
        raise ValueError(f"{type(config).__name__} has no rope_theta (nor rope_parameters['rope_theta'])")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    return 1.0 / (float(base) ** exponents), 1.0


def install_remote_code_shims() -> List[str]:
    """Register what is missing (module docstring); returns the names it added (empty when none)."""
    added = []
    try:
        __import__(MASK_UTILS_MODULE)
    except ImportError:
        module = types.ModuleType(MASK_UTILS_MODULE, "livr shim: transformers 4's mask helpers that remote code imports")
        module.AttentionMaskConverter = AttentionMaskConverter
        setattr(module, SHIM_MARKER, True)
        sys.modules[MASK_UTILS_MODULE] = module
        setattr(transformers, MASK_UTILS_MODULE.rsplit(".", 1)[1], module)
        added.append(MASK_UTILS_MODULE)
    if DEFAULT_ROPE not in ROPE_INIT_FUNCTIONS:
        ROPE_INIT_FUNCTIONS[DEFAULT_ROPE] = default_rope_parameters
        added.append(f"ROPE_INIT_FUNCTIONS[{DEFAULT_ROPE!r}]")
    return added


def enable_activation_checkpointing(model, checkpointing_kwargs: Optional[dict] = None) -> None:
    """Turn on activation (gradient) checkpointing under every supported transformers: 5.24 names it
    ``activation_checkpointing_enable``, 5.17 only ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)


def is_activation_checkpointing(model) -> bool:
    """Whether activation checkpointing is on (``is_activation_checkpointing`` from 5.24, else the old name)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache argument: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
