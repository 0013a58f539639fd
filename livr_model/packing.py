"""Packing: several encoded examples per row, each attending to itself alone.

``plan_packing`` places examples into rows of at most ``max_length`` tokens (best-fit
decreasing); ``pack_examples`` builds the packed batch: the examples' tokens laid end to end,
``doc_ids`` numbering the examples within each row (the patched model's mask then never lets a
token attend across examples), and ``position_ids`` that restart at every example. For Qwen's
multimodal RoPE the positions of each example are computed by the model's own ``get_rope_index``
on that example alone, so an example packed among others gets exactly the rotary angles it gets
when run by itself. Vision inputs are concatenated in packed order, which is the order the model
scatters image features into placeholder tokens.

An example's first label is dropped (set to -100): in a row it would be predicted from the
previous example's last token. Run alone nothing predicts it either, so losses are unchanged.
"""
from __future__ import annotations

import inspect
import types
from typing import Dict, List, Optional, Sequence

import torch
from transformers import MODEL_MAPPING

from .segment_ids import IGNORE_INDEX

# Keys laid out along the sequence; every other tensor is a vision input concatenated in packed order.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
# Vision inputs that need more than concatenation and are not supported packed.
UNSUPPORTED_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def plan_packing(lengths: Sequence[int], max_length: Optional[int]) -> List[List[int]]:
    """Rows of example indices, each row's lengths summing to at most ``max_length``.

    Best-fit decreasing: the longest example first, each into the fullest row it still fits
    (a new row when none has room). Rows keep their examples in the order placed, and are
    returned in the order opened. ``max_length=None`` puts every example in one row.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None; got {max_length!r}")
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths must hold at least one example length")
    for index, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"lengths[{index}] must be a positive int; got {length!r}")
        if max_length is not None and length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than the packing max_length={max_length}; "
                             "raise max_length or shorten the example")
    if max_length is None:
        return [list(range(len(lengths)))]
    rows: List[List[int]] = []
    room: List[int] = []
    # Stable sort: equal lengths keep their input order, so plans are deterministic.
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(index)
            room[best] -= lengths[index]
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return rows


def row_starts(plan: Sequence[Sequence[int]], lengths: Sequence[int]) -> Dict[int, tuple]:
    """``{example index: (row, first position)}`` for a packing plan."""
    starts = {}
    for row, indices in enumerate(plan):
        offset = 0
        for index in indices:
            starts[index] = (row, offset)
            offset += lengths[index]
    return starts


def _check_plan(plan, count: int) -> None:
    flat = [i for row in plan for i in row]
    if sorted(flat) != list(range(count)) or any(not row for row in plan):
        raise ValueError(f"plan must place each of the {count} examples exactly once in non-empty rows; got {plan!r}")


class _RopeIndex:
    """The model's own ``get_rope_index`` (Qwen's 3-D multimodal RoPE), or None for 1-D positions."""

    def __init__(self, model_or_config):
        self.fn = None
        if hasattr(model_or_config, "get_base_model"):
            model_or_config = model_or_config.get_base_model()
        if isinstance(model_or_config, torch.nn.Module):
            for module in model_or_config.modules():
                if callable(getattr(module, "get_rope_index", None)):
                    self.fn = module.get_rope_index
                    break
            return
        config = getattr(model_or_config, "config", model_or_config)
        if not hasattr(config, "model_type"):
            raise ValueError(f"model_or_config must be a transformers model or config; got {type(model_or_config).__name__}")
        model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
        method = getattr(model_class, "get_rope_index", None)
        if method is None:
            return
        # get_rope_index reads only the config and the class's get_vision_position_ids, never weights.
        shim = types.SimpleNamespace(config=config)
        shim.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, shim)
        self.fn = types.MethodType(method, shim)

    def __call__(self, example: dict, images: dict) -> torch.Tensor:
        """(3, n) positions for a Qwen model, (1, n) for a 1-D RoPE model."""
        input_ids = example["input_ids"]
        if self.fn is None:
            return torch.arange(input_ids.numel(), device=input_ids.device)[None]
        if "mm_token_type_ids" not in example:
            raise ValueError("packing for a multimodal-RoPE (Qwen) model needs mm_token_type_ids in every encoded example")
        kwargs = {"image_grid_thw": images.get("image_grid_thw")}
        # A get_rope_index without token types (other transformers versions) finds placeholders by token id.
        if "mm_token_type_ids" in inspect.signature(self.fn).parameters:
            kwargs["mm_token_type_ids"] = example["mm_token_type_ids"][None]
        positions, _ = self.fn(input_ids[None], **kwargs)
        return positions[:, 0]


def pack_examples(encoded: Sequence[dict], max_length: Optional[int], *, model_or_config, pad_token_id: int,
                  plan: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, torch.Tensor]:
    """One packed batch from ``encode_example`` outputs (1-D ``input_ids`` etc. plus vision tensors).

    Returns (R, L) ``input_ids`` (padded with ``pad_token_id``), ``attention_mask``, ``labels`` and,
    when the examples have them, ``mm_token_type_ids``; ``doc_ids`` (R, L): the example's slot in
    its row, padding one more; ``position_ids``: (3, R, L) for Qwen's multimodal RoPE, else (R, L);
    vision tensors concatenated in packed order. ``model_or_config``: the model (or its config)
    whose RoPE the positions follow. ``plan``: rows of example indices (default
    ``plan_packing(lengths, max_length)``); L is the longest row.
    """
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int; got {pad_token_id!r}")
    if not encoded:
        raise ValueError("encoded must hold at least one example")
    for index, item in enumerate(encoded):
        if not isinstance(item, dict) or not isinstance(item.get("input_ids"), torch.Tensor) or item["input_ids"].dim() != 1:
            raise ValueError(f"encoded[{index}] must be an encode_example output with 1-D input_ids")
        clash = [key for key in UNSUPPORTED_KEYS if key in item]
        if clash:
            raise ValueError(f"encoded[{index}] has {clash}: packing supports image inputs only, not video")
    lengths = [item["input_ids"].numel() for item in encoded]
    plan = plan_packing(lengths, max_length) if plan is None else [list(row) for row in plan]
    _check_plan(plan, len(encoded))
    if max_length is not None and any(sum(lengths[i] for i in row) > max_length for row in plan):
        raise ValueError(f"plan puts more than max_length={max_length} tokens in a row")
    rope = _RopeIndex(model_or_config)
    width = max(sum(lengths[i] for i in row) for row in plan)
    rows = len(plan)
    first = encoded[0]["input_ids"]
    batch = {"input_ids": first.new_full((rows, width), pad_token_id)}
    for key, value in PAD_VALUES.items():
        if all(key in item for item in encoded):
            batch[key] = encoded[0][key].new_full((rows, width), value)
    doc_ids = torch.zeros(rows, width, dtype=torch.long, device=first.device)
    position_rows = None
    vision_keys = sorted({key for item in encoded for key in item if key not in SEQUENCE_KEYS and isinstance(item[key], torch.Tensor)})
    vision = {key: [] for key in vision_keys}
    for row, indices in enumerate(plan):
        offset = 0
        for slot, index in enumerate(indices):
            item, n = encoded[index], lengths[index]
            span = slice(offset, offset + n)
            for key in batch:
                batch[key][row, span] = item[key]
            if "labels" in batch:
                batch["labels"][row, offset] = IGNORE_INDEX
            doc_ids[row, span] = slot
            images = {key: item[key] for key in vision_keys if key in item}
            positions = rope(item, images)
            if position_rows is None:
                position_rows = positions.new_zeros(positions.shape[0], rows, width)
            position_rows[:, row, span] = positions
            for key, value in images.items():
                vision[key].append(value)
            offset += n
        doc_ids[row, offset:] = len(indices)
    batch["doc_ids"] = doc_ids
    batch["position_ids"] = position_rows[0] if position_rows.shape[0] == 1 else position_rows
    for key, parts in vision.items():
        batch[key] = torch.cat(parts)
    return batch


__all__ = ["pack_examples", "plan_packing", "row_starts"]
