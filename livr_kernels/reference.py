"""Dense-mask PyTorch reference: the ground truth for the kernels and the CPU path.

Everything here materialises the (Nq, Nk) mask, so it is meant for small sequences, tests,
debugging, and SDPA baselines; the Triton kernels never build it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .segments import RuleLike, Segment, resolve_rule


def segment_mask(
    segment_ids: torch.Tensor,
    rule: RuleLike = "bottleneck",
    doc_ids: Optional[torch.Tensor] = None,
    num_queries: Optional[int] = None,
) -> torch.Tensor:
    """Boolean mask (B, Nq, Nk), True where query i may attend key j.

    ``segment_ids`` and ``doc_ids`` are (B, Nk); the queries are the last ``num_queries``
    positions (all of them by default), as with a KV cache. Add a head axis with
    ``mask[:, None]`` to use it as an SDPA ``attn_mask``.
    """
    rule = resolve_rule(rule)
    n_k = segment_ids.shape[-1]
    n_q = n_k if num_queries is None else num_queries
    offset = n_k - n_q
    seg = segment_ids.long()
    seg_q = seg[:, offset:]
    table = rule.table(seg.device)
    mask = table[seg_q[:, :, None], seg[:, None, :]]
    pos_q = torch.arange(offset, n_k, device=seg.device)
    pos_k = torch.arange(n_k, device=seg.device)
    mask = mask & (pos_k[None, :] <= pos_q[:, None])[None]
    pad = int(Segment.PAD)
    mask = mask & (seg_q != pad)[:, :, None] & (seg != pad)[:, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, offset:, None] == doc_ids[:, None, :])
    return mask


def reference_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_ids: torch.Tensor,
    rule: RuleLike = "bottleneck",
    doc_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention probabilities with the segment mask, (B, Hq, Nq, Nk) in fp32 or wider (the softmax
    dtype). Rows with no allowed key are exactly 0.

    q (B, Hq, Nq, D); k (B, Hkv, Nk, D).
    """
    n_q, head_dim = q.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    mask = segment_mask(segment_ids, rule, doc_ids, num_queries=n_q)[:, None]
    k = k.repeat_interleave(group, dim=1)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(softmax_dtype), k.to(softmax_dtype).transpose(-1, -2)) * scale
    has_key = mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    rule: RuleLike = "bottleneck",
    doc_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention with the segment mask, computed densely. Scores and softmax run in fp32 (or
    float64 for float64 inputs), as the kernels and SDPA do, so fp16 scores cannot overflow; the
    probabilities are then rounded to the inputs' dtype for the product with V. Rows with no
    allowed key give exactly 0 and zero gradient.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); returns (B, Hq, Nq, D).
    """
    group = q.shape[1] // v.shape[1]
    probs = reference_probs(q, k, segment_ids, rule, doc_ids, scale)
    return torch.matmul(probs.to(v.dtype), v.repeat_interleave(group, dim=1))
