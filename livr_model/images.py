"""Image sizes: what a processor can tile, and the per-image pixel bounds handed to it."""
from __future__ import annotations

from typing import Optional

# Qwen's smart_resize refuses images more elongated than this.
MAX_ASPECT_RATIO = 200


def check_image_sizes(processor, images, what: str = "an example") -> None:
    """Reject images the processor cannot tile: sides under one merged patch, or extreme aspect ratios."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    for index, image in enumerate(images):
        width, height = image.size
        if isinstance(patch, int) and isinstance(merge, int):
            minimum = patch * merge
            if min(width, height) < minimum:
                raise ValueError(
                    f"images[{index}] of {what} is {width}x{height}; this processor needs "
                    f"both sides >= {minimum} pixels (patch {patch} x merge {merge})"
                )
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise ValueError(f"images[{index}] is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO} are not supported")


def image_size_kwargs(processor, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> dict:
    """Processor-call keywords that bound each image to [min_pixels, max_pixels] pixels (Qwen-style
    image processors, which resize to a multiple of patch x merge within those bounds); {} if both
    are None. The processor's own default fills a bound that is not given."""
    if min_pixels is None and max_pixels is None:
        return {}
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "merge_size", None) is None or size is None:
        raise ValueError(
            f"min_pixels/max_pixels need a Qwen-style image processor (pixel-count bounds, as in Qwen2-VL, Qwen2.5-VL, "
            f"Qwen3-VL and LLaVA-OneVision-1.5); {type(image_processor).__name__} resizes differently"
        )
    bounds = {"shortest_edge": size["shortest_edge"] if min_pixels is None else int(min_pixels),
              "longest_edge": size["longest_edge"] if max_pixels is None else int(max_pixels)}
    if bounds["shortest_edge"] > bounds["longest_edge"]:
        raise ValueError(f"min_pixels {bounds['shortest_edge']} exceeds max_pixels {bounds['longest_edge']}")
    return {"images_kwargs": {"size": bounds}}
