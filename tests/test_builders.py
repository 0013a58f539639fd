"""livr-data builders, on fixture sources made here: splits disjoint by source image, balanced
letters, determinism, geometric truth of every task, named errors, and the CLI."""
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livr_model.app.data.builders import TASKS, build, resolve_task
from livr_model.app.data.builders.coco import ZERO_COUNT_FRACTION, CocoSource, zero_count_pairs
from livr_model.app.data.builders.common import BuildError, assign_splits, plural
from livr_model.app.data.builders.image_folder import augment
from livr_model.app.data.builders.marks import (LABEL_FILL, MARK_COLOR, apply_homography, box_label_rect, point_spacing,
                                                rects_overlap)
from livr_model.app.data_cli import main
from livr_model.app.data.jsonl import load_jsonl
from livr_model.prompts import LETTERS

from builder_sources import (COCO_SIZE, SPAIR_SIZE, coco_fixture, gradient_folder, photo_folder, ring_centres,
                             spair_fixture)

SPLITS = ("train", "val", "test")


def rows_of(out: Path, split: str):
    with open(out / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def image_of(out: Path, row, index) -> Image.Image:
    return Image.open(out / row["images"][index]).convert("RGB")


def answer_index(row) -> int:
    return LETTERS.index(row["answer"])


def assert_balanced(rows, num_choices, slack=1):
    counts = Counter(row["answer"] for row in rows)
    expected = len(rows) / num_choices
    for position in range(num_choices):
        got = counts.get(LETTERS[position], 0)
        assert abs(got - expected) <= slack, f"letter {LETTERS[position]}: {got} of {len(rows)}, expected about {expected:.1f}"


def nearest(point, centres):
    return min(np.hypot(point[0] - c[0], point[1] - c[1]) for c in centres)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_fixture(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def spair(tmp_path_factory):
    return spair_fixture(tmp_path_factory.mktemp("spair"))


def build_from(task, fixture_sources, out, **kwargs):
    photos, coco, spair = fixture_sources
    spec = resolve_task(task)
    if spec.source_kind == "coco":
        return build(task, coco[0], out, images=coco[1], **kwargs)
    if spec.source_kind == "spair":
        return build(task, spair[0], out, **kwargs)
    return build(task, photos, out, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos, coco, spair):
    """Every task built once (size 16, seed 3), shared by the structural tests."""
    out = {}
    for task in TASKS:
        folder = tmp_path_factory.mktemp(task.lower())
        out[task] = (folder, build_from(task, (photos, coco, spair), folder, size=16, seed=3))
    return out


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_by_source_image(built, task):
    out, manifest = built[task]
    recorded = json.loads((out / "splits.json").read_text())["images"]
    seen = {}
    for split in SPLITS:
        for row in rows_of(out, split):
            assert row["split"] == split
            for source in row["sources"]:
                assert recorded[source] == split, f"{source} recorded in {recorded[source]} but used in {split}"
                seen.setdefault(source, set()).add(split)
    assert all(len(splits) == 1 for splits in seen.values())
    assert manifest["written"]["train"] == 16 and manifest["written"]["val"] >= 1


@pytest.mark.parametrize("task", TASKS)
def test_answer_letters_are_balanced_and_rows_load(built, task):
    out, _ = built[task]
    rows = rows_of(out, "train")
    num_choices = len(rows[0]["choices"])
    assert_balanced(rows, num_choices)
    examples = load_jsonl(out / "train.jsonl")
    assert len(examples) == len(rows) and all(e.task == task for e in examples)
    assert {len(e.images) for e in examples} == {len(rows[0]["images"])}


def test_the_balance_check_catches_an_always_A_builder():
    rows = [{"answer": "A"} for _ in range(16)]
    with pytest.raises(AssertionError, match="letter A: 16 of 16"):
        assert_balanced(rows, 4)


def test_same_seed_same_files_other_seed_other_files(tmp_path, photos):
    first = build("jigsaw", photos, tmp_path / "a", size=6, seed=5)
    second = build("Jigsaw", photos, tmp_path / "b", size=6, seed=5)
    build("jigsaw", photos, tmp_path / "c", size=6, seed=6)
    assert first == second
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (tmp_path / "b" / f"{split}.jsonl").read_text()
    names = sorted(p.name for p in (tmp_path / "a" / "images" / "train").iterdir())
    assert len(names) == 6 * 3
    for name in names:
        assert (tmp_path / "a" / "images" / "train" / name).read_bytes() == (tmp_path / "b" / "images" / "train" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_text() != (tmp_path / "c" / "train.jsonl").read_text()


def test_counting_answer_is_the_number_of_annotated_instances(built, coco):
    _, _, data = coco
    truth = Counter((a["image_id"], a["category_id"]) for a in data["annotations"])
    crowded = {(a["image_id"], a["category_id"]) for a in data["annotations"] if a["iscrowd"]}
    annotated = {a["image_id"] for a in data["annotations"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    out, _ = built["Counting"]
    for split in SPLITS:
        for row in rows_of(out, split):
            key = (row["meta"]["image_id"], row["meta"]["category_id"])
            assert key not in crowded
            # A zero-count question's category has no annotation at all (crowd or tiny) in an annotated image.
            assert int(row["choices"][answer_index(row)]) == truth[key] == row["meta"]["count"]
            assert key[0] in annotated
            assert plural(names[key[1]]) in row["question"]
            assert [int(c) for c in row["choices"]] == list(range(int(row["choices"][0]), int(row["choices"][0]) + 4))
            assert image_of(out, row, 0).size == COCO_SIZE
    assert {"image_id": 2, "category_id": 3} not in [
        {k: row["meta"][k] for k in ("image_id", "category_id")} for row in rows_of(out, "train")]


def test_counting_asks_about_absent_categories_in_proportion(tmp_path, coco):
    """Zero answers exist (else "never 0" is learnable from the text), as ZERO_COUNT_FRACTION of the
    questions, at letter A, about categories that are counted elsewhere; letters stay balanced."""
    path, images_dir, data = coco
    size = 40
    build("counting", path, tmp_path / "out", images=images_dir, size=size, seed=1)
    present = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    rows = {split: rows_of(tmp_path / "out", split) for split in SPLITS}
    train = rows["train"]
    assert len(train) == size
    zeros = [row for row in train if row["meta"]["count"] == 0]
    assert len(zeros) == round(ZERO_COUNT_FRACTION * size)
    assert_balanced(train, 4)
    counted = {row["meta"]["category_id"] for split in SPLITS for row in rows[split] if row["meta"]["count"] > 0}
    for row in zeros:
        assert row["answer"] == "A" and row["choices"] == ["0", "1", "2", "3"]
        assert (row["meta"]["image_id"], row["meta"]["category_id"]) not in present
        assert row["meta"]["category_id"] in counted
    pairs = [(row["meta"]["image_id"], row["meta"]["category_id"]) for split in SPLITS for row in rows[split]]
    assert len(set(pairs)) == len(pairs)


def test_zero_count_pairs_skip_crowd_and_tiny_annotations(coco):
    """Image 1 holds a crowd person and image 2 a tiny one: neither is absent, though neither is countable."""
    path, images_dir, data = coco
    source = CocoSource(path, images_dir)
    weights = Counter({category["id"]: 1 for category in data["categories"]})
    images = sorted(image["id"] for image in data["images"])
    pairs = zero_count_pairs(source, images, weights, 60, random.Random(0))
    present = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    assert len(pairs) == len(set(pairs)) > 0
    assert not set(pairs) & present
    assert {pair[0] for pair in pairs} <= {a["image_id"] for a in data["annotations"]}


def test_object_localization_marks_the_annotated_box(built, coco):
    _, _, data = coco
    out, _ = built["Object_Localization"]
    for row in rows_of(out, "train"):
        annotation = data["annotations"][row["meta"]["annotation_index"]]
        boxes = row["meta"]["boxes"]
        assert boxes[answer_index(row)] == pytest.approx(annotation["bbox"])
        wrong = boxes[1 - answer_index(row)]
        x, y, w, h = annotation["bbox"]
        ix = max(0, min(x + w, wrong[0] + wrong[2]) - max(x, wrong[0]))
        iy = max(0, min(y + h, wrong[1] + wrong[3]) - max(y, wrong[1]))
        assert ix * iy / (w * h + wrong[2] * wrong[3] - ix * iy) < 0.5
        # Two separate labels, so neither covers the other's letter; each is drawn where computed
        # (its padding is label colour, or outline where a box edge crosses it).
        array = np.asarray(image_of(out, row, 0))
        rects = [box_label_rect(COCO_SIZE, box, LETTERS[index]) for index, box in enumerate(boxes)]
        assert not rects_overlap(*rects)
        for x0, y0, x1, y1 in rects:
            border = np.concatenate([array[y0:y1 + 1, x0], array[y0:y1 + 1, x1], array[y0, x0:x1 + 1], array[y1, x0:x1 + 1]])
            assert all(tuple(pixel) in (LABEL_FILL, MARK_COLOR) for pixel in border)
        bottom = array[y + h - 1, x + 1:x + w - 1]
        assert np.mean(np.all(bottom == MARK_COLOR, axis=-1)) > 0.5
        same = [a for a in data["annotations"] if a["image_id"] == annotation["image_id"] and a["category_id"] == annotation["category_id"]]
        assert len(same) == 1


def test_jigsaw_correct_piece_restores_the_photo_exactly(built, photos):
    out, _ = built["Jigsaw"]
    for split in SPLITS:
        for row in rows_of(out, split):
            puzzle = image_of(out, row, 0)
            original = Image.open(photos / row["sources"][0]).convert("RGB")
            for option in (0, 1):
                piece = image_of(out, row, 1 + option)
                whole = puzzle.copy()
                whole.paste(piece, (puzzle.width - piece.width, puzzle.height - piece.height))
                restores = np.array_equal(np.asarray(whole), np.asarray(original))
                assert restores == (option == answer_index(row)), (row, option)
            # The wrong piece is the other photo's corner, cut without resampling (same sharpness).
            other = Image.open(photos / row["meta"]["distractor_source"]).convert("RGB")
            wrong = image_of(out, row, 2 - answer_index(row))
            corner = other.crop((other.width - wrong.width, other.height - wrong.height, other.width, other.height))
            assert np.array_equal(np.asarray(wrong), np.asarray(corner))


def test_visual_similarity_correct_candidate_is_the_augmented_reference(built, photos):
    out, _ = built["Visual_Similarity"]
    for row in rows_of(out, "train"):
        reference = Image.open(photos / row["sources"][0]).convert("RGB")
        assert np.array_equal(np.asarray(image_of(out, row, 0)), np.asarray(reference))
        correct = answer_index(row)
        params = row["meta"]["augmentations"][correct]
        assert row["meta"]["candidate_sources"][correct] == row["sources"][0]
        assert row["meta"]["candidate_sources"][1 - correct] != row["sources"][0]
        remade = augment(reference, params, reference.size)
        assert np.array_equal(np.asarray(image_of(out, row, 1 + correct)), np.asarray(remade))


def _check_point_rows(out, rows):
    """Every circled point is drawn where the row says (its ring's centre within half a pixel per
    axis); returns (row, ring centres in the order of the row's points, A first)."""
    found = []
    for row in rows:
        first, second = image_of(out, row, 0), image_of(out, row, 1)
        ref_rings = ring_centres(first)
        assert len(ref_rings) == 1
        assert nearest(row["meta"]["reference"], ref_rings) < 0.75
        rings = ring_centres(second)
        assert len(rings) == 4
        ordered = []
        for point in row["meta"]["points"]:
            centre = min(rings, key=lambda c: np.hypot(point[0] - c[0], point[1] - c[1]))
            assert np.hypot(point[0] - centre[0], point[1] - centre[1]) < 0.75
            ordered.append(centre)
        found.append((row, ordered))
    return found


def test_visual_correspondence_answer_is_where_the_homography_sends_ref(tmp_path):
    folder = gradient_folder(tmp_path / "ramps")
    out = tmp_path / "vc"
    build("visual_correspondence", folder, out, size=8, seed=2, lighting=False)
    rows = rows_of(out, "train")
    assert_balanced(rows, 4)
    for row, rings in _check_point_rows(out, rows):
        matrix = np.array(row["meta"]["homography"])
        reference = row["meta"]["reference"]
        marked = rings[answer_index(row)]
        assert np.hypot(*(apply_homography(matrix, [reference])[0] - marked)) < 1.0
        # Independent of the recorded matrix: the warped ramp's colour at the centre of each ring
        # says where that pixel came from; only the correct ring's comes from the REF point (up to
        # the ring's half-pixel placement, magnified by the warp, and the colour's rounding).
        second = np.asarray(image_of(out, row, 1)).astype(np.float64)
        for index, centre in enumerate(rings):
            red, green = second[int(centre[1]), int(centre[0]), :2]
            distance = np.hypot(red + 0.5 - reference[0], green + 0.5 - reference[1])
            if index == answer_index(row):
                assert distance < 1.75, (row["meta"], distance)
            else:
                assert distance > point_spacing((240, 240)) / 2


def test_visual_correspondence_default_build_changes_lighting(built):
    out, manifest = built["Visual_Correspondence"]
    assert manifest["lighting"] is True
    rows = rows_of(out, "train")
    assert all(row["meta"]["lighting"]["brightness"] != 1.0 for row in rows)
    for row, rings in _check_point_rows(out, rows):
        target = apply_homography(np.array(row["meta"]["homography"]), [row["meta"]["reference"]])[0]
        assert np.hypot(*(target - rings[answer_index(row)])) < 1.0


def test_visual_correspondence_position_does_not_give_the_answer_away(tmp_path, photos):
    """Guessing the circled point nearest to REF's own position must stay near chance (1/4; 11 of
    48 here): with decoys drawn anywhere in the frame that guess won 97% of the time."""
    out = tmp_path / "vc"
    build("visual_correspondence", photos, out, size=48, seed=11)
    rows = rows_of(out, "train")
    nearest_wins = sum(
        int(np.argmin([np.hypot(p[0] - row["meta"]["reference"][0], p[1] - row["meta"]["reference"][1])
                       for p in row["meta"]["points"]])) == answer_index(row)
        for row in rows)
    assert len(rows) == 48 and nearest_wins / len(rows) < 0.4, nearest_wins


def test_semantic_correspondence_answer_is_the_matching_keypoint(built, spair):
    _, keypoints = spair
    out, manifest = built["Semantic_Correspondence"]
    for row, rings in _check_point_rows(out, rows_of(out, "train")):
        src, trg = (name.split("/", 1)[1] for name in row["sources"])
        ref = ring_centres(image_of(out, row, 0))[0]
        k = int(np.argmin([np.hypot(ref[0] - x, ref[1] - y) for x, y in keypoints[src]]))
        assert np.hypot(ref[0] - keypoints[src][k][0], ref[1] - keypoints[src][k][1]) < 0.75
        marked = rings[answer_index(row)]
        assert np.hypot(marked[0] - keypoints[trg][k][0], marked[1] - keypoints[trg][k][1]) < 0.75
        assert "cars" in row["question"]


def test_max_side_shrinks_sources_and_scales_their_geometry(tmp_path, coco, spair):
    path, images_dir, data = coco
    out = tmp_path / "loc"
    build("object_localization", path, out, images=images_dir, size=4, seed=0, max_side=80)
    scale = 80 / COCO_SIZE[0]
    for row in rows_of(out, "train"):
        assert image_of(out, row, 0).size == (80, 60)
        bbox = data["annotations"][row["meta"]["annotation_index"]]["bbox"]
        assert row["meta"]["boxes"][answer_index(row)] == pytest.approx([v * scale for v in bbox])
    root, keypoints = spair
    out = tmp_path / "sc"
    build("semantic_correspondence", root, out, size=4, seed=0, max_side=100)
    scale = 100 / SPAIR_SIZE[0]
    for row in rows_of(out, "train"):
        trg = row["sources"][1].split("/", 1)[1]
        k = row["meta"]["candidate_keypoints"][answer_index(row)]
        assert image_of(out, row, 1).size == (100, 80)
        assert row["meta"]["points"][answer_index(row)] == pytest.approx([v * scale for v in keypoints[trg][k]], abs=1e-3)
    with pytest.raises(BuildError, match="max_side must be an int >= 64"):
        build("jigsaw", root, tmp_path / "x", max_side=10)


def test_assign_splits_follows_fractions_and_is_the_same_for_every_pool():
    ids = [f"img{i}" for i in range(2000)]
    split_of = assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
    counts = Counter(split_of.values())
    # Binomial spread: 5 standard deviations.
    assert abs(counts["train"] - 1600) < 5 * (2000 * 0.8 * 0.2) ** 0.5
    assert abs(counts["val"] - 200) < 5 * (2000 * 0.1 * 0.9) ** 0.5
    # Another task's pool sharing half the images puts each shared image in the same split.
    subset = assign_splits(ids[::2] + [f"other{i}" for i in range(500)], (0.8, 0.1, 0.1), seed=0)
    assert all(subset[i] == split_of[i] for i in ids[::2])
    assert assign_splits(ids, (0.8, 0.1, 0.1), seed=1) != split_of


def test_assign_splits_gives_small_pools_their_minimum():
    ids = [f"img{i}" for i in range(6)]
    assert Counter(assign_splits(ids, (0.8, 0.1, 0.1), seed=0, minimum=2).values()) == {"train": 2, "val": 2, "test": 2}
    assert Counter(assign_splits(ids[:3], (0.5, 0.5, 0.0), seed=4).values()) in ({"train": 2, "val": 1}, {"train": 1, "val": 2})
    with pytest.raises(BuildError, match="need at least 6"):
        assign_splits(ids[:5], (0.8, 0.1, 0.1), seed=0, minimum=2)


def test_coco_errors_name_the_file_and_entry(tmp_path, coco):
    path, images_dir, data = coco
    bad = json.loads(json.dumps(data))
    bad["annotations"][3]["bbox"] = [1, 2, 0, 5]
    bad_path = tmp_path / "instances_bad.json"
    bad_path.write_text(json.dumps(bad))
    with pytest.raises(BuildError, match=r"instances_bad\.json: annotations\[3\].*bbox"):
        build("counting", bad_path, tmp_path / "out", images=images_dir, size=4)
    with pytest.raises(BuildError, match="missing.json.*does not exist"):
        build("counting", tmp_path / "missing.json", tmp_path / "out", images=images_dir, size=4)
    empty_images = tmp_path / "no_images"
    empty_images.mkdir()
    with pytest.raises(BuildError, match=r"000000000\d\d\d\.jpg' not found \(images\[\d+\] id \d+"):
        build("counting", path, tmp_path / "out", images=empty_images, size=4)
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"images": [\n{"id": 1,\n')
    with pytest.raises(BuildError, match=r"truncated\.json:3: not valid JSON"):
        build("object_localization", truncated, tmp_path / "out", images=images_dir, size=4)


def test_spair_and_folder_errors_name_the_file(tmp_path, spair):
    root, _ = spair
    broken = tmp_path / "broken"
    (broken / "PairAnnotation" / "val").mkdir(parents=True)
    (broken / "JPEGImages").mkdir()
    pair = {"src_imname": "a.jpg", "trg_imname": "b.jpg", "category": "car", "src_kps": [[1, 2]]}
    (broken / "PairAnnotation" / "val" / "7:car.json").write_text(json.dumps(pair))
    with pytest.raises(BuildError, match=r"7:car\.json: missing key\(s\) \['trg_kps'\]"):
        build("semantic_correspondence", broken, tmp_path / "out", size=4)
    pair["trg_kps"] = [[1, "x"]]
    (broken / "PairAnnotation" / "val" / "7:car.json").write_text(json.dumps(pair))
    with pytest.raises(BuildError, match=r"7:car\.json: 'trg_kps' must be a list of \[x, y\]"):
        build("semantic_correspondence", broken, tmp_path / "out", size=4)
    with pytest.raises(BuildError, match="holds no images"):
        build("jigsaw", broken / "JPEGImages", tmp_path / "out", size=4)
    with pytest.raises(BuildError, match="task must be one of"):
        build("depth", root, tmp_path / "out")


def test_out_folder_is_never_clobbered_and_a_failed_build_leaves_nothing(tmp_path, photos, coco):
    path, images_dir, _ = coco
    out = tmp_path / "out"
    build("jigsaw", photos, out, size=4)
    with pytest.raises(BuildError, match="previous build; pass --overwrite"):
        build("jigsaw", photos, out, size=2)
    build("jigsaw", photos, out, size=2, overwrite=True)
    assert len(list((out / "images" / "train").iterdir())) == 2 * 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="holds no livr-data build"):
        build("jigsaw", photos, foreign, size=2, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    failed = tmp_path / "failed"
    with pytest.raises(BuildError, match="not found"):
        build("counting", path, failed, images=photos, size=4)
    assert not failed.exists() or not any(failed.iterdir())


def test_cli_builds_and_reports_errors(tmp_path, photos, capsys):
    code = main(["build", "visual_similarity", "--source", str(photos), "--out", str(tmp_path / "vs"),
                 "--size", "4", "--seed", "1", "--splits", "0.6,0.2,0.2"])
    assert code == 0
    assert "Visual_Similarity" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "vs" / "manifest.json").read_text())
    assert manifest["fractions"] == [0.6, 0.2, 0.2] and manifest["written"]["train"] == 4
    assert main(["build", "jigsaw", "--source", str(photos), "--out", str(tmp_path / "jpg"), "--size", "2",
                 "--image-format", "jpg", "--max-side", "0"]) == 0
    row = rows_of(tmp_path / "jpg", "train")[0]
    assert all(name.endswith(".jpg") for name in row["images"])
    assert Image.open(tmp_path / "jpg" / row["images"][0]).format == "JPEG"
    assert len(load_jsonl(tmp_path / "jpg" / "train.jsonl")) == 2
    capsys.readouterr()
    code = main(["build", "counting", "--source", str(tmp_path / "nope.json"), "--images", str(photos),
                 "--out", str(tmp_path / "c")])
    assert code == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["build", "jigsaw", "--source", str(photos), "--out", str(tmp_path / "j"), "--splits", "0.5,0.6,0"]) == 2
    assert "summing to 1" in capsys.readouterr().err
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert all(task in listing for task in TASKS)
