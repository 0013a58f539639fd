"""A tiny Qwen2.5-VL and its processor, built offline (nothing from a hub), for the demo and tests.

The tokenizer is a byte-level BPE trained locally on the synthetic tasks' prompts (any text still
encodes, byte by byte), with Qwen's special tokens and a Qwen-style chat template. The image
processor uses 7-pixel patches, so a 56x56 image becomes 16 image tokens after the 2x2 merge.

``pretrain_demo_base`` gives the random model a short full-parameter phase on synthetic tasks:
LoRA alone cannot move a random tiny model (its embeddings and lm_head stay random), so LIVR is
demonstrated on a base that already reads the task format.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from livr_model.lr import warmup_cosine
from livr_model.prompts import Example, answer_text, collate, encode_example, format_prompt

from .data.synthetic import SYNTHETIC_TASKS, make_synthetic_dataset

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen's chat layout without the default system prompt (shorter sequences for a CPU demo).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_VOCAB_SIZE = 512
# Examples per synthetic task whose prompts and answers train the BPE merges.
TOKENIZER_CORPUS_EXAMPLES = 8
TOKENIZER_EXTRA_TEXT = ("system", "user", "assistant", "0 1 2 3 4 5 6 7 8 9", "A B C D E F G H")

PATCH_SIZE = 7
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Text attention heads are this wide; Qwen's M-RoPE splits half of it into (temporal, height, width).
HEAD_DIM = 32
VISION_HEAD_DIM = 32
KV_HEAD_RATIO = 2
MLP_RATIO = 2
MAX_POSITIONS = 4096

DEFAULT_PRETRAIN_LR = 1e-3
PRETRAIN_WARMUP_FRACTION = 0.05
PRETRAIN_MIN_LR_FRACTION = 0.1
PRETRAIN_WEIGHT_DECAY = 0.0
# Batches of 8 rather than 1: single-example gradients are too noisy for the tiny model to pick up
# counting (measured: chance after 4,000 steps of batch 1, 94% after 1,200 steps of batch 8).
DEFAULT_PRETRAIN_BATCH = 8
PRETRAIN_MAX_GRAD_NORM = 1.0


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor for images only: without torchvision transformers cannot build Qwen's
    video processor, and the stock class insists on one."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def _tokenizer_corpus(image_size: int) -> List[str]:
    texts = list(TOKENIZER_EXTRA_TEXT)
    for task in SYNTHETIC_TASKS:
        for example in make_synthetic_dataset(task, TOKENIZER_CORPUS_EXAMPLES, seed=0, image_size=image_size):
            texts.append(format_prompt(example))
            texts.append(answer_text(example))
    return texts


def build_tiny_tokenizer(image_size: int = 56) -> PreTrainedTokenizerFast:
    """Byte-level BPE (``TOKENIZER_VOCAB_SIZE`` entries) with Qwen's special tokens; deterministic."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(image_size), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_processor(image_size: int = 56) -> TinyQwen2_5_VLProcessor:
    """A Qwen2.5-VL processor with the tiny tokenizer; images are resized to at most
    ``image_size``x``image_size`` pixels (16 image tokens at 56) and at least one merged patch."""
    factor = PATCH_SIZE * MERGE_SIZE
    if not isinstance(image_size, int) or image_size < factor or image_size % factor:
        raise ValueError(f"image_size must be a positive multiple of {factor}; got {image_size!r}")
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=factor * factor,
        max_pixels=image_size * image_size,
    )
    return TinyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(image_size),
                                   chat_template=CHAT_TEMPLATE)


