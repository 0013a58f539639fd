"""Example or dataset row -> model inputs: the one prompt module the trainer, the evaluator and the
trainer integrations share.

An ``Example`` (schema in ``livr_model.examples``) is one visual question (PIL images, question, optional choices, answer: a letter for
multiple choice, else the exact text). ``encode_messages`` turns any chat (``encode_example`` an
Example's) into model inputs with the processor's own chat template, latents at the end of the last
user turn, labels on the answer only; ``collate`` pads them into a batch. ``PromptEncoder`` does both
for one comparison mode (``livr_model.modes``), for Examples and for dataset rows (``encode_row``;
formats in ``livr_model.rows``), and adds segment ids: ``batch`` is the one encode -> collate path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image

from livr_kernels import Segment

from .archs import get_arch, tokenizer_of
from .examples import CHOICES_HEADER, LETTERS, Example, answer_text, format_prompt
from .images import check_image_sizes, image_size_kwargs
from .latents import latent_token_strings
from .modes import get_mode, unchanged
from .packing import pack_examples, plan_packing, row_starts
from .rows import (
    conversation_from_row, count_image_parts, is_livr_row, last_text, livr_row_fields, split_turns, text_parts, with_latents,
)
from .segment_ids import IGNORE_INDEX, build_segment_ids

# Token type ids transformers 5.x Qwen models read (mm_token_type_ids).
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1
VIDEO_TOKEN_TYPE = 2
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
# Keys of an encoded example that are bookkeeping, not model inputs.
PRIVATE_PREFIX = "_"
SLOT_END = "_slot_end"
# Stands in for the latents when measuring the chat template's tail after them; no template renders it itself.
LATENT_SLOT_MARKER = "[[livr:latent-slot]]"


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


def _refuse_latent_text(turns: Sequence[dict], latent_strings: Sequence[str], what: str) -> None:
    """A latent token written in the text would tokenize as one more latent, inside the question or answer,
    which the attention rule then lets see the images: refused, so that only livr places latents."""
    for turn in turns:
        for text in text_parts(turn):
            found = next((token for token in latent_strings if token in text), None)
            if found is not None:
                raise ValueError(f"{what}: the {turn['role']} text contains the latent token {found!r}; latent tokens are "
                                 f"placed by livr and must not appear in the data")


def _token_id(processor, name: str) -> Optional[int]:
    value = getattr(processor, name, None)
    return value if isinstance(value, int) else None


def encode_example(processor, example: Example, *, latent_tokens: str = "", with_answer: bool = True,
                   max_length: Optional[int] = None, image_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Model inputs for one example (``encode_messages`` on its chat): the user turn holds the images,
    then ``format_prompt`` and ``latent_tokens``; labels cover the answer and its end-of-turn token.
    Returns 1-D ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` (0 text, 1 image,
    2 video) and the processor's vision tensors (``pixel_values``, ``image_grid_thw`` for Qwen).
    """
    if not isinstance(example, Example):
        raise ValueError(f"example must be an Example; got {type(example).__name__}")
    content = [{"type": "image"} for _ in example.images]
    content.append({"type": "text", "text": format_prompt(example)})
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_text(example)}]})
    return encode_messages(processor, messages, example.images, latent_tokens=latent_tokens, with_answer=with_answer,
                           max_length=max_length, what=f"a {example.task} example", image_kwargs=image_kwargs)


