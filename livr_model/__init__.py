"""livr_model: LIVR inside transformers vision-language models (segment ids, attention patch, archs)."""
from .archs import ARCHS, GENERIC_SPEC, ArchSpec, get_arch, register_arch
from .patch import AttentionCapture, LivrAttentionHandle, get_handle, patch_attention
from .segments import IGNORE_INDEX, build_segment_ids

__all__ = [
    "ARCHS",
    "GENERIC_SPEC",
    "ArchSpec",
    "get_arch",
    "register_arch",
    "AttentionCapture",
    "LivrAttentionHandle",
    "get_handle",
    "patch_attention",
    "IGNORE_INDEX",
    "build_segment_ids",
]