def _mrope_section(head_dim: int) -> List[int]:
    """(temporal, height, width) rotary sections in Qwen's 1:1.5:1.5 proportion, summing to head_dim / 2."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the processor's tokenizer lacks the special token {token!r}")
    return token_id


def build_tiny_model(processor, seed: int = 0, text_hidden: int = 128, layers: int = 2, vision_hidden: int = 64,
                     vision_depth: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """A random fp32 Qwen2.5-VL whose token ids and patch geometry match ``processor``."""
    for name, value in (("text_hidden", text_hidden), ("vision_hidden", vision_hidden)):
        if not isinstance(value, int) or value <= 0 or value % HEAD_DIM:
            raise ValueError(f"{name} must be a positive multiple of {HEAD_DIM}; got {value!r}")
    for name, value in (("layers", layers), ("vision_depth", vision_depth)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    tokenizer = processor.tokenizer
    image_processor = processor.image_processor
    heads = text_hidden // HEAD_DIM
    kv_heads = max(1, heads // KV_HEAD_RATIO)
    image_side = math.isqrt(image_processor.size["longest_edge"])
    pad_id = _special_id(tokenizer, END_OF_TEXT)
    eos_id = _special_id(tokenizer, IM_END)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=MLP_RATIO * text_hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=MAX_POSITIONS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(HEAD_DIM)},
            pad_token_id=pad_id,
            bos_token_id=None,
            eos_token_id=eos_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=MLP_RATIO * vision_hidden,
            num_heads=vision_hidden // VISION_HEAD_DIM,
            in_channels=3,
            patch_size=image_processor.patch_size,
            spatial_merge_size=image_processor.merge_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            out_hidden_size=text_hidden,
            # One attention window covers a whole image.
            window_size=image_side,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=_special_id(tokenizer, IMAGE_PAD),
        video_token_id=_special_id(tokenizer, VIDEO_PAD),
        vision_start_token_id=_special_id(tokenizer, VISION_START),
        vision_end_token_id=_special_id(tokenizer, VISION_END),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = [eos_id, pad_id]
    model.generation_config.bos_token_id = None
    return model.eval()


def _vision_parameters(model) -> set:
    return {id(p) for p in model.model.visual.parameters()}


def pretrain_demo_base(model, processor, examples: Sequence[Example], steps: int, lr: float = DEFAULT_PRETRAIN_LR,
                       seed: int = 0, log_every: Optional[int] = None, batch_size: int = DEFAULT_PRETRAIN_BATCH,
                       train_vision: bool = False) -> List[float]:
    """Full-parameter training of the language model (embeddings, layers, lm_head; the vision tower
    and projector stay frozen) on ``examples`` for ``steps`` optimizer steps of ``batch_size``
    examples, answer-only loss, AdamW with a short warmup and cosine decay. Returns the per-step
    losses; prints the running mean every ``log_every`` steps. Leaves ``requires_grad`` flags and
    the train/eval mode as it found them."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not examples:
        raise ValueError("examples must hold at least one Example")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr!r}")
    encoded = [encode_example(processor, example) for example in examples]
    pad_id = processor.tokenizer.pad_token_id
    vision = set() if train_vision else _vision_parameters(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    trainable = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in vision)
        if p.requires_grad:
            trainable.append(p)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=PRETRAIN_WEIGHT_DECAY)
    warmup = max(1, round(PRETRAIN_WARMUP_FRACTION * steps))

    def schedule(step: int) -> float:
        return warmup_cosine(step, steps, warmup, floor=PRETRAIN_MIN_LR_FRACTION)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    order: List[int] = []
    losses: List[float] = []
    started = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            batch_indices = []
            while len(batch_indices) < batch_size:
                if not order:
                    order = torch.randperm(len(encoded), generator=generator).tolist()
                batch_indices.append(order.pop())
            batch = collate([encoded[i] for i in batch_indices], pad_id)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, PRETRAIN_MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(f"pretrain step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return losses


def save_tiny(model, processor, path) -> None:
    """The model (safetensors) and the processor (tokenizer, image processor, chat template) in ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def load_tiny(path):
    """(model, processor) saved by ``save_tiny``; local files only."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path must be a folder written by save_tiny; {str(path)!r} has no config.json")
    processor = TinyQwen2_5_VLProcessor.from_pretrained(path, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), processor


def load_or_build_tiny(path):
    """(model, processor) from ``path``, building and saving a fresh (untrained) tiny model there
    first if it holds none: the examples' offline base, which livr-eval can later reload."""
    path = Path(path)
    if not (path / "config.json").is_file():
        processor = build_tiny_processor()
        save_tiny(build_tiny_model(processor), processor, path)
    return load_tiny(path)
