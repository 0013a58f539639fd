"""livr_model: LIVR inside transformers vision-language models.

The library (this package): architectures, segment ids, the attention patch, latent tokens, the
prompt module, the comparison modes, and the trainer integrations (``LivrCollator``,
``LivrStageCallback``: loaded on first use, since transformers' Trainer API pulls in accelerate and
peft). The application built on it (training loop, data sources, evaluation, CLI) is
``livr_model.app``; nothing here imports it.
"""
import importlib

from . import modes, prompts
from .archs import ARCHS, GENERIC_SPEC, ArchSpec, get_arch, register_arch, tokenizer_of
from .latents import add_latent_tokens
from .modes import MODES, Mode, get_mode, register_mode
from .patch import AttentionCapture, LivrAttentionHandle, get_handle, patch_attention
from .prompts import Example, PromptEncoder, collate, encode_example
from .segment_ids import IGNORE_INDEX, build_segment_ids

# Names served lazily from livr_model.integrations (see the module docstring).
INTEGRATION_NAMES = ("LivrCollator", "LivrStageCallback")


def __getattr__(name):
    if name in INTEGRATION_NAMES:
        return getattr(importlib.import_module(".integrations", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LivrCollator",
    "LivrStageCallback",
    "ARCHS",
    "GENERIC_SPEC",
    "ArchSpec",
    "get_arch",
    "register_arch",
    "tokenizer_of",
    "AttentionCapture",
    "LivrAttentionHandle",
    "get_handle",
    "patch_attention",
    "add_latent_tokens",
    "IGNORE_INDEX",
    "build_segment_ids",
    "modes",
    "prompts",
    "MODES",
    "Mode",
    "get_mode",
    "register_mode",
    "Example",
    "PromptEncoder",
    "collate",
    "encode_example",
]
