"""Segment ids (one ``Segment`` kind per token) from the tensors a training batch already has."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from livr_kernels import Segment

IGNORE_INDEX = -100

TokenIds = Union[int, Sequence[int], torch.Tensor]


def _as_id_tensor(name: str, ids: TokenIds, device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        values = ids.flatten().tolist()
    elif isinstance(ids, int):
        values = [ids]
    elif isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)):
        values = list(ids)
    else:
        raise ValueError(f"{name} must be an int, a sequence of ints or an integer tensor; got {type(ids).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must hold integer token ids; got {values!r}")
    return torch.tensor(values, dtype=torch.long, device=device)


def _check_like(name: str, tensor: Optional[torch.Tensor], input_ids: torch.Tensor) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(input_ids.shape):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)}; got {shape}")


def build_segment_ids(
    input_ids: torch.Tensor,
    *,
    image_token_ids: TokenIds,
    latent_token_ids: TokenIds,
    labels: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token ``Segment`` kinds, (B, N) int64.

    PAD where ``attention_mask == 0``; else IMAGE for any of ``image_token_ids`` (image and video
    placeholders); else LATENT for any of ``latent_token_ids``; else ANSWER where
    ``labels != -100``; else TEXT (prompt text, chat glue, vision start/end markers). The order
    matters only when a collator supervises more than the answer: placeholders and latents keep
    their kind whatever their labels say. Left and right padding are both just PAD positions.
    ``labels`` are unshifted, aligned with ``input_ids`` (the transformers convention).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor of token ids; got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must have an integer dtype; got {input_ids.dtype}")
    _check_like("labels", labels, input_ids)
    _check_like("attention_mask", attention_mask, input_ids)
    image = _as_id_tensor("image_token_ids", image_token_ids, "cpu")
    latent = _as_id_tensor("latent_token_ids", latent_token_ids, "cpu")
    overlap = set(image.tolist()) & set(latent.tolist())
    if overlap:
        raise ValueError(f"latent_token_ids and image_token_ids must be disjoint; both contain {sorted(overlap)}")
    return segment_kinds(input_ids, image.to(input_ids.device), latent.to(input_ids.device), labels, attention_mask)


def segment_kinds(
    input_ids: torch.Tensor,
    image_token_ids: torch.Tensor,
    latent_token_ids: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``build_segment_ids`` without its checks, for id tensors already on ``input_ids``' device:
    only device work, so the host never waits for the GPU (the per-forward path of a patched model)."""
    segment_ids = torch.full_like(input_ids, int(Segment.TEXT), dtype=torch.long)
    if labels is not None:
        segment_ids = segment_ids.masked_fill(labels != IGNORE_INDEX, int(Segment.ANSWER))
    segment_ids = segment_ids.masked_fill(_is_any(input_ids, latent_token_ids), int(Segment.LATENT))
    segment_ids = segment_ids.masked_fill(_is_any(input_ids, image_token_ids), int(Segment.IMAGE))
    if attention_mask is not None:
        segment_ids = segment_ids.masked_fill(attention_mask == 0, int(Segment.PAD))
    return segment_ids


def _is_any(input_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    # Not torch.isin: for a few elements it sorts through torch.unique, which reads a size back from the GPU.
    return (input_ids[..., None] == token_ids).any(-1)
