"""Image resolution: --min-pixels / --max-pixels (and the multi-image limit) reach the processor and
change the sequence, and the run records them."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from livr_model.app.cli import load_config_file, resolve_train_config
from livr_model.app.config import TrainConfig
from livr_model.app.models import make_encoder
from livr_model.app.train import train
from livr_model.images import image_size_kwargs
from livr_model.prompts import Example
from livr_model.app.state import RUN_CONFIG_JSON
from livr_model.app.tiny import MERGE_SIZE, PATCH_SIZE
from test_train import tiny_config, tiny_data, tiny_setup

# One image token per merged patch: TOKEN_SIDE x TOKEN_SIDE pixels.
TOKEN_SIDE = PATCH_SIZE * MERGE_SIZE
BIG = 4 * TOKEN_SIDE


def _example(num_images):
    images = [Image.new("RGB", (BIG, BIG), (40 * i, 90, 160)) for i in range(num_images)]
    return Example(images=images, question="Which image is brighter?", choices=["first", "second"], answer="A", task="t")


def _image_tokens(encoder, example):
    enc = encoder.encode(example, with_answer=False)
    return int(torch.isin(enc["input_ids"], torch.tensor(encoder.image_token_ids)).sum()), enc["input_ids"].numel()


def test_pixel_limits_reach_the_processor():
    model, processor = tiny_setup()
    default_max = processor.image_processor.size["longest_edge"]
    counts = {}
    for name, limits in {"default": {}, "max": dict(max_pixels=BIG * BIG),
                         "both": dict(min_pixels=(2 * BIG) ** 2, max_pixels=(2 * BIG) ** 2)}.items():
        cfg = TrainConfig(data="x", mode="sft", **limits)
        counts[name] = _image_tokens(make_encoder(cfg, model, processor, ()), _example(1))
    # The processor's own bound shrinks the BIG x BIG image; max_pixels lets it through; min_pixels enlarges it.
    assert default_max < BIG * BIG and counts["default"][0] == default_max // TOKEN_SIDE ** 2
    assert counts["max"][0] == 16 and counts["both"][0] == 64
    # The sequence grows by exactly the extra image tokens.
    assert counts["both"][1] - counts["default"][1] == 64 - counts["default"][0]


def test_multi_image_limit_applies_to_multi_image_questions_only():
    model, processor = tiny_setup()
    cfg = TrainConfig(data="x", mode="sft", max_pixels=BIG * BIG, multi_image_max_pixels=(2 * TOKEN_SIDE) ** 2)
    encoder = make_encoder(cfg, model, processor, ())
    assert _image_tokens(encoder, _example(1))[0] == 16
    assert _image_tokens(encoder, _example(2))[0] == 2 * 4


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_pixels=100 is below min_pixels=200"):
        TrainConfig(data="x", min_pixels=200, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels"):
        TrainConfig(data="x", max_pixels=0)
    other = SimpleNamespace(image_processor=SimpleNamespace(size={"shortest_edge": 224}))
    with pytest.raises(ValueError, match="Qwen-style image processor"):
        image_size_kwargs(other, max_pixels=1000)
    assert image_size_kwargs(other) == {}


def test_the_run_records_and_uses_its_limits(tmp_path):
    cfg, _ = resolve_train_config(["--data", "synthetic:counting", "--min-pixels", "784", "--max-pixels", "3136",
                                   "--multi-image-max-pixels", "1568"])
    assert (cfg.min_pixels, cfg.max_pixels, cfg.multi_image_max_pixels) == (784, 3136, 1568)
    model, processor = tiny_setup()
    train_examples, val_examples = tiny_data()
    result = train(tiny_config(tmp_path, max_pixels=(2 * TOKEN_SIDE) ** 2, stage_epochs=(1, 0), max_steps=1),
                   model=model, processor=processor, train_examples=train_examples, val_examples=val_examples)
    assert json.loads((tmp_path / RUN_CONFIG_JSON).read_text())["max_pixels"] == (2 * TOKEN_SIDE) ** 2
    assert result.encoder.max_pixels == (2 * TOKEN_SIDE) ** 2


def test_the_3b_example_sets_the_limits():
    cfg = TrainConfig(data="x", **load_config_file(Path(__file__).resolve().parents[1] / "examples" / "livr_qwen2_5_vl_3b.yaml"))
    assert cfg.min_pixels and cfg.max_pixels and cfg.multi_image_max_pixels
    assert cfg.min_pixels <= cfg.multi_image_max_pixels <= cfg.max_pixels
