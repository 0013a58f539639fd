"""Example -> model inputs: the one prompt module the trainer, the evaluator and the trainer
integrations share.

An ``Example`` is one visual question: PIL images, a question, optional choices and the answer
(a letter for multiple choice, the exact text for open-ended questions). ``encode_example`` turns
one into model inputs with the processor's own chat template, latent tokens right after the
question, and labels on the answer only; ``collate`` pads a list of them into a batch.
``PromptEncoder`` does both for one comparison mode (``livr_model.modes``): it applies the mode's
prompt transform, places its latents, and adds segment ids; ``PromptEncoder.batch`` is the one
encode -> collate -> to-device path.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image

from livr_kernels import Segment

from .archs import get_arch, tokenizer_of
from .latents import latent_token_strings
from .modes import get_mode
from .packing import pack_examples, plan_packing, row_starts
from .segment_ids import IGNORE_INDEX, build_segment_ids

LETTERS = string.ascii_uppercase
MIN_CHOICES = 2
CHOICES_HEADER = "Select from the following choices."

# Token type ids transformers 5.x Qwen models read (mm_token_type_ids).
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1
VIDEO_TOKEN_TYPE = 2
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
# Qwen's smart_resize refuses images more elongated than this.
MAX_ASPECT_RATIO = 200
# Keys of an encoded example that are bookkeeping, not model inputs.
PRIVATE_PREFIX = "_"
SLOT_END = "_slot_end"


def _normalize_letter(answer: str) -> str:
    """``"(B)"``, ``" B "`` -> ``"B"``; anything else is returned stripped, unchanged."""
    text = answer.strip()
    if len(text) == 3 and text[0] == "(" and text[2] == ")":
        text = text[1]
    return text


@dataclass
class Example:
    """One visual question.

    ``images``: PIL images in the order the prompt refers to them. ``choices``: option texts, empty
    for an open-ended question. ``answer``: a letter ("A".."Z"; "(A)" is accepted and normalised)
    naming one of ``choices``, or the exact answer text when there are no choices. ``meta``: what
    a synthetic generator drew (ground truth for tests), free-form.
    """

    images: list
    question: str
    choices: List[str]
    answer: str
    task: str = "custom"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images; got {type(self.images).__name__}")
        self.images = list(self.images)
        for index, image in enumerate(self.images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{index}] must be a PIL.Image.Image; got {type(image).__name__}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be a non-empty string; got {self.question!r}")
        if self.choices is None:
            self.choices = []
        if not isinstance(self.choices, (list, tuple)):
            raise ValueError(f"choices must be a list of strings (empty for open-ended); got {type(self.choices).__name__}")
        self.choices = list(self.choices)
        if any(not isinstance(c, str) or not c.strip() for c in self.choices):
            raise ValueError(f"choices must be non-empty strings; got {self.choices!r}")
        if self.choices and not MIN_CHOICES <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"choices must hold {MIN_CHOICES} to {len(LETTERS)} options; got {len(self.choices)}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"answer must be a non-empty string; got {self.answer!r}")
        if self.choices:
            letter = _normalize_letter(self.answer)
            valid = LETTERS[: len(self.choices)]
            if len(letter) != 1 or letter not in valid:
                raise ValueError(
                    f"answer must be one of the letters {', '.join(valid)} (or '(A)' style) naming a choice; "
                    f"got {self.answer!r} for {len(self.choices)} choices"
                )
            self.answer = letter
        else:
            self.answer = self.answer.strip()
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty string; got {self.task!r}")

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)


def format_prompt(example: Example) -> str:
    """BLINK's prompt: the question, then ``Select from the following choices.`` and ``(A) ...`` lines."""
    if not example.choices:
        return example.question
    options = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(example.choices))
    return f"{example.question}\n{CHOICES_HEADER}\n{options}"


def answer_text(example: Example) -> str:
    """The supervised target: ``"(A)"`` for multiple choice, the answer itself for open-ended questions."""
    return f"({example.answer})" if example.choices else example.answer


