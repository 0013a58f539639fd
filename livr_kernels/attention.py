"""The public ``segment_attention``: argument checks, backend choice and the autograd Function."""
from __future__ import annotations

import math
import numbers
import os
from typing import Dict, Optional, Union

import torch

from .autotune import select_config
from .blocks import SegmentLayout, TileShape
from .config import MAX_HEAD_DIM, KernelConfig, dq_atomic_on
from .reference import reference_attention
from .segments import AttentionRule, RuleLike, resolve_rule

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_tiles(config: KernelConfig, backward: bool = True) -> Dict[str, TileShape]:
    """The tile shapes the kernels walk: forward, and dK/dV (by key block) and dQ for the backward
    (no dQ list where dK/dV adds dQ with atomics: the dQ kernel does not run)."""
    tiles = {"forward": (config.fwd_block_m, config.fwd_block_n, False)}
    if backward:
        tiles["dkv"] = (config.dkv_block_m, config.dkv_block_n, True)
        if not dq_atomic_on(config):
            tiles["dq"] = (config.dq_block_m, config.dq_block_n, False)
    return tiles


class SegmentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: SegmentLayout, rule: AttentionRule, scale: float, config: KernelConfig):
        from .forward import segment_attention_fwd

        # Every schedule this call will need, from one classification; the wrappers then find them cached.
        layout.schedules(rule, kernel_tiles(config, backward=any(ctx.needs_input_grad[:3])), q.shape[2])
        o, lse = segment_attention_fwd(q, k, v, layout, rule, scale, config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.rule, ctx.scale, ctx.config = layout, rule, scale, config
        return o

    @staticmethod
    def backward(ctx, do):
        from .backward import segment_attention_bwd

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = segment_attention_bwd(do, q, k, v, o, lse, ctx.layout, ctx.rule, ctx.scale, ctx.config)
        return dq, dk, dv, None, None, None, None


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: Union[torch.Tensor, SegmentLayout],
    rule: RuleLike = "bottleneck",
    doc_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Causal attention under a segment rule (see ``livr_kernels.segments``).

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with Hq % Hkv == 0 and Nq <= Nk (the queries are the
    last Nq positions). ``segment_ids`` (B, Nk) holds a ``Segment`` kind per token, or is a
    ``SegmentLayout`` built once and shared by every layer. ``doc_ids`` (B, Nk) restricts
    attention to tokens of the same document (packed sequences). Returns (B, Hq, Nq, D).

    ``backend``: ``"auto"`` runs the Triton kernels on CUDA tensors and the dense reference on
    CPU tensors; ``"triton"`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``);
    ``"reference"`` always works. ``config`` overrides the tile sizes (tests, tuning).
    """
    rule = resolve_rule(rule)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be None or a livr_kernels.KernelConfig; got {type(config).__name__}")
    layout = _as_layout(segment_ids, doc_ids)
    _check_qkv(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else _check_scale(scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return reference_attention(q, k, v, layout.segment_ids, rule, layout.doc_ids, scale)
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend='triton' supports q/k/v dtypes {KERNEL_DTYPES}; got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}; got q.shape[-1]={q.shape[-1]}")
    if not q.is_cuda:
        if not interpreter_enabled():
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing livr_kernels, or use backend='reference' (or CUDA tensors)"
            )
        from ._interpreter import patch_interpreter_dot

        patch_interpreter_dot()
    if config is None:
        config = select_config(q, k, v, layout, rule, scale)
    return SegmentAttentionFunction.apply(q, k, v, layout, rule, scale, config)


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type == "cpu":
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (or None for head_dim ** -0.5); got {scale!r}")
    return float(scale)


def _as_layout(segment_ids, doc_ids) -> SegmentLayout:
    if isinstance(segment_ids, SegmentLayout):
        if doc_ids is not None:
            raise ValueError("doc_ids must be None when segment_ids is a SegmentLayout (it carries its own doc ids)")
        return segment_ids
    return SegmentLayout(segment_ids, doc_ids)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq_len, head_dim); got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch, hq, n_q, head_dim = q.shape
    _, hkv, n_k, _ = k.shape
    if head_dim == 0:
        raise ValueError(f"q, k and v need a head dim of at least 1; got shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v must be (batch={batch}, heads, seq_len, head_dim={head_dim}) like q; got {tuple(k.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    if n_q > n_k:
        raise ValueError(f"q may not have more positions than k/v (queries are the last Nq keys); got Nq={n_q} > Nk={n_k}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in REFERENCE_DTYPES:
        raise ValueError(f"q/k/v dtype must be one of {REFERENCE_DTYPES}; got {q.dtype}")
    if not (q.device == k.device == v.device == layout.device):
        raise ValueError(
            f"q, k, v and segment_ids must be on one device; got {q.device}, {k.device}, {v.device}, {layout.device}"
        )
    if tuple(layout.shape) != (batch, n_k):
        raise ValueError(f"segment_ids must be (batch, Nk) = ({batch}, {n_k}); got {tuple(layout.shape)}")
