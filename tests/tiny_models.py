"""Tiny random Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision models and processor-free LIVR batches.

Everything is built from configs (no weights, no tokenizer, no processor): a small vocabulary
whose top ids are the special tokens, a vision tower of a couple of layers, and batches laid out
the way LIVR sees them:

    [pad] text (vision_start image... vision_end text)* latents text answer [pad]

``build_tiny_model(arch)`` gives the model, ``make_batch(model, ...)`` a dict of model inputs plus
the labels (answer tokens supervised), and ``TINY_TOKENS`` the ids. Import from tests as
``from tiny_models import ...`` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

ARCHS = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")

IGNORE_INDEX = -100
TINY_VOCAB = 160
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
TEXT_INTERMEDIATE = 128
# Rotary sections (temporal, height, width) of the multimodal RoPE; they sum to head_dim / 2.
MROPE_SECTION = [2, 3, 3]
VISION_HIDDEN = 32
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
VISION_DEPTH = 2
CHANNELS = 3
# Qwen vision towers: patches of QWEN_PATCH pixels, 2 frames per temporal patch, 2x2 merge.
QWEN_PATCH = 4
QWEN_TEMPORAL_PATCH = 2
QWEN_MERGE = 2
# Qwen3-VL learns a grid of position embeddings (interpolated to each image): 8 x 8.
QWEN3_POSITION_EMBEDDINGS = 64
# LLaVA-OneVision: SigLIP crops of LLAVA_IMAGE_SIZE pixels, LLAVA_PATCH-pixel patches.
LLAVA_IMAGE_SIZE = 16
LLAVA_PATCH = 4


@dataclass(frozen=True)
class TinyTokens:
    """Token ids of the tiny vocabulary: ordinary text below ``first_special``, specials above."""

    pad: int = 0
    first_special: int = 144
    vision_start: int = 150
    vision_end: int = 151
    image: int = 152
    video: int = 153
    latents: tuple = (154, 155, 156, 157)
    eos: int = 158


TINY_TOKENS = TinyTokens()


@dataclass(frozen=True)
class ImageGrid:
    """Size of one image in patch units for Qwen (height and width in patches before the 2x2 merge)."""

    height: int = 4
    width: int = 4


def _qwen_text_config(**overrides) -> dict:
    config = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION},
        pad_token_id=TINY_TOKENS.pad,
        bos_token_id=None,
        eos_token_id=TINY_TOKENS.eos,
    )
    config.update(overrides)
    return config


def _qwen_vision_config(**extra) -> dict:
    """The vision-tower settings Qwen2.5-VL and Qwen3-VL share, plus each one's own keys."""
    return dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_heads=VISION_HEADS,
        in_channels=CHANNELS,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH,
        out_hidden_size=TEXT_HIDDEN,
        **extra,
    )


def tiny_qwen2_5_vl_config(num_layers: int = 2) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=_qwen_text_config(num_hidden_layers=num_layers),
        vision_config=_qwen_vision_config(
            window_size=QWEN_PATCH * QWEN_MERGE * 2,
            fullatt_block_indexes=[VISION_DEPTH - 1],
        ),
        image_token_id=TINY_TOKENS.image,
        video_token_id=TINY_TOKENS.video,
        vision_start_token_id=TINY_TOKENS.vision_start,
        vision_end_token_id=TINY_TOKENS.vision_end,
        tie_word_embeddings=False,
    )


def tiny_qwen3_vl_config(num_layers: int = 2) -> Qwen3VLConfig:
    text = _qwen_text_config(num_hidden_layers=num_layers, head_dim=TEXT_HEAD_DIM)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config=text,
        vision_config=_qwen_vision_config(
            num_position_embeddings=QWEN3_POSITION_EMBEDDINGS,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=TINY_TOKENS.image,
        video_token_id=TINY_TOKENS.video,
        vision_start_token_id=TINY_TOKENS.vision_start,
        vision_end_token_id=TINY_TOKENS.vision_end,
        tie_word_embeddings=False,
    )