def _check_image_sizes(processor, example: Example) -> None:
    """Reject images the processor cannot tile: sides under one merged patch, or extreme aspect ratios."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    for index, image in enumerate(example.images):
        width, height = image.size
        if isinstance(patch, int) and isinstance(merge, int):
            minimum = patch * merge
            if min(width, height) < minimum:
                raise ValueError(
                    f"images[{index}] of a {example.task} example is {width}x{height}; this processor needs "
                    f"both sides >= {minimum} pixels (patch {patch} x merge {merge})"
                )
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise ValueError(f"images[{index}] is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO} are not supported")


def _check_latent_tokens(tokenizer, latent_tokens: str) -> List[int]:
    if not isinstance(latent_tokens, str):
        raise ValueError(f"latent_tokens must be a string of added tokens; got {type(latent_tokens).__name__}")
    if not latent_tokens:
        return []
    ids = tokenizer(latent_tokens, add_special_tokens=False)["input_ids"]
    added = set(tokenizer.get_added_vocab().values())
    if any(i not in added for i in ids):
        raise ValueError(
            f"latent_tokens must consist of tokens added to the tokenizer (see livr_model.latents.add_latent_tokens); "
            f"{latent_tokens[:60]!r} tokenizes into ordinary text tokens"
        )
    return ids


def _token_id(processor, name: str) -> Optional[int]:
    value = getattr(processor, name, None)
    return value if isinstance(value, int) else None


def encode_example(processor, example: Example, *, latent_tokens: str = "", with_answer: bool = True,
                   max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Model inputs for one example, built with the processor's chat template.

    Layout: the user turn (images, then ``format_prompt``), ``latent_tokens`` right after the
    question text inside the user turn, the assistant turn start, then (``with_answer``) the answer
    and the template's end-of-turn token. ``labels`` are -100 except on the answer and that
    end-of-turn token. Returns 1-D ``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids`` (0 text, 1 image, 2 video) and the processor's vision tensors
    (``pixel_values``, ``image_grid_thw`` for Qwen) for the example's images.
    """
    if not isinstance(example, Example):
        raise ValueError(f"example must be an Example; got {type(example).__name__}")
    if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
        raise ValueError(f"max_length must be a positive int or None; got {max_length!r}")
    tokenizer = tokenizer_of(processor)
    _check_latent_tokens(tokenizer, latent_tokens)
    _check_image_sizes(processor, example)

    content = [{"type": "image"} for _ in example.images]
    content.append({"type": "text", "text": format_prompt(example) + latent_tokens})
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[prompt], images=example.images or None, return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if with_answer:
        reply = [{"role": "assistant", "content": [{"type": "text", "text": answer_text(example)}]}]
        full = processor.apply_chat_template(messages + reply, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the processor's chat template renders the conversation differently from its generation "
                             "prompt; encode_example needs a template whose prompt is a prefix of the full chat")
        # The reply up to its end-of-turn token; the template's trailing newline carries no loss.
        target = full[len(prompt):].rstrip()
        target_ids = torch.tensor(tokenizer(target, add_special_tokens=False)["input_ids"], dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids, target_ids])
        labels = torch.cat([labels, target_ids])
    if max_length is not None and input_ids.numel() > max_length:
        raise ValueError(
            f"a {example.task} example needs {input_ids.numel()} tokens (with {len(example.images)} image(s)), "
            f"more than max_length={max_length}; use smaller images or a larger max_length"
        )
    token_types = torch.full_like(input_ids, TEXT_TOKEN_TYPE)
    for name, kind in (("image_token_id", IMAGE_TOKEN_TYPE), ("video_token_id", VIDEO_TOKEN_TYPE)):
        token_id = _token_id(processor, name)
        if token_id is not None:
            token_types[input_ids == token_id] = kind
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "mm_token_type_ids": token_types,
    }
    for key, value in encoded.items():
        if key not in TEXT_KEYS and isinstance(value, torch.Tensor):
            out[key] = value
    return out


