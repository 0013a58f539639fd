"""livr_kernels: segment-aware flash attention for Latent Implicit Visual Reasoning."""
from .attention import segment_attention
from .blocks import SegmentLayout, TileMask
from .config import KernelConfig
from .reference import reference_attention, segment_mask
from .segments import RULES, AttentionRule, Segment, resolve_rule

__all__ = [
    "segment_attention",
    "reference_attention",
    "segment_mask",
    "Segment",
    "AttentionRule",
    "RULES",
    "resolve_rule",
    "SegmentLayout",
    "TileMask",
    "KernelConfig",
]