def encode_messages(processor, messages: Sequence[dict], images: Sequence, *, latent_tokens: str = "",
                    with_answer: bool = True, max_length: Optional[int] = None, what: str = "a row",
                    image_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Model inputs for one chat: ``encode_example`` for any conversation.

    ``messages``: chat turns (``{"role", "content"}``, content a string or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts); ``images``: the PIL images
    of the image parts, in order. The prompt is every turn up to the last user turn, with
    ``latent_tokens`` at the end of that turn's content; the answer (``with_answer``) is the one
    assistant turn after it, labelled with its end-of-turn token, -100 everywhere else. Earlier
    assistant turns are prompt. ``image_kwargs`` (``image_size_kwargs``) go to the processor call.
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
        raise ValueError(f"max_length must be a positive int or None; got {max_length!r}")
    prompt_turns, reply = split_turns(messages, what)
    images = list(images or [])
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{index}] of {what} must be a PIL.Image.Image; got {type(image).__name__}")
    if count_image_parts(prompt_turns) != len(images):
        raise ValueError(f"{what} has {count_image_parts(prompt_turns)} image part(s) in its prompt turns but {len(images)} image(s)")
    if with_answer and reply is None:
        raise ValueError(f"{what} has no assistant turn after its last user turn to train on")
    tokenizer = tokenizer_of(processor)
    latent_ids = _check_latent_tokens(tokenizer, latent_tokens)
    _refuse_latent_text(prompt_turns + ([reply] if reply is not None else []), tokenizer.convert_ids_to_tokens(latent_ids), what)
    check_image_sizes(processor, images, what)

    if latent_tokens:
        prompt_turns[-1] = with_latents(prompt_turns[-1], latent_tokens)
    prompt = processor.apply_chat_template(prompt_turns, add_generation_prompt=True, tokenize=False)
    extra = (image_kwargs or {}) if images else {}
    encoded = processor(text=[prompt], images=images or None, return_tensors="pt", **extra)
    input_ids = encoded["input_ids"][0]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if with_answer:
        full = processor.apply_chat_template(prompt_turns + [reply], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the processor's chat template renders the conversation differently from its generation "
                             "prompt; encoding needs a template whose prompt is a prefix of the full chat")
        # The reply up to its end-of-turn token; the template's trailing newline carries no loss.
        target = full[len(prompt):].rstrip()
        target_ids = torch.tensor(tokenizer(target, add_special_tokens=False)["input_ids"], dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids, target_ids])
        labels = torch.cat([labels, target_ids])
    if max_length is not None and input_ids.numel() > max_length:
        raise ValueError(
            f"{what} needs {input_ids.numel()} tokens (with {len(images)} image(s)), "
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


def vocabulary_latent_ids(processor, k: int) -> List[int]:
    """The K existing vocabulary tokens the ``mask-only`` mode appends as its latents.

    Definition: walking down from the highest id of the tokenizer's ordinary vocabulary (special and
    added tokens excluded), the first K tokens whose text is not blank and that the prompt's fixed
    text never uses: the chat template's glue around a user and an assistant turn, the choices
    header and the option letters ``(A)``..``(Z)``. In BPE vocabularies the highest ids are the last
    merges learned, i.e. rare strings. Deterministic for a given tokenizer and chat template.
    Their rows are shared with any other occurrence of the same token in a question, so training
    them shifts those occurrences too; LATENT is assigned by position, never by id.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int (number of latent tokens); got {k!r}")
    tokenizer = tokenizer_of(processor)
    reserved = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    glue = [{"role": "user", "content": [{"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "?"}]}]
    fixed = processor.apply_chat_template(glue, tokenize=False) + CHOICES_HEADER + "".join(f"({c}) " for c in LETTERS)
    reserved |= set(tokenizer(fixed, add_special_tokens=False)["input_ids"])
    chosen = []
    for token_id in range(tokenizer.vocab_size - 1, -1, -1):
        if token_id not in reserved and tokenizer.decode([token_id]).strip():
            chosen.append(token_id)
            if len(chosen) == k:
                return chosen
    raise ValueError(f"the tokenizer has only {len(chosen)} ordinary tokens outside the prompt's fixed text; k={k} is too many")


def _insert_tokens(enc: dict, position: int, token_ids: Sequence[int]) -> dict:
    """``token_ids`` spliced into an encoded example at ``position`` (prompt tokens: no loss, text type)."""
    inserted = torch.tensor(list(token_ids), dtype=enc["input_ids"].dtype)
    fill = {"input_ids": inserted, "attention_mask": torch.ones_like(inserted),
            "labels": torch.full_like(inserted, IGNORE_INDEX), "mm_token_type_ids": torch.full_like(inserted, TEXT_TOKEN_TYPE)}
    out = dict(enc)
    for key, values in fill.items():
        out[key] = torch.cat([enc[key][:position], values.to(enc[key].dtype), enc[key][position:]])
    return out


@dataclass
class PromptEncoder:
    """How one comparison mode turns an ``Example`` into model inputs and segment ids.

    ``latent_text`` (the K latent token strings) goes right after the question for modes with new
    latents (marked LATENT by id); with ``vocab_latent_ids`` (mask-only) those existing tokens are
    spliced in at the same place and marked LATENT by position. The mode's ``prepare`` transforms the example first (image-twice gives every
    image twice). ``drop_latents=True`` encodes without the latents (the "latents removed" probe).
    """

    processor: Any
    mode: str
    latent_text: str = ""
    latent_token_ids: tuple = ()
    image_token_ids: tuple = ()
    vocab_latent_ids: tuple = ()
    max_length: Optional[int] = None
    # Pixels per image; multi_image_max_pixels replaces max_pixels for questions with 2+ images.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    multi_image_max_pixels: Optional[int] = None
    _suffix_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, mode, model, processor, latent_token_ids: Sequence[int], num_latents: int,
                  max_length: Optional[int] = None, **pixel_limits) -> "PromptEncoder":
        """The encoder of ``mode`` for a (possibly peft-wrapped) model whose latent tokens, if the
        mode adds them, have ids ``latent_token_ids``."""
        mode = get_mode(mode)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        return cls(
            processor=processor,
            mode=mode.name,
            latent_text="".join(latent_token_strings(num_latents)) if mode.new_latents else "",
            latent_token_ids=tuple(int(i) for i in latent_token_ids) if mode.new_latents else (),
            image_token_ids=get_arch(model).placeholder_token_ids(config),
            vocab_latent_ids=tuple(vocabulary_latent_ids(processor, num_latents)) if mode.vocab_latents else (),
            max_length=max_length,
            **pixel_limits,
        )

    @property
    def pad_token_id(self) -> int:
        return int(tokenizer_of(self.processor).pad_token_id)

    def prepare(self, example):
        return get_mode(self.mode).prepare(example)

    def encode(self, example, *, with_answer: bool, drop_latents: bool = False) -> dict:
        example = self.prepare(example)
        latent_text = "" if drop_latents else self.latent_text
        enc = encode_example(self.processor, example, latent_tokens=latent_text, with_answer=with_answer,
                             max_length=self.max_length, image_kwargs=self.image_kwargs(len(example.images)))
        if self.vocab_latent_ids and not drop_latents:
            enc = self._insert_vocab_latents(enc, self._template_suffix_tokens(example), f"a {example.task} example")
        return enc

    def _insert_vocab_latents(self, enc: dict, suffix_tokens: int, what: str) -> dict:
        """mask-only: the K vocabulary tokens spliced in where new latents would go."""
        position = self._prompt_length(enc) - suffix_tokens
        enc = _insert_tokens(enc, position, self.vocab_latent_ids)
        enc[SLOT_END] = position + len(self.vocab_latent_ids)
        if self.max_length is not None and enc["input_ids"].numel() > self.max_length:
            raise ValueError(f"{what} needs {enc['input_ids'].numel()} tokens with its latents, more than max_length={self.max_length}")
        return enc

    def image_kwargs(self, num_images: int) -> dict:
        """The processor's size bounds for a question with ``num_images`` images."""
        multi = num_images > 1 and self.multi_image_max_pixels is not None
        return image_size_kwargs(self.processor, self.min_pixels, self.multi_image_max_pixels if multi else self.max_pixels)

    def _prompt_length(self, enc: dict) -> int:
        labels = enc["labels"]
        supervised = (labels != IGNORE_INDEX).nonzero()
        return int(supervised[0]) if len(supervised) else int(labels.numel())

    def _template_suffix_tokens(self, example) -> int:
        """Tokens the chat template puts after the user's text (end of turn, assistant header)."""
        key = len(example.images)
        if key not in self._suffix_cache:
            content = [{"type": "image"} for _ in example.images] + [{"type": "text", "text": format_prompt(example)}]
            self._suffix_cache[key] = self._suffix_tokens([{"role": "user", "content": content}])
        return self._suffix_cache[key]

    def _suffix_tokens(self, prompt_turns: Sequence[dict]) -> int:
        if not last_text(prompt_turns[-1]):
            raise ValueError(f"mode {self.mode} places its latents after the last user turn's text; that turn must end with text")
        # A marker where new latents would go, not a search for the user's text: a short text (a question
        # "a") also occurs in the template's own tail ("assistant"), and the last match would be there.
        turns = list(prompt_turns)
        turns[-1] = with_latents(turns[-1], LATENT_SLOT_MARKER)
        prompt = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        end = prompt.rindex(LATENT_SLOT_MARKER) + len(LATENT_SLOT_MARKER)
        return len(tokenizer_of(self.processor)(prompt[end:], add_special_tokens=False)["input_ids"])

    def encode_row(self, row: dict, *, with_answer: bool = True, image_root=None, what: str = "row") -> dict:
        """``encode`` for a dataset row: a livr JSONL row, or a TRL conversational or prompt/completion
        row (formats in ``livr_model.rows``); latents at the end of the last user turn."""
        if is_livr_row(row):
            try:
                example = Example(**livr_row_fields(row, image_root, what))
            except ValueError as error:
                raise ValueError(f"{what}: {error}") from None
            return self.encode(example, with_answer=with_answer)
        turns, images = conversation_from_row(row, image_root, what)
        if get_mode(self.mode).prepare is not unchanged:
            raise ValueError(f"mode {self.mode} transforms livr Examples (its prompt differs); give it livr rows "
                             "({'images', 'question', 'choices', 'answer'}), not chat turns")
        enc = encode_messages(self.processor, turns, images, latent_tokens=self.latent_text, with_answer=with_answer,
                              max_length=self.max_length, what=what, image_kwargs=self.image_kwargs(len(images)))
        if self.vocab_latent_ids:
            enc = self._insert_vocab_latents(enc, self._suffix_tokens(split_turns(turns, what)[0]), what)
        return enc

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
                segment_ids[row, end - len(self.vocab_latent_ids):end] = int(Segment.LATENT)
        if device is not None:
            batch, labels, segment_ids = to_device(batch, device), labels.to(device), segment_ids.to(device)
        return batch, labels, segment_ids

    def batch(self, examples: Sequence, *, with_answer: bool, padding_side: str, device=None,
              drop_latents: bool = False) -> tuple:
        """Encode, collate and move to ``device``: (model inputs, labels, segment ids)."""
        encoded = [self.encode(ex, with_answer=with_answer, drop_latents=drop_latents) for ex in examples]
        return self.collate(encoded, padding_side=padding_side, device=device)
