"""build_segment_ids and the architecture table."""
import re

import pytest
import torch
from transformers import PretrainedConfig

from livr_kernels import Segment
from livr_model import ARCHS, ArchSpec, build_segment_ids, get_arch, register_arch
from livr_model.archs import LORA_PROJECTIONS
from tiny_models import ARCHS as TINY_ARCHS
from tiny_models import TINY_TOKENS, build_tiny_model, image_token_ids

T, I, L, A, P = (int(s) for s in (Segment.TEXT, Segment.IMAGE, Segment.LATENT, Segment.ANSWER, Segment.PAD))
VS, VE, IMG, VID = TINY_TOKENS.vision_start, TINY_TOKENS.vision_end, TINY_TOKENS.image, TINY_TOKENS.video
LAT = TINY_TOKENS.latents[:2]


def _segments(input_ids, labels=None, attention_mask=None):
    return build_segment_ids(
        torch.tensor(input_ids),
        image_token_ids=image_token_ids(),
        latent_token_ids=LAT,
        labels=None if labels is None else torch.tensor(labels),
        attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
    )


def test_kinds_with_left_and_right_padding():
    x = -100
    ids = [
        [0, 0, 5, VS, IMG, IMG, VE, 6, LAT[0], LAT[1], 7, 8, 9],
        [5, VS, VID, VID, VE, 6, LAT[0], LAT[1], 7, 8, 9, 0, 0],
    ]
    labels = [
        [x, x, x, x, x, x, x, x, x, x, x, 8, 9],
        [x, x, x, x, x, x, x, x, x, 8, 9, x, x],
    ]
    mask = [[0, 0] + [1] * 11, [1] * 11 + [0, 0]]
    expected = [
        [P, P, T, T, I, I, T, T, L, L, T, A, A],
        [T, T, I, I, T, T, L, L, T, A, A, P, P],
    ]
    got = _segments(ids, labels, mask)
    assert got.dtype == torch.long
    assert got.tolist() == expected


def test_placeholders_and_latents_keep_their_kind_when_supervised_and_pad_wins():
    ids = [[VS, IMG, VE, LAT[0], 7, 0]]
    labels = [[VS, IMG, VE, LAT[0], 7, 0]]
    mask = [[1, 1, 1, 1, 1, 0]]
    assert _segments(ids, labels, mask).tolist() == [[A, I, A, L, A, P]]


def test_without_labels_or_mask_everything_else_is_text():
    assert _segments([[1, IMG, 2, LAT[1], 0]]).tolist() == [[T, I, T, L, T]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.ones(3, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.ones(1, 3)), "integer dtype"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)), "labels"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(2, 3)), "attention_mask"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), latent_token_ids=(IMG,)), "disjoint"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), latent_token_ids="abc"), "latent_token_ids"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), latent_token_ids=[1.5]), "latent_token_ids"),
    ],
)
def test_bad_inputs_are_value_errors(kwargs, match):
    args = dict(image_token_ids=image_token_ids(), latent_token_ids=LAT)
    args.update(kwargs)
    input_ids = args.pop("input_ids")
    with pytest.raises(ValueError, match=match):
        build_segment_ids(input_ids, **args)


def test_table_has_every_promised_architecture():
    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "llavaonevision1_5"):
        assert ARCHS[model_type].model_type == model_type


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_spec_reads_token_ids_from_the_config(arch):
    model = build_tiny_model(arch)
    spec = get_arch(model)
    assert spec is get_arch(model.config) is ARCHS[arch]
    assert spec.placeholder_token_ids(model.config) == (IMG, VID)
    assert spec.text_config(model.config) is model.config.text_config
    expected_markers = () if arch == "llava_onevision" else (VS, VE)
    assert spec.marker_token_ids(model.config) == expected_markers


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lora_regex_hits_only_language_model_projections(arch):
    model = build_tiny_model(arch)
    pattern = re.compile(get_arch(model).lora_target_regex)
    hits = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
    num_layers = model.config.text_config.num_hidden_layers
    assert len(hits) == num_layers * len(LORA_PROJECTIONS)
    assert all(".language_model." in name for name in hits)
    # Qwen2.5-VL's vision MLP and SigLIP's attention reuse these names: a plain list would hit them.
    vision_linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "language_model" not in name and name.split(".")[-1] in LORA_PROJECTIONS
    ]
    assert bool(vision_linears) == (arch != "qwen3_vl")
    assert pattern.fullmatch("base_model.model." + hits[0])


class _RemoteVlmConfig(PretrainedConfig):
    model_type = "llavaonevision_remote_test"

    def __init__(self, image_token_id=151655, **kwargs):
        super().__init__(**kwargs)
        self.text_config = PretrainedConfig()
        self.image_token_id = image_token_id


class _UnknownConfig(PretrainedConfig):
    model_type = "unknown_vlm_test"


def test_generic_fallback_for_remote_code_models():
    spec = get_arch(_RemoteVlmConfig())
    assert spec.generic and spec.model_type == "llavaonevision_remote_test"
    assert spec.placeholder_token_ids(_RemoteVlmConfig()) == (151655,)
    assert spec.marker_token_ids(_RemoteVlmConfig()) == ()


def test_unknown_architecture_error_lists_supported_and_how_to_add():
    with pytest.raises(ValueError) as info:
        get_arch(_UnknownConfig())
    message = str(info.value)
    assert "unknown_vlm_test" in message and "qwen2_5_vl" in message and "llava_onevision" in message
    assert "register_arch" in message


def test_missing_image_token_id_is_a_value_error():
    config = _RemoteVlmConfig(image_token_id=None)
    with pytest.raises(ValueError, match="image token id"):
        ARCHS["qwen2_5_vl"].placeholder_token_ids(config)


def test_register_arch():
    spec = ArchSpec(model_type="unknown_vlm_test", image_token_attrs=("image_token_index",), marker_token_attrs=())
    try:
        assert register_arch(spec) is spec
        assert get_arch(_UnknownConfig()) is spec
        with pytest.raises(ValueError, match="already registered"):
            register_arch(spec)
    finally:
        ARCHS.pop("unknown_vlm_test", None)
    with pytest.raises(ValueError, match="ArchSpec"):
        register_arch("qwen2_5_vl")
