"""``livr-data`` builders: BLINK-format training sets from sources a user has locally.

One registry entry per task (named as BLINK names it, case-insensitive, ``-`` or ``_``):

=========================  ==========================================  ==========================
task                       source                                      images per question
=========================  ==========================================  ==========================
Counting                   COCO instances JSON (+ ``images``)          1, 4 choices
Object_Localization        COCO instances JSON (+ ``images``)          1 (two boxes), 2 choices
Jigsaw                     any image folder                            3, 2 choices
Visual_Correspondence      any image folder                            2, 4 choices
Visual_Similarity          any image folder                            3, 2 choices
Semantic_Correspondence    SPair-71k root (or pair-JSON folder)        2, 4 choices
=========================  ==========================================  ==========================

``build`` assigns every source image to one split (train/val/test, by the seed and fractions),
makes each split's questions from its own images only, balances the answer letters, and writes
the result with ``common.write_build``. Same arguments, same files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

from . import coco, image_folder, spair
from .common import (DEFAULT_FRACTIONS, DEFAULT_MAX_SIDE, DEFAULT_SIZE, IMAGE_FORMATS, SPLITS, BuildError, assign_splits,
                     parse_fractions, prepare_out_dir, split_rng, split_sizes, write_build)


@dataclass(frozen=True)
class BuilderSpec:
    """One task: how to open its source, which source images it can use, how to make questions."""

    task: str
    source_kind: str
    open_source: Callable
    usable_ids: Callable
    generate: Callable
    description: str
    # Source images each split needs at least (two for tasks that pair a photo with another one).
    min_per_split: int = 1
    # Keyword options of ``build`` this task's generator takes (and the manifest records).
    options: tuple = ()


def _coco(kind):
    return lambda source: coco.usable_image_ids(source, kind)


BUILDERS: Dict[str, BuilderSpec] = {
    spec.task: spec
    for spec in (
        BuilderSpec("Counting", "coco", coco.CocoSource, _coco("counting"), coco.build_counting,
                    "how many instances of a category, 0 for an absent one (COCO instances + image folder)"),
        BuilderSpec("Object_Localization", "coco", coco.CocoSource, _coco("localization"), coco.build_localization,
                    "which of two labelled boxes localizes the object (COCO instances + image folder)"),
        BuilderSpec("Jigsaw", "image_folder", image_folder.ImageFolderSource, lambda s: s.image_ids(),
                    image_folder.build_jigsaw, "which candidate fills the cut-out corner (any image folder)",
                    min_per_split=2),
        BuilderSpec("Visual_Correspondence", "image_folder", image_folder.ImageFolderSource, lambda s: s.image_ids(),
                    image_folder.build_visual_correspondence,
                    "which circled point is the reference point after a random homography (any image folder)",
                    options=("lighting",)),
        BuilderSpec("Visual_Similarity", "image_folder", image_folder.ImageFolderSource, lambda s: s.image_ids(),
                    image_folder.build_visual_similarity,
                    "which augmented candidate comes from the reference photo (any image folder)", min_per_split=2),
        BuilderSpec("Semantic_Correspondence", "spair", spair.SpairSource, lambda s: s.image_ids(),
                    spair.build_semantic_correspondence,
                    "which circled keypoint matches the reference keypoint (SPair-71k pair annotations)", min_per_split=2),
    )
}
TASKS = tuple(BUILDERS)


def resolve_task(name: str) -> BuilderSpec:
    """The builder for ``name``: ``counting``, ``Counting``, ``visual-correspondence`` all work."""
    by_key = {task.lower(): spec for task, spec in BUILDERS.items()}
    key = str(name).strip().lower().replace("-", "_")
    if key not in by_key:
        raise BuildError(f"task must be one of {list(TASKS)} (case-insensitive); got {name!r}")
    return by_key[key]


def open_source(spec: BuilderSpec, source, images=None, max_side: Optional[int] = None):
    if spec.source_kind == "image_folder":
        if images is not None:
            raise BuildError(f"{spec.task} reads images from --source; --images is only for COCO and SPair sources")
        return spec.open_source(source, max_side=max_side)
    return spec.open_source(source, images, max_side=max_side)


def build(task: str, source, out_dir, *, images=None, size: int = DEFAULT_SIZE, seed: int = 0,
          fractions: Sequence[float] = DEFAULT_FRACTIONS, max_side: Optional[int] = DEFAULT_MAX_SIDE,
          lighting: bool = True, image_format: str = "png", overwrite: bool = False) -> dict:
    """Build ``task`` from ``source`` into ``out_dir``; returns the manifest written there.

    ``size`` counts training questions; val and test get sizes in the ratio of ``fractions``.
    Source images are shrunk to ``max_side`` (longer side) first; ``None`` keeps them as they are.
    ``image_format``: ``png`` (lossless: marks keep their exact colours) or ``jpg`` (smaller).
    ``out_dir`` must be empty or missing, or hold a previous build and ``overwrite`` be set.
    A split may come out smaller than asked when the source runs out of distinct questions (COCO
    pairs and objects are used once each); the manifest records asked and written counts.
    """
    spec = resolve_task(task)
    if image_format not in IMAGE_FORMATS:
        raise BuildError(f"image_format must be one of {sorted(IMAGE_FORMATS)}; got {image_format!r}")
    fractions = parse_fractions(fractions)
    sizes = split_sizes(size, fractions)
    minimum_side = image_folder.MIN_SOURCE_SIDE
    if max_side is not None and (not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < minimum_side):
        raise BuildError(f"max_side must be an int >= {minimum_side} or None; got {max_side!r}")
    prepare_out_dir(out_dir, overwrite)
    handle = open_source(spec, source, images, max_side)
    usable = spec.usable_ids(handle)
    if not usable:
        raise BuildError(f"{source}: no usable source image for {spec.task} (see the builder's filters in its module)")
    split_of = assign_splits(usable, fractions, seed, spec.min_per_split)
    options = {name: value for name, value in {"lighting": lighting}.items() if name in spec.options}
    by_split = {}
    for split in SPLITS:
        ids = sorted(image_id for image_id, value in split_of.items() if value == split)
        if sizes[split] == 0 or not ids:
            by_split[split] = []
            continue
        by_split[split] = spec.generate(handle, ids, sizes[split], split_rng(spec.task, seed, split), spec.task, **options)
    settings = {"seed": seed, "size": size, "fractions": list(fractions), "source": str(source),
                "images": None if images is None else str(images), "max_side": max_side,
                "image_format": image_format, **options}
    return write_build(out_dir, spec.task, by_split, split_of, sizes, settings, image_format)
