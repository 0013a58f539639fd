"""Example and data-set fingerprints: equal content gives equal hashes, any change a new one."""
import io

from PIL import Image

from livr_model.app.data.fingerprint import dataset_fingerprint, example_fingerprint, image_fingerprint
from livr_model.prompts import Example


def _image(color=(10, 20, 30), size=(8, 8)):
    return Image.new("RGB", size, color)


def _example(**overrides):
    fields = dict(images=[_image()], question="How many?", choices=["1", "2"], answer="A")
    fields.update(overrides)
    return Example(**fields)


def test_same_pixels_same_fingerprint_even_after_png_round_trip():
    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    reloaded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert image_fingerprint(reloaded) == image_fingerprint(_image())
    assert example_fingerprint(_example(images=[reloaded])) == example_fingerprint(_example())


def test_every_field_changes_the_fingerprint():
    base = example_fingerprint(_example())
    changed = [
        _example(images=[_image(color=(10, 20, 31))]),
        _example(images=[_image(size=(8, 9))]),
        _example(images=[_image(), _image()]),
        _example(question="How many? "),
        _example(choices=["1", "3"]),
        _example(answer="B"),
    ]
    fingerprints = {example_fingerprint(e) for e in changed}
    assert base not in fingerprints
    assert len(fingerprints) == len(changed)


def test_item_fingerprint_ignores_the_answer_only():
    assert example_fingerprint(_example(answer="B"), with_answer=False) == example_fingerprint(_example(), with_answer=False)
    assert example_fingerprint(_example(answer="B")) != example_fingerprint(_example())


def test_field_boundaries_matter():
    a = _example(choices=["ab", "c"])
    b = _example(choices=["a", "bc"])
    assert example_fingerprint(a) != example_fingerprint(b)


def test_dataset_fingerprint_sees_order_cuts_and_labels():
    examples = [_example(question=f"q{i}?") for i in range(4)]
    base = dataset_fingerprint(examples)
    assert dataset_fingerprint(list(examples)) == base
    assert dataset_fingerprint(examples[::-1]) != base
    assert dataset_fingerprint(examples[:3]) != base
    relabelled = examples[:3] + [_example(question="q3?", answer="B")]
    assert dataset_fingerprint(relabelled) != base
