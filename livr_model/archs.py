"""Per-architecture facts as data: one ``ArchSpec`` per ``model_type``.

Everything livr needs to know about a vision-language model that differs between families lives
in ``ARCHS``: which sub-config holds the language model, which config attributes name the image
and video placeholder ids and the vision start/end markers, and where the language model's
projections sit (for LoRA targeting). ``patch_attention`` and the trainer only read this table.

Adding a model is one entry: ``register_arch(ArchSpec(model_type="my_vlm", ...))`` (or a line in
``ARCHS``), naming the config attributes of its image/video token ids. The text layers must call
transformers' attention registry (``ALL_ATTENTION_FUNCTIONS``), as every model in transformers and
most remote-code models built on them do.

Generic fallback: a model whose ``model_type`` is not in the table but whose config has a
``text_config`` and an ``image_token_id`` gets ``GENERIC_SPEC`` (the Qwen layout: start/end markers
around runs of image placeholders, language model under ``language_model``). That covers
remote-code models such as LLaVA-OneVision-1.5 (``llavaonevision1_5``: RICE-ViT + Qwen3 text,
image token 151655), which is also listed explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

# The language model's linear projections LoRA tunes (attention and MLP), per the paper's setup.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """What livr needs to know about one vision-language architecture.

    ``text_config_key``: the sub-config (and ``set_attn_implementation`` key) of the language model.
    ``image_token_attrs`` / ``video_token_attrs``: config attributes holding the placeholder ids; the
    first present one wins; an image id is required, a video id is optional.
    ``marker_token_attrs``: config attributes of vision start/end markers (segment TEXT; may be absent).
    ``language_model_module``: a module-path fragment that only the language model's modules contain.
    """

    model_type: str
    text_config_key: str = "text_config"
    image_token_attrs: Tuple[str, ...] = ("image_token_id",)
    video_token_attrs: Tuple[str, ...] = ("video_token_id",)
    marker_token_attrs: Tuple[str, ...] = ("vision_start_token_id", "vision_end_token_id")
    language_model_module: str = "language_model"
    generic: bool = False

    @property
    def lora_target_regex(self) -> str:
        """A peft ``target_modules`` regex: the language model's q/k/v/o/gate/up/down projections only.

        A plain list of names would also hit the vision tower (its MLP, and SigLIP's q/k/v).
        """
        names = "|".join(LORA_PROJECTIONS)
        return rf".*{self.language_model_module}.*\.({names})"

    def text_config(self, config):
        text = getattr(config, self.text_config_key, None)
        if text is None:
            raise ValueError(
                f"{self.model_type} config has no {self.text_config_key!r} sub-config; the ArchSpec for this "
                "model must name the sub-config that holds the language model"
            )
        return text

    def image_token_id(self, config) -> int:
        found = _first_attr(config, self.image_token_attrs)
        if found is None:
            raise ValueError(
                f"the {self.model_type} config has no image token id (looked for {list(self.image_token_attrs)}); "
                "set it on the config (e.g. config.image_token_id = tokenizer.convert_tokens_to_ids('<|image_pad|>'))"
            )
        return found

    def video_token_id(self, config):
        return _first_attr(config, self.video_token_attrs)

    def placeholder_token_ids(self, config) -> Tuple[int, ...]:
        """Image then (when the config has one) video placeholder ids: the tokens of kind IMAGE."""
        ids = [self.image_token_id(config)]
        video = self.video_token_id(config)
        if video is not None and video not in ids:
            ids.append(video)
        return tuple(ids)

    def marker_token_ids(self, config) -> Tuple[int, ...]:
        """Vision start/end markers present in the config (they stay TEXT)."""
        return tuple(v for v in (getattr(config, a, None) for a in self.marker_token_attrs) if v is not None)


def _first_attr(config, names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


GENERIC_SPEC = ArchSpec(model_type="generic", generic=True)

ARCHS: Dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec(model_type="qwen2_vl"),
        ArchSpec(model_type="qwen2_5_vl"),
        ArchSpec(model_type="qwen3_vl"),
        ArchSpec(model_type="qwen3_vl_moe"),
        # LLaVA-OneVision puts no start/end markers around images; its newline embeddings sit on
        # image placeholder positions, so they are IMAGE too.
        ArchSpec(
            model_type="llava_onevision",
            image_token_attrs=("image_token_id", "image_token_index"),
            video_token_attrs=("video_token_id", "video_token_index"),
            marker_token_attrs=(),
        ),
        # Remote code (trust_remote_code=True); the Qwen layout. Spelled both ways seen in the wild.
        replace(GENERIC_SPEC, model_type="llavaonevision1_5"),
        replace(GENERIC_SPEC, model_type="llava_onevision1_5"),
    )
}


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add an architecture to ``ARCHS`` (for models this package does not list)."""
    if not isinstance(spec, ArchSpec):
        raise ValueError(f"spec must be an ArchSpec; got {type(spec).__name__}")
    if spec.model_type in ARCHS and not overwrite:
        raise ValueError(f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace it")
    ARCHS[spec.model_type] = spec
    return spec


def tokenizer_of(processor):
    """The tokenizer inside a processor (or the tokenizer itself when given one)."""
    return getattr(processor, "tokenizer", processor)


def _config_of(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise ValueError(
            f"model_or_config must be a transformers model or config (with .model_type); got {type(model_or_config).__name__}"
        )
    return config


def get_arch(model_or_config) -> ArchSpec:
    """The ``ArchSpec`` for a model, a peft-wrapped model, or a config.

    Unknown model types fall back to ``GENERIC_SPEC`` when the config looks like the Qwen layout (a
    ``text_config`` sub-config and an ``image_token_id``); anything else is a ValueError.
    """
    if hasattr(model_or_config, "get_base_model"):
        model_or_config = model_or_config.get_base_model()
    config = _config_of(model_or_config)
    model_type = config.model_type
    if model_type in ARCHS:
        return ARCHS[model_type]
    if getattr(config, "text_config", None) is not None and getattr(config, "image_token_id", None) is not None:
        return replace(GENERIC_SPEC, model_type=model_type)
    raise ValueError(
        f"unsupported model_type {model_type!r}: livr knows {sorted(ARCHS)} and, generically, any model whose "
        "config has a text_config and an image_token_id. To add one, register an entry naming its config "
        "attributes, e.g. livr_model.archs.register_arch(ArchSpec(model_type="
        f"{model_type!r}, image_token_attrs=('image_token_index',), marker_token_attrs=())); its text layers "
        "must dispatch attention through transformers' AttentionInterface"
    )
