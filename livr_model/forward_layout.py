"""Per-forward state of a patched model: its SegmentLayout (from the inputs, a user's ids, or the KV
cache), the rule, and the optional attention capture.

``patch_attention``'s pre-hook calls ``layout_for_forward`` once per forward. With a KV cache the
layout of the cached keys rides on the cache object (``CACHE_ATTR``), so a decode step extends it
(its per-block summaries too) instead of rebuilding it; tokens added to a non-empty cache are
ANSWER unless the caller says otherwise. Nothing here waits for the GPU except the one range
check of ids a user passes as a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from livr_kernels import AttentionRule, Segment, SegmentLayout

# Attribute set on a KV cache object: the SegmentLayout of the keys it holds.
CACHE_ATTR = "_livr_keys"


@dataclass
class AttentionCapture:
    """Dense attention probabilities of the most recent forward, for probes (eval only).

    ``weights``: one (B, Hq, Nq, Nk) float32 tensor per text layer, in layer order, computed with the
    rule in force. ``segment_ids``: the (B, Nk) kinds of the keys.
    """

    weights: List[torch.Tensor] = field(default_factory=list)
    segment_ids: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ForwardState:
    """What every attention layer of one forward needs: built once by the pre-hook."""

    layout: SegmentLayout
    rule: AttentionRule
    kernel_backend: str
    capture: Optional[AttentionCapture] = None




def check_2d(name: str, tensor, batch: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != batch:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a (batch={batch}, seq_len) tensor; got {shape}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype; got {tensor.dtype}")
    return tensor


def remember_keys(cache, layout: SegmentLayout) -> None:
    setattr(cache, CACHE_ATTR, layout)


def layout_for_forward(kwargs: dict, user_segment_ids, user_doc_ids, derive_ids: Callable[[], torch.Tensor], *,
                       offered_prompt: bool = False) -> SegmentLayout:
    """The SegmentLayout of one forward's keys: user ids, or ids derived from the inputs (``derive_ids``),
    extended from the KV cache's layout at decode steps. Raises ValueError naming what is wrong.
    ``offered_prompt``: ``user_segment_ids`` are the prompt's kinds, offered at every step of a generation
    (``use_segment_ids``); at a decode step they never describe the new tokens, even when as many."""
    input_ids = kwargs.get("input_ids")
    inputs_embeds = kwargs.get("inputs_embeds")
    attention_mask = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(
            f"static caches are not supported by a patched model (got {type(cache).__name__}); generate with the "
            "default DynamicCache (no cache_implementation='static')"
        )
    if input_ids is not None:
        batch, new_len = input_ids.shape[:2]
    elif inputs_embeds is not None:
        batch, new_len = inputs_embeds.shape[:2]
    else:
        raise ValueError("a patched model needs input_ids or inputs_embeds")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"a patched model takes a 2-D padding attention_mask (batch, seq_len); got {shape}. The LIVR mask "
            "comes from segment ids; pass segment_ids= for custom kinds"
        )
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    total = past + new_len
    if attention_mask is not None and attention_mask.shape != (batch, total) and not (past and attention_mask.shape == (batch, new_len)):
        raise ValueError(f"attention_mask must be (batch={batch}, {total}) here; got {tuple(attention_mask.shape)}")

    if isinstance(user_segment_ids, SegmentLayout):
        if user_doc_ids is not None:
            raise ValueError("doc_ids must be None when segment_ids is a SegmentLayout (it carries its own doc ids)")
        if tuple(user_segment_ids.shape) == (batch, total):
            # Used as is: a prebuilt layout already marks padding as PAD.
            return user_segment_ids
        if not (past and user_segment_ids.shape[0] == batch and user_segment_ids.shape[1] <= past):
            raise ValueError(
                f"a SegmentLayout passed as segment_ids must cover all keys (batch={batch}, {total}); "
                f"got {tuple(user_segment_ids.shape)}"
            )
        # The prompt's layout offered again at a decode step: its kinds are in the cache already.
        user_segment_ids = None

    new_ids, validate = None, False
    if user_segment_ids is not None:
        check_2d("segment_ids", user_segment_ids, batch)
        length = user_segment_ids.shape[1]
        if length == total:
            segment_ids = user_segment_ids
            if attention_mask is not None:
                segment_ids = segment_ids.masked_fill(_padding(attention_mask, batch, past, total), int(Segment.PAD))
            docs = _full_doc_ids(user_doc_ids, getattr(cache, CACHE_ATTR, None) if past else None, batch, new_len, past)
            return SegmentLayout(segment_ids, docs)
        # A 1-token prompt and a 1-token decode step have the same length: only the caller can tell them apart.
        if length == new_len and not (offered_prompt and past and length <= past):
            new_ids, validate = user_segment_ids, True
        elif not (past and length <= past):
            raise ValueError(f"segment_ids must cover the new tokens ({new_len}) or all keys ({total}); got {length}")
        # Else: the prompt's kinds offered again at a decode step; they are in the cache already.

    if not past:
        if new_ids is None:
            new_ids = derive_ids()
        if attention_mask is not None:
            new_ids = new_ids.masked_fill(attention_mask == 0, int(Segment.PAD))
        if user_doc_ids is not None:
            check_2d("doc_ids", user_doc_ids, batch)
        return SegmentLayout(new_ids, user_doc_ids, validate=validate)

    cached = getattr(cache, CACHE_ATTR, None)
    if not isinstance(cached, SegmentLayout) or tuple(cached.shape) != (batch, past):
        raise ValueError(
            f"the KV cache holds {past} tokens whose segment kinds are unknown (it was not filled by this patched "
            f"model); pass segment_ids=(batch, {total}) covering every key"
        )
    if new_ids is None:
        new_ids = torch.full((batch, new_len), int(Segment.ANSWER), dtype=torch.long, device=cached.device)
    if attention_mask is not None:
        new_ids = new_ids.masked_fill(attention_mask[:, -new_len:] == 0, int(Segment.PAD))
    new_docs = _new_doc_ids(user_doc_ids, cached, batch, new_len, past)
    if isinstance(new_docs, tuple):
        # Document ids for every key: a new layout (its ids relabelled in one go).
        return SegmentLayout(torch.cat([cached.segment_ids, new_ids.to(cached.segment_ids.dtype)], 1), new_docs[0])
    return cached.extend(new_ids, new_docs, validate=validate)


def _padding(attention_mask: torch.Tensor, batch: int, past: int, total: int) -> torch.Tensor:
    """Padding flags over all keys, from a mask over all keys or (with a cache) the new tokens only."""
    padding = attention_mask == 0
    if padding.shape[1] == total:
        return padding
    cached = torch.zeros(batch, past, dtype=torch.bool, device=padding.device)
    return torch.cat([cached, padding], dim=1)

def _full_doc_ids(user_doc_ids, cached: Optional[SegmentLayout], batch: int, new_len: int, past: int):
    """Document ids for segment ids given over every key: the user's, or the cached keys' ones
    continued (tokens added to a cache continue the last cached token's document)."""
    if user_doc_ids is None:
        if isinstance(cached, SegmentLayout) and cached.has_docs and tuple(cached.shape) == (batch, past):
            raw = cached.raw_doc_ids
            return torch.cat([raw, raw[:, -1:].expand(batch, new_len)], dim=1)
        return None
    check_2d("doc_ids", user_doc_ids, batch)
    if user_doc_ids.shape[1] != past + new_len:
        raise ValueError(f"doc_ids must cover all keys ({past + new_len}) when segment_ids do; got {user_doc_ids.shape[1]}")
    return user_doc_ids

def _new_doc_ids(user_doc_ids, cached: SegmentLayout, batch: int, new_len: int, past: int):
    """Document ids for a decode step: None (continue the last document), the new tokens' ids,
    or a 1-tuple with ids for every key."""
    if user_doc_ids is None:
        return None
    check_2d("doc_ids", user_doc_ids, batch)
    length = user_doc_ids.shape[1]
    if length == past + new_len:
        return (user_doc_ids,)
    if cached.has_docs and length == new_len:
        return user_doc_ids
    if cached.has_docs and length <= past:
        return None
    raise ValueError(
        f"doc_ids must cover all keys ({past + new_len}), or the new tokens ({new_len}) of a cache whose document "
        f"ids are known; got {length}"
    )
