"""Per-architecture facts as data: one ``ArchSpec`` per ``model_type``.

Everything livr needs to know about a vision-language model that differs between families lives
in ``ARCHS``: which sub-config holds the language model, which config attributes name the image
and video placeholder ids and the vision start/end markers, where the language model's
projections sit (for LoRA targeting), and how its text attention is reached. ``patch_attention``
and the trainer only read this table.

Two ways in. Models whose text layers call transformers' attention registry
(``ALL_ATTENTION_FUNCTIONS``: every model in transformers) are switched to the ``"livr"`` backend.
Models that pick their attention through their own class table instead (LLaVA-OneVision-1.5's
remote code) name a ``ModulePatch``: ``livr_model.fallback`` then replaces the forward of each
text attention module, and ``remove()`` puts it back.

``llavaonevision1_5`` is tested on a module tree that mirrors its public remote code (attention
class table, Qwen3-style q/k norms, 1-D rotary embedding, ``(out, weights, cache)`` returns); the
real checkpoint has not been loaded here. ``qwen3_5`` is refused (see ``UNSUPPORTED``).

Generic fallback: a model whose ``model_type`` is not in the table but whose config has a
``text_config`` and an ``image_token_id`` gets ``GENERIC_SPEC`` (the Qwen layout: start/end markers
around runs of image placeholders, language model under ``language_model``), provided every text
layer is a full-attention layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

# The language model's linear projections LoRA tunes (attention and MLP), per the paper's setup.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Text layer kinds an attention mask governs (config.layer_types); any other kind is refused.
MASKABLE_LAYER_TYPES = ("full_attention",)


@dataclass(frozen=True)
class ModulePatch:
    """How ``livr_model.fallback`` reaches text attention that bypasses transformers' registry.

    ``layers``: attribute path from the model to its list of text decoder layers. ``attention``:
    the attention module's attribute on each layer. ``rotary``: name of the function, in the
    attention class's own Python module, that applies the rotary embedding ``(q, k, cos, sin) ->
    (q, k)``. ``qk_norm``: the module normalises each query/key head (``q_norm``/``k_norm``) before
    the rotary embedding, as Qwen3 does. ``returns_cache``: its forward returns ``(output, weights,
    cache)`` rather than ``(output, weights)``.
    """

    layers: str = "model.language_model.layers"
    attention: str = "self_attn"
    rotary: str = "apply_rotary_pos_emb"
    qk_norm: bool = True
    returns_cache: bool = True


@dataclass(frozen=True)
class ArchSpec:
    """What livr needs to know about one vision-language architecture.

    ``text_config_key``: the sub-config (and ``set_attn_implementation`` key) of the language model.
    ``image_token_attrs`` / ``video_token_attrs``: config attributes holding the placeholder ids; the
    first present one wins; an image id is required, a video id is optional.
    ``marker_token_attrs``: config attributes of vision start/end markers (segment TEXT; may be absent).
    ``language_model_module``: a module-path fragment that only the language model's modules contain.
    ``module_patch``: set for models whose text attention does not go through transformers' registry.
    """

    model_type: str
    text_config_key: str = "text_config"
    image_token_attrs: Tuple[str, ...] = ("image_token_id",)
    video_token_attrs: Tuple[str, ...] = ("video_token_id",)
    marker_token_attrs: Tuple[str, ...] = ("vision_start_token_id", "vision_end_token_id")
    language_model_module: str = "language_model"
    generic: bool = False
    module_patch: Optional[ModulePatch] = None

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
        # Remote code (trust_remote_code=True, see livr_model.compat); the Qwen layout, its own
        # attention class table. Spelled both ways seen in the wild.
        replace(GENERIC_SPEC, model_type="llavaonevision1_5", generic=False, module_patch=ModulePatch()),
        replace(GENERIC_SPEC, model_type="llava_onevision1_5", generic=False, module_patch=ModulePatch()),
    )
}

# Architectures livr refuses, with the reason.
LINEAR_ATTENTION_REASON = (
    "{model_type} interleaves Gated DeltaNet linear-attention layers with its full-attention layers; a "
    "linear-attention layer carries every earlier token, image tokens included, to later tokens through its "
    "recurrent state, which no attention mask reaches. Under the LIVR bottleneck, text and answer tokens would "
    "still read the image through those layers, so the bottleneck (and a clean standard-rule comparison) "
    "cannot be enforced; livr does not patch this model"
)
UNSUPPORTED: Dict[str, str] = {
    name: LINEAR_ATTENTION_REASON.format(model_type=name) for name in ("qwen3_5", "qwen3_5_moe")
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


def _check_layer_types(model_type: str, text_config) -> None:
    """Refuse text layers an attention mask cannot govern (linear attention, recurrent state)."""
    kinds = set(getattr(text_config, "layer_types", None) or ()) - set(MASKABLE_LAYER_TYPES)
    if kinds:
        raise ValueError(
            f"{model_type} has text layers of type {sorted(kinds)}; livr can only mask {list(MASKABLE_LAYER_TYPES)} "
            "layers (a linear-attention or recurrent layer passes image information on through its state)"
        )


def get_arch(model_or_config) -> ArchSpec:
    """The ``ArchSpec`` for a model, a peft-wrapped model, or a config.

    Unknown model types fall back to ``GENERIC_SPEC`` when the config looks like the Qwen layout (a
    ``text_config`` sub-config and an ``image_token_id``); anything else is a ValueError.
    """
    if hasattr(model_or_config, "get_base_model"):
        model_or_config = model_or_config.get_base_model()
    config = _config_of(model_or_config)
    model_type = config.model_type
    if model_type in UNSUPPORTED:
        raise ValueError(UNSUPPORTED[model_type])
    if model_type in ARCHS:
        return ARCHS[model_type]
    if getattr(config, "text_config", None) is not None and getattr(config, "image_token_id", None) is not None:
        _check_layer_types(model_type, config.text_config)
        return replace(GENERIC_SPEC, model_type=model_type)
    raise ValueError(
        f"unsupported model_type {model_type!r}: livr knows {sorted(ARCHS)} and, generically, any model whose "
        "config has a text_config and an image_token_id. To add one, register an entry naming its config "
        "attributes, e.g. livr_model.archs.register_arch(ArchSpec(model_type="
        f"{model_type!r}, image_token_attrs=('image_token_index',), marker_token_attrs=())); its text layers "
        "must dispatch attention through transformers' AttentionInterface"
    )
