"""Figures: the latent-to-image attention heatmap drawn over the input images."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .files import atomic_write_bytes

HEATMAP_ALPHA = 0.5
HEATMAP_MIN_SIDE = 224
HEATMAP_GAP = 8
# Colour stops of the heatmap palette, low to high attention: blue, cyan, yellow, red.
HEATMAP_STOPS = ((0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0))
PALETTE_LEVELS = 256


def _heat_palette() -> list:
    palette = []
    segments = len(HEATMAP_STOPS) - 1
    for level in range(PALETTE_LEVELS):
        position = level / (PALETTE_LEVELS - 1) * segments
        index = min(int(position), segments - 1)
        frac = position - index
        low, high = HEATMAP_STOPS[index], HEATMAP_STOPS[index + 1]
        palette.extend(round(a + (b - a) * frac) for a, b in zip(low, high))
    return palette


def draw_heatmap(images: Sequence, maps: Sequence[torch.Tensor], path) -> Path:
    """Each attention map, min-max scaled over all maps, upsampled and blended over its image
    (blue = least, red = most attended); panels side by side; written as a PNG."""
    if len(images) != len(maps):
        raise ValueError(f"images and maps must pair up; got {len(images)} images and {len(maps)} maps")
    low = min(float(m.min()) for m in maps)
    span = max(float(m.max()) for m in maps) - low
    palette = _heat_palette()
    panels = []
    for image, heat in zip(images, maps):
        base = image.convert("RGB")
        scale = max(1, math.ceil(HEATMAP_MIN_SIDE / max(base.size)))
        base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
        scaled = (heat - low) / span if span > 0 else torch.zeros_like(heat)
        levels = scaled.clamp(0, 1).mul(PALETTE_LEVELS - 1).round().to(torch.uint8).numpy()
        colored = Image.fromarray(levels, mode="L").resize(base.size, Image.BILINEAR).convert("P")
        colored.putpalette(palette)
        panels.append(Image.blend(base, colored.convert("RGB"), HEATMAP_ALPHA))
    width = sum(p.width for p in panels) + HEATMAP_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + HEATMAP_GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
