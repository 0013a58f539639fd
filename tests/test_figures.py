"""Figures: written as PNGs, and different inputs give different pictures."""
import torch
from PIL import Image

from livr_model.app.data import make_synthetic_dataset
from livr_model.app.figures import draw_heatmap, draw_study_bars, draw_training_curves


def test_heatmap_per_latent_panels_differ_with_the_attention(tmp_path):
    example = make_synthetic_dataset("counting", 1, seed=0)[0]
    first = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(0))
    second = first.flip(-1)
    a = draw_heatmap(example.images, [first], tmp_path / "a.png", title="layer mean, rule standard, example 1")
    b = draw_heatmap(example.images, [second], tmp_path / "b.png", title="layer mean, rule standard, example 1")
    with Image.open(a) as png:
        # The input image plus 4 latents plus their mean, side by side.
        assert png.width > 4 * png.height
    assert a.read_bytes() != b.read_bytes()


def test_training_curves_differ_with_the_losses(tmp_path):
    steps = [{"step": i + 1, "stage": "stage1" if i < 10 else "stage2", "loss": 1.0 / (i + 1)} for i in range(20)]
    epochs = [{"global_step": 10, "stage": "stage1", "val_accuracy": 0.4}, {"global_step": 20, "stage": "stage2", "val_accuracy": 0.7}]
    a = draw_training_curves(steps, epochs, tmp_path / "a.png", chance=0.25)
    flat = [dict(s, loss=0.5) for s in steps]
    b = draw_training_curves(flat, epochs, tmp_path / "b.png", chance=0.25)
    assert a.read_bytes().startswith(b"\x89PNG") and a.read_bytes() != b.read_bytes()


def test_study_bars_differ_with_the_numbers(tmp_path):
    rows = [{"task": "counting", "mode": m, "seeds": 2, "accuracy_mean": v, "accuracy_std": 0.05}
            for m, v in (("sft", 0.5), ("livr", 0.7))]
    a = draw_study_bars(rows, tmp_path / "a.png", chance={"counting": 0.25})
    b = draw_study_bars([dict(r, accuracy_mean=0.3) for r in rows], tmp_path / "b.png", chance={"counting": 0.25})
    assert a.read_bytes() != b.read_bytes()
