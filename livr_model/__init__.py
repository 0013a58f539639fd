"""livr_model: LIVR inside transformers vision-language models.

The library (this package): architectures, segment ids, the attention patch, latent tokens, the
prompt module and the comparison modes. The application built on it (training loop, data
sources, evaluation, CLI) is ``livr_model.app``; nothing here imports it.
"""
from . import modes, prompts
from .archs import ARCHS, GENERIC_SPEC, ArchSpec, get_arch, register_arch, tokenizer_of
from .latents import add_latent_tokens
from .modes import MODES, Mode, get_mode, register_mode
from .patch import AttentionCapture, LivrAttentionHandle, get_handle, patch_attention
from .prompts import Example, PromptEncoder, collate, encode_example
from .segment_ids import IGNORE_INDEX, build_segment_ids

__all__ = [
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