def collate(encoded: Sequence[Dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad ``encode_example`` outputs into a batch: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    and ``mm_token_type_ids`` with 0, ``labels`` with -100; vision tensors concatenated in order.
    ``padding_side="left"`` for generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int; got {pad_token_id!r}")
    if not encoded:
        raise ValueError("encoded must hold at least one example")
    for index, item in enumerate(encoded):
        if "input_ids" not in item or item["input_ids"].dim() != 1:
            raise ValueError(f"encoded[{index}] must be an encode_example output with 1-D input_ids")
    length = max(item["input_ids"].numel() for item in encoded)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": TEXT_TOKEN_TYPE}
    batch = {}
    for key, pad_value in pad_values.items():
        if not all(key in item for item in encoded):
            continue
        rows = []
        for item in encoded:
            values = item[key]
            padding = values.new_full((length - values.numel(),), pad_value)
            rows.append(torch.cat([values, padding] if padding_side == "right" else [padding, values]))
        batch[key] = torch.stack(rows)
    vision_keys = sorted({key for item in encoded for key in item if key not in TEXT_KEYS})
    for key in vision_keys:
        batch[key] = torch.cat([item[key] for item in encoded if key in item])
    return batch


def _plain(encoded: Sequence[dict]) -> list:
    """The model inputs of ``encode`` outputs, without their bookkeeping keys."""
    return [{k: v for k, v in e.items() if not k.startswith(PRIVATE_PREFIX)} for e in encoded]


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@dataclass
class PromptEncoder:
    """How one comparison mode turns an ``Example`` into model inputs and segment ids.

    ``latent_text`` (the K latent token strings) goes right after the question for modes with new
    latents; with ``slot_count`` (mask-only) nothing is inserted and the last ``slot_count``
    tokens of the user's text (the tokens right before where latents would go) are marked LATENT
    by position. The mode's ``prepare`` transforms the example first (image-twice gives every
    image twice). ``drop_latents=True`` encodes without the latents (the "latents removed" probe).
    """

    processor: Any
    mode: str
    latent_text: str = ""
    latent_token_ids: tuple = ()
    image_token_ids: tuple = ()
    slot_count: int = 0
    max_length: Optional[int] = None
    _suffix_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, mode, model, processor, latent_token_ids: Sequence[int], num_latents: int,
                  max_length: Optional[int] = None) -> "PromptEncoder":
        """The encoder of ``mode`` for a (possibly peft-wrapped) model whose latent tokens, if the
        mode adds them, have ids ``latent_token_ids``."""
        mode = get_mode(mode)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        return cls(
            processor=processor,
            mode=mode.name,
            latent_text="".join(latent_token_strings(num_latents)) if mode.new_latents else "",
            latent_token_ids=tuple(int(i) for i in latent_token_ids),
            image_token_ids=get_arch(model).placeholder_token_ids(config),
            slot_count=num_latents if mode.latent_slots else 0,
            max_length=max_length,
        )

    @property
    def pad_token_id(self) -> int:
        return int(tokenizer_of(self.processor).pad_token_id)

    def prepare(self, example):
        return get_mode(self.mode).prepare(example)

    def encode(self, example, *, with_answer: bool, drop_latents: bool = False) -> dict:
        example = self.prepare(example)
        latent_text = "" if drop_latents else self.latent_text
        enc = encode_example(self.processor, example, latent_tokens=latent_text, with_answer=with_answer, max_length=self.max_length)
        if self.slot_count and not drop_latents:
            enc[SLOT_END] = self._prompt_length(enc) - self._template_suffix_tokens(example)
            if enc[SLOT_END] - self.slot_count < 0:
                raise ValueError(f"mode {self.mode} needs {self.slot_count} prompt tokens to mark as latent slots; the prompt is shorter")
        return enc

    def _prompt_length(self, enc: dict) -> int:
        labels = enc["labels"]
        supervised = (labels != IGNORE_INDEX).nonzero()
        return int(supervised[0]) if len(supervised) else int(labels.numel())

    def _template_suffix_tokens(self, example) -> int:
        """Tokens the chat template puts after the user's text (end of turn, assistant header)."""
        key = len(example.images)
        if key not in self._suffix_cache:
            text = format_prompt(example)
            content = [{"type": "image"} for _ in example.images] + [{"type": "text", "text": text}]
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
            end = prompt.rfind(text) + len(text)
            tokenizer = tokenizer_of(self.processor)
            self._suffix_cache[key] = len(tokenizer(prompt[end:], add_special_tokens=False)["input_ids"])
        return self._suffix_cache[key]

    def collate(self, encoded: Sequence[dict], padding_side: str, device=None) -> tuple:
        """(model inputs, labels, segment ids) for a list of ``encode`` outputs, on ``device`` if given."""
        batch = collate(_plain(encoded), self.pad_token_id, padding_side=padding_side)
        width = batch["input_ids"].shape[1]
        starts = [(row, width - e["input_ids"].numel() if padding_side == "left" else 0) for row, e in enumerate(encoded)]
        return self._with_segments(batch, encoded, starts, device)

    def collate_packed(self, encoded: Sequence[dict], max_length: Optional[int], model_or_config, device=None) -> tuple:
        """``collate`` with the examples packed into rows of at most ``max_length`` tokens
        (``livr_model.packing``): the model inputs also carry ``doc_ids`` and ``position_ids``."""
        plain = _plain(encoded)
        lengths = [e["input_ids"].numel() for e in plain]
        plan = plan_packing(lengths, max_length)
        batch = pack_examples(plain, max_length, model_or_config=model_or_config, pad_token_id=self.pad_token_id, plan=plan)
        starts = row_starts(plan, lengths)
        return self._with_segments(batch, encoded, [starts[i] for i in range(len(encoded))], device)

    def _with_segments(self, batch: dict, encoded: Sequence[dict], starts: Sequence[tuple], device) -> tuple:
        """(inputs, labels, segment ids); ``starts``: (row, first position) of each example."""
        labels = batch.pop("labels")
        segment_ids = build_segment_ids(
            batch["input_ids"],
            image_token_ids=self.image_token_ids,
            latent_token_ids=self.latent_token_ids,
            labels=labels,
            attention_mask=batch["attention_mask"],
        )
        for (row, offset), e in zip(starts, encoded):
            if SLOT_END in e:
                end = offset + e[SLOT_END]
                segment_ids[row, end - self.slot_count:end] = int(Segment.LATENT)
        if device is not None:
            batch, labels, segment_ids = to_device(batch, device), labels.to(device), segment_ids.to(device)
        return batch, labels, segment_ids

    def batch(self, examples: Sequence, *, with_answer: bool, padding_side: str, device=None,
              drop_latents: bool = False) -> tuple:
        """Encode, collate and move to ``device``: (model inputs, labels, segment ids)."""
        encoded = [self.encode(ex, with_answer=with_answer, drop_latents=drop_latents) for ex in examples]
        return self.collate(encoded, padding_side=padding_side, device=device)
