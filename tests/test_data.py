"""Examples, prompts, JSONL, the BLINK loader's errors, encode_example and collate."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from livr_model.app.data import BLINK_SUBTASKS, PAPER_TASKS, load_blink, load_jsonl, make_synthetic_dataset, save_jsonl
from livr_model.prompts import IMAGE_TOKEN_TYPE, Example, answer_text, collate, encode_example, format_prompt
from livr_model.segment_ids import IGNORE_INDEX
from livr_model.app.tiny import IM_END, IM_START, build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def image(color=(10, 20, 30), size=(56, 56)):
    return Image.new("RGB", size, color)


def mc_example(**overrides):
    fields = dict(images=[image()], question="How many dots?", choices=["1", "2", "3"], answer="B", task="count")
    fields.update(overrides)
    return Example(**fields)


def test_blink_task_lists():
    assert len(BLINK_SUBTASKS) == 14 == len(set(BLINK_SUBTASKS))
    assert len(PAPER_TASKS) == 9 and set(PAPER_TASKS) <= set(BLINK_SUBTASKS)


def test_example_normalises_letters_and_text():
    assert mc_example(answer="(C)").answer == "C"
    assert mc_example(answer=" A ").answer == "A"
    open_ended = Example([image()], "How many?", [], " 7 ")
    assert open_ended.answer == "7" and not open_ended.is_multiple_choice and open_ended.task == "custom"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(answer="D"), "one of the letters A, B, C"),
        (dict(answer="b"), "one of the letters"),
        (dict(answer="2"), "one of the letters"),
        (dict(answer=""), "answer must be a non-empty string"),
        (dict(choices=["only"]), "choices must hold 2 to 26"),
        (dict(choices=["1", ""]), "choices must be non-empty strings"),
        (dict(question="  "), "question must be a non-empty string"),
        (dict(images=image()), "images must be a list"),
        (dict(images=["a.png"]), r"images\[0\] must be a PIL.Image.Image"),
        (dict(task=""), "task must be a non-empty string"),
    ],
)
def test_example_rejects_bad_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        mc_example(**overrides)


def test_prompt_and_target_follow_blink():
    example = mc_example()
    assert format_prompt(example) == "How many dots?\nSelect from the following choices.\n(A) 1\n(B) 2\n(C) 3"
    assert answer_text(example) == "(B)"
    open_ended = Example([image()], "How many dots?", [], "12")
    assert format_prompt(open_ended) == "How many dots?"
    assert answer_text(open_ended) == "12"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_round_trip(tmp_path):
    examples = make_synthetic_dataset("jigsaw", 3, seed=2) + make_synthetic_dataset("counting_open", 2, seed=2)
    path = tmp_path / "data" / "train.jsonl"
    save_jsonl(examples, path, tmp_path / "data" / "images")
    loaded = load_jsonl(path)
    assert len(loaded) == len(examples)
    for original, copy in zip(examples, loaded):
        assert (copy.question, copy.choices, copy.answer, copy.task) == (
            original.question, original.choices, original.answer, original.task)
        assert [i.tobytes() for i in copy.images] == [i.tobytes() for i in original.images]
    record = json.loads(path.read_text().splitlines()[0])
    assert record["images"][0] == os.path.join("images", "000000_0.png")


def test_jsonl_accepts_blink_style_answers_and_image_root(tmp_path):
    image().save(tmp_path / "a.png")
    path = tmp_path / "sub" / "x.jsonl"
    path.parent.mkdir()
    write_jsonl(path, [
        {"images": ["a.png"], "question": "Q?", "choices": ["x", "y"], "answer": "(B)"},
        {"images": ["a.png"], "question": "How many?", "answer": "3", "task": "count"},
        {"images": [], "question": "Text only?", "choices": ["x", "y"], "answer": "A"},
    ])
    first, second, third = load_jsonl(path, image_root=tmp_path)
    assert (first.answer, first.task, first.images[0].size) == ("B", "custom", (56, 56))
    assert (second.answer, second.choices, second.task) == ("3", [], "count")
    assert third.images == []


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"images": [], "question": "Q"}', r"x.jsonl:2: missing required field\(s\) \['answer'\]"),
        ("not json", "x.jsonl:2: not valid JSON"),
        ('{"images": ["missing.png"], "question": "Q", "answer": "x"}', "x.jsonl:2: image 'missing.png' not found"),
        ('{"images": [], "question": "Q", "choices": ["a", "b"], "answer": "C"}', "x.jsonl:2: answer must be one of the letters"),
        ('[1, 2]', "x.jsonl:2: each line must be a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"images": [], "question": "fine", "answer": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    """The line an editor shows: blank lines before the bad one still count."""
    path = tmp_path / "x.jsonl"
    path.write_text('{"images": [], "question": "fine", "answer": "ok"}\n\n\n{"images": [], "question": "Q"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:4: missing required field"):
        load_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="existing JSONL file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_blink_unknown_subtask_lists_the_subtasks():
    with pytest.raises(ValueError, match="Visual_Correspondence") as error:
        load_blink("Sudoku")
    assert all(name in str(error.value) for name in BLINK_SUBTASKS)
    with pytest.raises(ValueError, match="split must be one of"):
        load_blink("counting", split="train")


def test_blink_offline_gives_a_clear_error(tmp_path):
    """Hub offline (and an empty cache): a RuntimeError that says why, without any download attempt."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from livr_model.app.data.blink import load_blink\n"
        "try:\n"
        "    load_blink('Counting')\n"
        "except RuntimeError as error:\n"
        "    print('ERROR:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERROR: could not load BLINK subtask 'Counting'" in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout


