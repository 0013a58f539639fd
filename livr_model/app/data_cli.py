"""``livr-data``: build BLINK-format training sets from local sources.

    livr-data tasks
    livr-data build counting --source instances_train2017.json --images train2017/ --out data/counting
    livr-data build jigsaw --source photos/ --out data/jigsaw --size 1000 --seed 0 --splits 0.8,0.1,0.1
    livr-data build semantic_correspondence --source SPair-71k/ --out data/semcorr

Each build writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (readable by ``--data`` of
``livr-train`` / ``livr-eval`` as JSONL files), their images, ``splits.json`` (the split of every
source image) and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .cli_errors import add_debug_flag, run_command, user_input
from .data.builders import BUILDERS, TASKS, build
from .data.builders.common import DEFAULT_MAX_SIDE, DEFAULT_SIZE, IMAGE_FORMATS, SPLITS, BuildError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livr-data", description="Build BLINK-format training sets from local sources.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tasks", help="list the tasks and the source each one reads")
    builder = commands.add_parser("build", help="build one task's train/val/test JSONL files")
    builder.add_argument("task", help=f"one of {', '.join(TASKS)} (case-insensitive)")
    builder.add_argument("--source", required=True,
                         help="COCO instances JSON (Counting, Object_Localization), image folder (Jigsaw, "
                              "Visual_Correspondence, Visual_Similarity) or SPair-71k root (Semantic_Correspondence)")
    builder.add_argument("--images", default=None,
                         help="image folder for COCO sources (file_name paths) and SPair sources (default <root>/JPEGImages)")
    builder.add_argument("--out", required=True, help="output folder (created)")
    builder.add_argument("--size", type=int, default=DEFAULT_SIZE,
                         help=f"training questions (default {DEFAULT_SIZE}); val and test follow the split ratio")
    builder.add_argument("--seed", type=int, default=0, help="seed for splits, sampling and drawing (default 0)")
    builder.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions of the SOURCE IMAGES")
    builder.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                         help=f"shrink source images to this longer side first (default {DEFAULT_MAX_SIDE}; 0 keeps them)")
    builder.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png",
                         help="png (lossless, default) or jpg (quality 95, several times smaller)")
    builder.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    builder.add_argument("--no-lighting", action="store_true",
                         help="Visual_Correspondence: keep the second image's colours (geometry only)")
    add_debug_flag(builder)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    if args.command == "tasks":
        for task, spec in BUILDERS.items():
            print(f"{task:<25} {spec.description}")
        return 0
    # A builder reports a source it cannot use as BuildError; an OSError is an unreadable source or
    # an unwritable --out. Any other error inside a build is a bug in the builder.
    with user_input(BuildError, OSError):
        manifest = build(args.task, args.source, args.out, images=args.images, size=args.size, seed=args.seed,
                         fractions=args.splits, max_side=args.max_side or None, lighting=not args.no_lighting,
                         image_format=args.image_format, overwrite=args.overwrite)
    print(f"{manifest['task']} -> {args.out}")
    for split in SPLITS:
        asked, written = manifest["requested"][split], manifest["written"][split]
        short = f" (source ran out: asked {asked})" if written < asked else ""
        print(f"  {split:<5} {written:>6} questions from {manifest['source_images'][split]} source images{short}; "
              f"answers {manifest['answer_letters'][split]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
