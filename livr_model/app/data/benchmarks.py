"""Evaluation loaders for the paper's cross-method benchmarks, from local copies in their public
layouts, returning ``Example`` rows (one task name per row, for per-task reports like BLINK's).

- MMVP (``load_mmvp``): ``Questions.csv`` with columns Index, Question, Options ("(a) ... (b) ..."),
  Correct Answer ("(a)"), and ``MMVP Images/<Index>.jpg``. Questions come in pairs (Index 1-2,
  3-4, ...) on two images with opposite answers; ``mmvp_paired_accuracy`` counts a pair only when
  both of its questions are right.
- V*Bench (``load_vstar``): ``direct_attributes/`` and ``relative_position/`` folders holding each
  image next to a same-named ``.json`` with ``question`` and ``options`` (the first option is the
  correct one, as in the benchmark's own evaluation). Options are reordered with a seed so the
  correct letter is balanced; the original order is kept in ``meta``.
- SAT (``load_sat``): the hub's parquet files (``question``, ``answers``, ``correct_answer``,
  ``image_bytes``, ``question_type``); answers reordered like V*Bench's. Needs ``pyarrow``.
- VSP (``load_vsp``): the maze spatial-reasoning task of the VSP release (``maze/task4``):
  ``maps/level_step<L>/img/<i>.png``, ``question/<i>.txt`` (an action plan such as "RRD") and
  ``answer/<i>.txt`` ("Y" or "N"): is the plan safe? VSP's planning task has open-ended answers
  with many valid plans and is not loaded here.

Nothing here downloads: paths are local folders or files, and every error names file:line (or
file:row for parquet) and what was expected.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image

from livr_model.prompts import LETTERS, Example

MMVP_CSV = "Questions.csv"
MMVP_IMAGE_DIR = "MMVP Images"
MMVP_COLUMNS = ("Index", "Question", "Options", "Correct Answer")
MMVP_OPTION = re.compile(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", re.IGNORECASE | re.DOTALL)
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
VSTAR_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SAT_COLUMNS = ("question", "answers", "correct_answer", "image_bytes")
VSP_MOVES = {"U": "Up", "D": "Down", "L": "Left", "R": "Right"}
VSP_ANSWERS = {"Y": "A", "N": "B"}
VSP_CHOICES = ["Yes", "No"]
VSP_QUESTION = (
    "The image is a grid maze: the player, holes, empty land and the goal each fill one square. The player moves "
    "one square per step ({moves}); moving off the edge leaves it where it is, and stepping into a hole loses the "
    "game. Is this action plan safe, never stepping into a hole: {plan}?"
)


class BenchmarkError(ValueError):
    """A local benchmark copy that does not match its public layout; names file:line."""


def _image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise BenchmarkError(f"{where}: image {str(path)!r} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise BenchmarkError(f"{where}: image {str(path)!r} cannot be read ({error})") from None


def _folder(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise BenchmarkError(f"{what} must be an existing folder; {str(path)!r} is not a directory")
    return path


def _balanced_order(options: Sequence[str], correct: int, position: int) -> List[str]:
    """``options`` with the correct one moved to ``position`` and the others in their original order."""
    others = [option for index, option in enumerate(options) if index != correct]
    return others[:position] + [options[correct]] + others[position:]


def _positions(num_choices: Sequence[int], seed, name: str) -> List[int]:
    """Where to put each item's correct option: among items with k options, each of the k letters
    is correct equally often (+-1), in a seeded order."""
    rng = random.Random(f"livr-benchmark-{name}-{seed}")
    by_count: Dict[int, List[int]] = {}
    for index, count in enumerate(num_choices):
        by_count.setdefault(count, []).append(index)
    positions = [0] * len(num_choices)
    for count, indices in sorted(by_count.items()):
        values = [number % count for number in range(len(indices))]
        rng.shuffle(values)
        for index, value in zip(indices, values):
            positions[index] = value
    return positions


def load_mmvp(root, image_dir: Optional[str] = None) -> List[Example]:
    """MMVP's 300 questions (task ``MMVP``); ``meta`` holds ``index`` and ``pair`` (0 for 1-2, ...)."""
    root = _folder(root, "MMVP root")
    path = root / MMVP_CSV
    if not path.is_file():
        raise BenchmarkError(f"MMVP root {str(root)!r} has no {MMVP_CSV}")
    images = root / (image_dir or MMVP_IMAGE_DIR)
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in MMVP_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}:1: missing column(s) {missing}; MMVP's header is {list(MMVP_COLUMNS)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                index = int(row["Index"])
            except (TypeError, ValueError):
                raise BenchmarkError(f"{where}: Index must be an integer; got {row['Index']!r}") from None
            options = MMVP_OPTION.findall(row["Options"] or "")
            letters = [letter.lower() for letter, _ in options]
            if len(options) < 2 or letters != [chr(ord("a") + i) for i in range(len(options))]:
                raise BenchmarkError(f"{where}: Options must read '(a) ... (b) ...'; got {row['Options']!r}")
            answer = (row["Correct Answer"] or "").strip().strip("()").lower()
            if answer not in letters:
                raise BenchmarkError(f"{where}: Correct Answer must be one of {['(' + l + ')' for l in letters]}; "
                                     f"got {row['Correct Answer']!r}")
            image = _image(images / f"{index}.jpg", where)
            try:
                examples.append(Example([image], row["Question"], [text for _, text in options],
                                        LETTERS[letters.index(answer)], task="MMVP",
                                        meta={"index": index, "pair": (index - 1) // 2}))
            except ValueError as error:
                raise BenchmarkError(f"{where}: {error}") from None
    if not examples:
        raise BenchmarkError(f"{path} holds no questions")
    return examples


def mmvp_paired_accuracy(examples: Sequence[Example], correct: Sequence[bool]) -> dict:
    """MMVP's metric: a pair (the two questions sharing ``meta['pair']``) scores only when both of
    its questions are right. ``correct[i]`` says whether ``examples[i]`` was answered right.
    Returns pair accuracy, question accuracy and the counts; an incomplete pair is an error."""
    if len(examples) != len(correct):
        raise ValueError(f"correct must hold one bool per example: {len(examples)} examples, {len(correct)} values")
    pairs: Dict[int, List[bool]] = {}
    for index, (example, right) in enumerate(zip(examples, correct)):
        if "pair" not in example.meta:
            raise ValueError(f"examples[{index}] has no meta['pair']; load MMVP with load_mmvp")
        pairs.setdefault(example.meta["pair"], []).append(bool(right))
    incomplete = sorted(pair for pair, values in pairs.items() if len(values) != 2)
    if incomplete:
        raise ValueError(f"MMVP pairs {incomplete[:10]} do not hold exactly two questions; score whole pairs only")
    if not pairs:
        raise ValueError("examples must hold at least one MMVP pair")
    both = sum(all(values) for values in pairs.values())
    return {"pair_accuracy": both / len(pairs), "pairs": len(pairs), "pairs_right": both,
            "question_accuracy": sum(map(bool, correct)) / len(correct), "questions": len(correct)}


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def load_vstar(root, seed: int = 0) -> List[Example]:
    """V*Bench (tasks ``VStar_direct_attributes`` and ``VStar_relative_position``)."""
    root = _folder(root, "V*Bench root")
    items = []
    for category in VSTAR_CATEGORIES:
        folder = root / category
        if not folder.is_dir():
            raise BenchmarkError(f"V*Bench root {str(root)!r} has no {category}/ folder")
        for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VSTAR_IMAGE_EXTENSIONS):
            annotation_path = image_path.with_suffix(".json")
            if not annotation_path.is_file():
                raise BenchmarkError(f"{image_path}: no annotation {annotation_path.name} next to it")
            annotation = _read_json(annotation_path)
            where = f"{annotation_path}:1"
            if not isinstance(annotation, dict) or not isinstance(annotation.get("question"), str):
                raise BenchmarkError(f"{where}: needs a 'question' string")
            options = annotation.get("options")
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
                raise BenchmarkError(f"{where}: 'options' must list at least two non-empty strings (the first correct)")
            items.append((category, image_path, annotation, where))
    if not items:
        raise BenchmarkError(f"V*Bench root {str(root)!r} holds no annotated images")
    positions = _positions([len(item[2]["options"]) for item in items], seed, "vstar")
    examples = []
    for (category, image_path, annotation, where), position in zip(items, positions):
        options = annotation["options"]
        try:
            examples.append(Example([_image(image_path, where)], annotation["question"], _balanced_order(options, 0, position),
                                    LETTERS[position], task=f"VStar_{category}",
                                    meta={"image": f"{category}/{image_path.name}", "original_options": options}))
        except ValueError as error:
            raise BenchmarkError(f"{where}: {error}") from None
    return examples


def _sat_images(cell, where: str) -> List[Image.Image]:
    if not isinstance(cell, list) or not cell:
        raise BenchmarkError(f"{where}: image_bytes must be a non-empty list of images")
    images = []
    for index, item in enumerate(cell):
        data = item.get("bytes") if isinstance(item, dict) else item
        if not isinstance(data, (bytes, bytearray)):
            raise BenchmarkError(f"{where}: image_bytes[{index}] holds no image bytes ({type(item).__name__})")
        try:
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise BenchmarkError(f"{where}: image_bytes[{index}] is not a readable image ({error})") from None
    return images


def load_sat(path, seed: int = 0, limit: Optional[int] = None) -> List[Example]:
    """SAT from a parquet file or a folder of them (task ``SAT/<question_type>``, or ``SAT``)."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise BenchmarkError(f"SAT path must be a parquet file or a folder of them; {str(path)!r} holds none")
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise BenchmarkError("load_sat reads the hub's parquet files and needs pyarrow: pip install pyarrow") from error
    rows = []
    for file in files:
        table = parquet.read_table(file)
        missing = [column for column in SAT_COLUMNS if column not in table.column_names]
        if missing:
            raise BenchmarkError(f"{file}: missing column(s) {missing}; SAT's columns include {list(SAT_COLUMNS)}")
        rows.extend((f"{file}:row {number}", row) for number, row in enumerate(table.to_pylist()))
    if limit is not None:
        rows = rows[:limit]
    answers_per_row = []
    for where, row in rows:
        answers = row["answers"]
        if not isinstance(answers, list) or len(answers) < 2 or not all(isinstance(a, str) and a.strip() for a in answers):
            raise BenchmarkError(f"{where}: answers must list at least two non-empty strings; got {answers!r}")
        if row["correct_answer"] not in answers:
            raise BenchmarkError(f"{where}: correct_answer {row['correct_answer']!r} is not among answers {answers!r}")
        answers_per_row.append(len(answers))
    positions = _positions(answers_per_row, seed, "sat")
    examples = []
    for (where, row), position in zip(rows, positions):
        answers = row["answers"]
        kind = row.get("question_type")
        try:
            examples.append(Example(_sat_images(row["image_bytes"], where), row["question"],
                                    _balanced_order(answers, answers.index(row["correct_answer"]), position),
                                    LETTERS[position], task=f"SAT/{kind}" if kind else "SAT",
                                    meta={"row": where, "original_answers": answers}))
        except ValueError as error:
            raise BenchmarkError(f"{where}: {error}") from None
    return examples


def load_vsp(root) -> List[Example]:
    """VSP maze spatial reasoning (task ``VSP_spatial_reasoning``; ``meta['level']`` is the plan length)."""
    root = _folder(root, "VSP task folder (maze/task4)")
    maps = root / "maps" if (root / "maps").is_dir() else root
    levels = sorted(maps.glob("level_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not levels:
        raise BenchmarkError(f"VSP folder {str(maps)!r} has no level_step<L>/ folders (expected maze/task4/maps)")
    examples = []
    for level_dir in levels:
        level = int(re.sub(r"\D", "", level_dir.name))
        questions = sorted((level_dir / "question").glob("*.txt"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        for question_path in questions:
            where = f"{question_path}:1"
            plan = question_path.read_text(encoding="utf-8").strip()
            if not plan or any(move not in VSP_MOVES for move in plan):
                raise BenchmarkError(f"{where}: an action plan must be letters {sorted(VSP_MOVES)}; got {plan[:40]!r}")
            answer_path = level_dir / "answer" / question_path.name
            if not answer_path.is_file():
                raise BenchmarkError(f"{where}: no answer file {str(answer_path)!r}")
            answer = answer_path.read_text(encoding="utf-8").strip()
            if answer not in VSP_ANSWERS:
                raise BenchmarkError(f"{answer_path}:1: answer must be 'Y' or 'N'; got {answer[:20]!r}")
            image = _image(level_dir / "img" / f"{question_path.stem}.png", where)
            moves = ", ".join(f"{k} = {v}" for k, v in VSP_MOVES.items())
            question = VSP_QUESTION.format(moves=moves, plan=", ".join(VSP_MOVES[m] for m in plan))
            examples.append(Example([image], question, list(VSP_CHOICES), VSP_ANSWERS[answer], task="VSP_spatial_reasoning",
                                    meta={"level": level, "id": int(question_path.stem) if question_path.stem.isdigit() else question_path.stem,
                                          "plan": plan}))
    if not examples:
        raise BenchmarkError(f"VSP folder {str(maps)!r} holds no questions")
    return examples


BENCHMARKS = {"mmvp": load_mmvp, "vstar": load_vstar, "sat": load_sat, "vsp": load_vsp}
SPEC_USAGE = {"mmvp": "mmvp:<folder with Questions.csv>", "vstar": "vstar:<V*Bench folder>",
              "sat": "sat:<SAT parquet file or folder>", "vsp": "vsp:<VSP maze/task4 folder>"}


def spec_loader(name: str):
    """A ``load_spec(argument, cfg, split)`` for the ``--data`` registry: ``<name>:<local path>``.
    These are evaluation benchmarks: asked for training data, it refuses (training on them would
    leak into the scores they exist to give)."""
    if name not in BENCHMARKS:
        raise ValueError(f"name must be one of {sorted(BENCHMARKS)}; got {name!r}")

    def load_spec(argument: str, cfg, split: str) -> List[Example]:
        if split == "train":
            raise ValueError(f"{name}: is an evaluation benchmark; use it with livr-eval, not as training data "
                             f"({SPEC_USAGE[name]})")
        if name in ("vstar", "sat"):
            return BENCHMARKS[name](argument, seed=getattr(cfg, "seed", 0) or 0)
        return BENCHMARKS[name](argument)

    return load_spec