def tiny_llava_onevision_config(num_layers: int = 2) -> LlavaOnevisionConfig:
    text = _qwen_text_config(num_hidden_layers=num_layers, model_type="qwen2")
    text.pop("rope_parameters")
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTERMEDIATE,
            num_hidden_layers=VISION_DEPTH,
            num_attention_heads=VISION_HEADS,
            num_channels=CHANNELS,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
            vision_use_head=False,
        ),
        image_token_index=TINY_TOKENS.image,
        video_token_index=TINY_TOKENS.video,
        image_grid_pinpoints=[[LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


CONFIG_BUILDERS = {
    "qwen2_5_vl": (tiny_qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (tiny_qwen3_vl_config, Qwen3VLForConditionalGeneration),
    "llava_onevision": (tiny_llava_onevision_config, LlavaOnevisionForConditionalGeneration),
}


def build_tiny_model(arch: str, *, num_layers: int = 2, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny fp32 model of ``arch`` (one of ``ARCHS``) in eval mode with reproducible random weights."""
    if arch not in CONFIG_BUILDERS:
        raise ValueError(f"arch must be one of {ARCHS}; got {arch!r}")
    make_config, model_class = CONFIG_BUILDERS[arch]
    config = make_config(num_layers)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def image_token_count(arch: str, grid: ImageGrid = ImageGrid(), images_in_sample: int = 1) -> int:
    """Placeholder tokens one image occupies in the text sequence."""
    if arch == "llava_onevision":
        side = LLAVA_IMAGE_SIZE // LLAVA_PATCH
        if images_in_sample == 1:
            # anyres with one 1x1 crop: the base view, then the crop again with a newline per row.
            return side * side + side * (side + 1)
        # several images in a sample: base view only, plus one trailing newline.
        return side * side + 1
    return (grid.height // QWEN_MERGE) * (grid.width // QWEN_MERGE)


@dataclass
class SampleLayout:
    """Token counts of one sample: ``prefix`` text, then per image ``[start, image..., end]`` followed by
    ``between`` text, then the latents, ``suffix`` text and ``answer`` tokens."""

    num_images: int = 1
    prefix: int = 3
    between: int = 2
    num_latents: int = len(TINY_TOKENS.latents)
    suffix: int = 2
    answer: int = 3


@dataclass
class BatchSpec:
    layouts: Sequence[SampleLayout] = field(default_factory=lambda: [SampleLayout(), SampleLayout()])
    padding_side: str = "left"
    grid: ImageGrid = field(default_factory=ImageGrid)


def _random_text(n: int, generator: torch.Generator) -> list:
    return torch.randint(1, TINY_TOKENS.first_special, (n,), generator=generator).tolist()


def _sample_ids(arch: str, layout: SampleLayout, grid: ImageGrid, generator: torch.Generator):
    ids, answer_mask = [], []

    def add(tokens, is_answer=False):
        ids.extend(tokens)
        answer_mask.extend([is_answer] * len(tokens))

    add(_random_text(layout.prefix, generator))
    per_image = image_token_count(arch, grid, layout.num_images)
    for _ in range(layout.num_images):
        add([TINY_TOKENS.vision_start] + [TINY_TOKENS.image] * per_image + [TINY_TOKENS.vision_end])
        add(_random_text(layout.between, generator))
    add(list(TINY_TOKENS.latents[: layout.num_latents]))
    add(_random_text(layout.suffix, generator))
    add(_random_text(layout.answer, generator), is_answer=True)
    return ids, answer_mask


def make_pixels(arch: str, num_images: int, grid: ImageGrid = ImageGrid(), seed: int = 0) -> Dict[str, torch.Tensor]:
    """Vision inputs for ``num_images`` images: pixel_values plus image_grid_thw (Qwen) or image_sizes (LLaVA-OV)."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "llava_onevision":
        # (images, crops = base + one anyres crop, C, H, W)
        pixels = torch.randn(num_images, 2, CHANNELS, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=generator)
        sizes = torch.tensor([[LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE]] * num_images)
        return {"pixel_values": pixels, "image_sizes": sizes}
    patch_numel = CHANNELS * QWEN_TEMPORAL_PATCH * QWEN_PATCH * QWEN_PATCH
    pixels = torch.randn(num_images * grid.height * grid.width, patch_numel, generator=generator)
    thw = torch.tensor([[1, grid.height, grid.width]] * num_images)
    return {"pixel_values": pixels, "image_grid_thw": thw}


def make_batch(arch: str, spec: Optional[BatchSpec] = None, *, seed: int = 0, pixel_seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Model inputs for a LIVR-shaped batch: input_ids, attention_mask, labels (answer tokens only),
    vision inputs, and ``mm_token_type_ids`` for the Qwen models. ``pixel_seed`` (default ``seed``)
    changes the images alone, keeping every token identical."""
    spec = spec or BatchSpec()
    if spec.padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {spec.padding_side!r}")
    generator = torch.Generator().manual_seed(seed)
    samples = [_sample_ids(arch, layout, spec.grid, generator) for layout in spec.layouts]
    length = max(len(ids) for ids, _ in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), TINY_TOKENS.pad, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, answer) in enumerate(samples):
        n = len(ids)
        span = slice(length - n, length) if spec.padding_side == "left" else slice(0, n)
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
        labels[row, span] = torch.where(torch.tensor(answer), torch.tensor(ids), IGNORE_INDEX)
    num_images = sum(layout.num_images for layout in spec.layouts)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if num_images:
        out.update(make_pixels(arch, num_images, spec.grid, seed if pixel_seed is None else pixel_seed))
    if arch == "llava_onevision":
        if num_images:
            out["batch_num_images"] = torch.tensor([layout.num_images for layout in spec.layouts])
    else:
        out["mm_token_type_ids"] = (input_ids == TINY_TOKENS.image).long()
    return out


def prompt_only(batch: Dict[str, torch.Tensor], answer_len: int) -> Dict[str, torch.Tensor]:
    """The batch without its last ``answer_len`` positions and labels: a left-padded generation prompt."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out:
            out[key] = out[key][:, :-answer_len]
    return out


def image_token_ids() -> tuple:
    return (TINY_TOKENS.image, TINY_TOKENS.video)


def text_position_ids(model, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The position_ids the model hands its language model for ``batch`` (with its 2-D padding mask).

    Passing them explicitly lets a run with a 4-D mask use the same positions (Qwen's M-RoPE
    otherwise reads the 2-D mask to place them). None when the model leaves positions to the
    language model (LLaVA-OneVision)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["position_ids"] = kwargs.get("position_ids")

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
    return seen["position_ids"]


def explicit_mask_inputs(
    model, batch: Dict[str, torch.Tensor], segment_ids: torch.Tensor, rule, doc_ids=None, *, additive: bool = True
) -> Dict[str, torch.Tensor]:
    """Inputs for an *unpatched* model that apply ``rule`` as an explicit 4-D mask (B, 1, N, N) built
    by ``livr_kernels.segment_mask``: the reference the patched model must equal.

    ``additive`` (0 / dtype min, the default) rather than boolean: a fully masked row (PAD) then
    stays finite; with a boolean mask SDPA turns it into NaN, which leaks into every later
    layer through the values. Boolean masks are fine for batches without padding."""
    from livr_kernels import segment_mask

    dtype = next(model.parameters()).dtype
    allowed = segment_mask(segment_ids, rule, doc_ids)[:, None]
    mask = allowed
    if additive:
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    out = dict(batch)
    positions = text_position_ids(model, batch)
    out["attention_mask"] = mask
    if positions is not None:
        out["position_ids"] = positions
    return out