def decode(processor, ids):
    return processor.tokenizer.decode(ids.tolist())


def test_labels_cover_the_answer_and_end_of_turn_only(processor):
    example = make_synthetic_dataset("counting", 1, seed=4)[0]
    encoded = encode_example(processor, example)
    supervised = encoded["labels"] != IGNORE_INDEX
    assert decode(processor, encoded["input_ids"][supervised]) == f"({example.answer}){IM_END}"
    # The supervised span is contiguous and ends the sequence.
    positions = supervised.nonzero().flatten()
    assert positions.tolist() == list(range(positions[0].item(), len(supervised)))
    assert torch.equal(encoded["labels"][supervised], encoded["input_ids"][supervised])
    text = decode(processor, encoded["input_ids"])
    assert text.endswith(f"{IM_START}assistant\n({example.answer}){IM_END}")
    assert format_prompt(example) in text


def test_open_ended_target_is_the_text(processor):
    example = make_synthetic_dataset("counting_open", 1, seed=4)[0]
    encoded = encode_example(processor, example)
    supervised = encoded["labels"] != IGNORE_INDEX
    assert decode(processor, encoded["input_ids"][supervised]) == f"{example.answer}{IM_END}"


def test_generation_prompt_has_no_labels(processor):
    example = make_synthetic_dataset("jigsaw", 1)[0]
    prompt = encode_example(processor, example, with_answer=False)
    full = encode_example(processor, example)
    assert (prompt["labels"] == IGNORE_INDEX).all()
    assert decode(processor, prompt["input_ids"]).endswith(f"{IM_START}assistant\n")
    n = prompt["input_ids"].numel()
    assert torch.equal(full["input_ids"][:n], prompt["input_ids"])


def test_encoded_tensors_match_the_images(processor):
    example = make_synthetic_dataset("jigsaw", 1)[0]
    encoded = encode_example(processor, example)
    n = encoded["input_ids"].numel()
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        assert encoded[key].shape == (n,)
    is_image = encoded["input_ids"] == processor.image_token_id
    assert torch.equal(encoded["mm_token_type_ids"] == IMAGE_TOKEN_TYPE, is_image)
    grid = encoded["image_grid_thw"]
    assert grid.shape == (len(example.images), 3)
    assert encoded["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    merge = processor.image_processor.merge_size
    assert int(is_image.sum()) == int(grid.prod(-1).sum()) // merge**2


def test_encode_rejects_what_does_not_fit(processor):
    example = make_synthetic_dataset("counting", 1)[0]
    length = encode_example(processor, example)["input_ids"].numel()
    assert encode_example(processor, example, max_length=length)["input_ids"].numel() == length
    with pytest.raises(ValueError, match=f"needs {length} tokens .* more than max_length={length - 1}"):
        encode_example(processor, example, max_length=length - 1)
    tiny_image = mc_example(images=[image(size=(56, 8))])
    with pytest.raises(ValueError, match=r"images\[0\] .* is 56x8; this processor needs both sides >= 14"):
        encode_example(processor, tiny_image)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        encode_example(processor, example, max_length=0)
    with pytest.raises(ValueError, match="latent_tokens must consist of tokens added"):
        encode_example(processor, example, latent_tokens="<|latent_0|>")
    with pytest.raises(ValueError, match="example must be an Example"):
        encode_example(processor, {"question": "x"})


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pads_and_concatenates(processor, padding_side):
    examples = make_synthetic_dataset("counting", 1) + make_synthetic_dataset("visual_similarity", 1)
    encoded = [encode_example(processor, e) for e in examples]
    pad = processor.tokenizer.pad_token_id
    batch = collate(encoded, pad, padding_side=padding_side)
    lengths = [e["input_ids"].numel() for e in encoded]
    width = max(lengths)
    assert batch["input_ids"].shape == (2, width)
    for row, (item, n) in enumerate(zip(encoded, lengths)):
        real = slice(0, n) if padding_side == "right" else slice(width - n, width)
        padded = slice(n, width) if padding_side == "right" else slice(0, width - n)
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
            assert torch.equal(batch[key][row, real], item[key])
            assert (batch[key][row, padded] == fill).all()
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in encoded]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in encoded]))


def test_collate_rejects_bad_arguments(processor):
    encoded = [encode_example(processor, make_synthetic_dataset("counting", 1)[0])]
    with pytest.raises(ValueError, match="padding_side must be"):
        collate(encoded, 0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        collate(encoded, None)
    with pytest.raises(ValueError, match="at least one example"):
        collate([], 0)


SYSTEM_PROMPT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}Picture {{ loop.index }}: <|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_encode_follows_the_processors_own_template():
    """A template with a default system prompt and picture labels (as real Qwen checkpoints have):
    the layout comes from the template, the labels still cover the answer only."""
    custom = build_tiny_processor()
    custom.chat_template = SYSTEM_PROMPT_TEMPLATE
    example = make_synthetic_dataset("visual_similarity", 1)[0]
    encoded = encode_example(custom, example)
    text = decode(custom, encoded["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: ")
    assert text.count("<|vision_start|>") == len(example.images)
    supervised = encoded["labels"] != IGNORE_INDEX
    assert decode(custom, encoded["input_ids"][supervised]) == f"({example.answer}){IM_END}"
