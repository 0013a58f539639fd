"""Evaluation: multiple-choice accuracy, open-ended exact match, and the paper's probes.

Accuracy is measured two ways:

* ``generate``: greedy generation, then the choice letter is read from the reply as BLINK scores
  it (a bare "A" or "(A)"; else a single distinct "(X)" anywhere in the reply; we also accept a
  reply that starts with "A." / "A)" / "A:" or "Answer: A"). Open-ended numeric answers (no
  choices) are compared by exact match of the first number in the reply.
* ``likelihood``: every option is scored by the summed log-probability of its answer text after
  the prompt, and the best one is the prediction (open-ended items fall back to generation).

The probes (LIVR paper, section 5): the mean attention mass that answer tokens put on the latent
tokens; accuracy with the latents removed from the prompt; accuracy with the bottleneck mask forced
at test time; and a heatmap of latent-to-image attention drawn over the input image.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from livr_kernels import Segment

from .checkpoint import atomic_write_bytes, atomic_write_json
from .data import collate as collate_examples
from .data import encode_example, format_prompt
from .segments import build_segment_ids

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IGNORE_INDEX = -100
NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20,
}

# Trailing characters that do not change a bare answer: "A." "(B)," "C!" and the like.
_TRAILING = " \t\r\n.,;:!?\"'`*"
_BARE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?$")
_PAREN = re.compile(r"\(\s*([A-Z])\s*\)")
_LEADING = re.compile(r"^\(?([A-Z])[\).:](?:\s|$)")
_ANSWER_IS = re.compile(r"\banswer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def _valid_letters(num_choices: Optional[int]) -> str:
    if num_choices is None:
        return LETTERS
    if not isinstance(num_choices, int) or not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"num_choices must be an int in 1..{len(LETTERS)} or None; got {num_choices!r}")
    return LETTERS[:num_choices]


def extract_choice_letter(text: str, num_choices: Optional[int] = None) -> Optional[str]:
    """The choice letter a model's reply commits to, or None when it does not commit to one.

    Order: a bare letter ("B", "(B)", " b. "); else exactly one distinct "(X)" in the reply; else a
    reply that starts "B." / "B)" / "B:"; else a single "answer is B" / "Answer: (B)". Letters
    outside the first ``num_choices`` do not count. Ambiguous replies ("(A) or (B)") give None.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str; got {type(text).__name__}")
    valid = _valid_letters(num_choices)
    reply = text.strip().strip(_TRAILING).strip()
    bare = _BARE.match(reply)
    if bare:
        letter = bare.group(1).upper()
        # A lone lower-case letter is still an answer; "a" inside a sentence is not (no match here).
        return letter if letter in valid else None
    found = {m.group(1) for m in _PAREN.finditer(text) if m.group(1) in valid}
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None
    leading = _LEADING.match(text.strip())
    if leading and leading.group(1) in valid:
        return leading.group(1)
    stated = {m.group(1).upper() for m in _ANSWER_IS.finditer(text) if m.group(1).upper() in valid}
    if len(stated) == 1:
        return stated.pop()
    return None


def normalize_number(value) -> Optional[str]:
    """A canonical string for a number ("3.0" -> "3", "03" -> "3"); None if it is not one."""
    if isinstance(value, (int, float)):
        num = float(value)
    else:
        s = str(value).strip().lower()
        if s in NUMBER_WORDS:
            return str(NUMBER_WORDS[s])
        try:
            num = float(s)
        except ValueError:
            return None
    if math.isnan(num) or math.isinf(num):
        return None
    return str(int(num)) if num == int(num) else repr(num)


def extract_number(text: str) -> Optional[str]:
    """The first number in a reply (digits or an English number word up to twenty), normalized."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str; got {type(text).__name__}")
    digit = _NUMBER.search(text)
    word = next((m for m in _WORD.finditer(text) if m.group(0).lower() in NUMBER_WORDS), None)
    if digit is None and word is None:
        return None
    if word is None or (digit is not None and digit.start() < word.start()):
        return normalize_number(digit.group(0))
    return normalize_number(word.group(0))


def answer_letter(answer: str) -> str:
    """The gold letter of a multiple-choice answer given as "A", "(A)" or "(A) text"."""
    letter = extract_choice_letter(str(answer))
    if letter is None:
        raise ValueError(f"answer must be a choice letter like 'A' or '(A)'; got {answer!r}")
    return letter


def score_reply(reply: str, answer: str, num_choices: int) -> tuple:
    """(prediction, correct) for one reply: a letter for multiple choice, a number otherwise."""
    if num_choices:
        pred = extract_choice_letter(reply, num_choices)
        return pred, pred is not None and pred == answer_letter(answer)
    pred = extract_number(reply)
    gold = normalize_number(answer)
    if gold is None:
        gold = str(answer).strip().lower()
        pred = reply.strip().strip(_TRAILING).lower()
    return pred, pred is not None and pred == gold


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass
class EvalResult:
    """Per-task and averaged accuracy plus every prediction.

    ``average`` is the unweighted mean of per-task accuracies (each task counts once, as the
    paper reports its multi-task average); ``overall`` pools every item.
    """

    per_task: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)

    def add(self, task: str, correct: bool, record: Optional[dict] = None) -> None:
        score = self.per_task.setdefault(task, TaskScore())
        score.total += 1
        score.correct += int(bool(correct))
        if record is not None:
            self.predictions.append(record)

    @property
    def average(self) -> float:
        accs = [s.accuracy for s in self.per_task.values() if s.total]
        return sum(accs) / len(accs) if accs else float("nan")

    @property
    def overall(self) -> float:
        total = sum(s.total for s in self.per_task.values())
        return sum(s.correct for s in self.per_task.values()) / total if total else float("nan")

    def to_dict(self) -> dict:
        return {
            "per_task": {t: {"accuracy": s.accuracy, "correct": s.correct, "total": s.total} for t, s in sorted(self.per_task.items())},
            "average": self.average,
            "overall": self.overall,
        }


def format_table(rows: dict, columns: Sequence[str]) -> str:
    """A plain-text table: one row per task, one column per named accuracy, percentages."""
    names = sorted(rows)
    width = max([len("task")] + [len(n) for n in names])
    col_w = max(10, max(len(c) for c in columns) + 2)
    lines = ["task".ljust(width) + "".join(c.rjust(col_w) for c in columns)]
    lines.append("-" * len(lines[0]))
    for name in names:
        cells = []
        for c in columns:
            v = rows[name].get(c)
            cells.append(("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}").rjust(col_w))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def chance_accuracy(examples) -> dict:
    """Per task, the accuracy of guessing uniformly among the choices (None for open-ended tasks)."""
    per_task = {}
    for ex in examples:
        per_task.setdefault(ex.task, []).append(1.0 / len(ex.choices) if ex.choices else None)
    return {t: (None if any(v is None for v in vals) else sum(vals) / len(vals)) for t, vals in per_task.items()}


@dataclass
class PromptEncoder:
    """How a training mode turns an ``Example`` into model inputs and segment ids.

    ``latent_text`` (the K latent token strings) goes right after the question for ``livr`` and
    ``latents-only``; ``mask-only`` inserts nothing and instead marks the last ``slot_count`` tokens
    of the user's text (the tokens right before where latents would go) as LATENT by position;
    ``image-twice`` gives every image twice. ``drop_latents=True`` encodes without the latent text
    (the "latents removed" probe).
    """

    processor: Any
    mode: str
    latent_text: str = ""
    latent_token_ids: tuple = ()
    image_token_ids: tuple = ()
    slot_count: int = 0
    max_length: Optional[int] = None
    _suffix_cache: dict = field(default_factory=dict, repr=False)

    @property
    def pad_token_id(self) -> int:
        return int(_tokenizer(self.processor).pad_token_id)

    def prepare(self, example):
        if self.mode == "image-twice":
            return dataclasses.replace(example, images=list(example.images) * 2)
        return example

    def encode(self, example, *, with_answer: bool, drop_latents: bool = False) -> dict:
        example = self.prepare(example)
        latent_text = "" if drop_latents else self.latent_text
        enc = encode_example(self.processor, example, latent_tokens=latent_text, with_answer=with_answer, max_length=self.max_length)
        if self.mode == "mask-only" and not drop_latents:
            enc["_slot_end"] = self._prompt_length(enc) - self._template_suffix_tokens(example)
            if enc["_slot_end"] - self.slot_count < 0:
                raise ValueError(f"mask-only mode needs {self.slot_count} prompt tokens to mark as latent slots; the prompt is shorter")
        return enc

    def _prompt_length(self, enc: dict) -> int:
        labels = enc["labels"]
        supervised = (labels != IGNORE_INDEX).nonzero()
        return int(supervised[0]) if len(supervised) else int(labels.numel())

    def _template_suffix_tokens(self, example) -> int:
        """Tokens the chat template puts after the user's text (end of turn, assistant header)."""
        key = len(example.images)
        if key not in self._suffix_cache:
            text = format_prompt(example)
            content = [{"type": "image"} for _ in example.images] + [{"type": "text", "text": text}]
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
            end = prompt.rfind(text) + len(text)
            tokenizer = _tokenizer(self.processor)
            self._suffix_cache[key] = len(tokenizer(prompt[end:], add_special_tokens=False)["input_ids"])
        return self._suffix_cache[key]

    def collate(self, encoded: Sequence[dict], padding_side: str) -> tuple:
        """(model inputs, labels, segment ids) for a list of ``encode`` outputs."""
        plain = [{k: v for k, v in e.items() if not k.startswith("_")} for e in encoded]
        batch = collate_examples(plain, self.pad_token_id, padding_side=padding_side)
        labels = batch.pop("labels")
        segment_ids = build_segment_ids(
            batch["input_ids"],
            image_token_ids=self.image_token_ids,
            latent_token_ids=self.latent_token_ids,
            labels=labels,
            attention_mask=batch["attention_mask"],
        )
        width = batch["input_ids"].shape[1]
        for row, e in enumerate(encoded):
            if "_slot_end" in e:
                offset = width - e["input_ids"].numel() if padding_side == "left" else 0
                end = offset + e["_slot_end"]
                segment_ids[row, end - self.slot_count:end] = int(Segment.LATENT)
        return batch, labels, segment_ids


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def rule_forced(handle, rule):
    """Temporarily run ``handle`` under ``rule`` (None: leave it as it is)."""
    if handle is None or rule is None:
        yield
        return
    previous = handle.rule
    handle.set_rule(rule)
    try:
        yield
    finally:
        handle.set_rule(previous)


@torch.no_grad()
def generate_replies(model, encoder: PromptEncoder, examples: Sequence, *, handle=None, batch_size: int = 8,
                     max_new_tokens: int = 16, drop_latents: bool = False) -> list:
    """Greedy replies (decoded text) for ``examples``; the latent tokens are never generated."""
    tokenizer = _tokenizer(encoder.processor)
    device = _device_of(model)
    replies = []
    suppress = list(encoder.latent_token_ids) or None
    with eval_mode(model):
        for chunk in _chunks(list(examples), batch_size):
            encoded = [encoder.encode(ex, with_answer=False, drop_latents=drop_latents) for ex in chunk]
            batch, _, segment_ids = encoder.collate(encoded, padding_side="left")
            batch = _to_device(batch, device)
            prompt_len = batch["input_ids"].shape[1]
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=encoder.pad_token_id, suppress_tokens=suppress)
            with (handle.use_segment_ids(segment_ids.to(device)) if handle is not None else nullcontext()):
                out = model.generate(**batch, **kwargs)
            replies.extend(tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True))
    return replies


@torch.no_grad()
def answer_logprobs(model, encoder: PromptEncoder, examples: Sequence, *, batch_size: int = 8, drop_latents: bool = False) -> list:
    """Summed log-probability of each example's answer text (and end of turn) after its prompt."""
    device = _device_of(model)
    scores = []
    with eval_mode(model):
        for chunk in _chunks(list(examples), batch_size):
            encoded = [encoder.encode(ex, with_answer=True, drop_latents=drop_latents) for ex in chunk]
            batch, labels, segment_ids = encoder.collate(encoded, padding_side="right")
            batch = _to_device(batch, device)
            logits = model(**batch, segment_ids=segment_ids.to(device)).logits.float()
            labels = labels.to(device)[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            mask = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.extend((picked * mask).sum(dim=1).tolist())
    return scores


def predict(model, encoder: PromptEncoder, examples: Sequence, *, method: str = "generate", handle=None,
            batch_size: int = 8, max_new_tokens: int = 16, drop_latents: bool = False) -> list:
    """One record per example: task, gold answer, prediction, correct, and the reply (generation)."""
    if method not in ("generate", "likelihood"):
        raise ValueError(f"method must be 'generate' or 'likelihood'; got {method!r}")
    examples = list(examples)
    records = [None] * len(examples)
    to_generate = [i for i, ex in enumerate(examples) if method == "generate" or not ex.choices]
    if method == "likelihood":
        options, owners = [], []
        for i, ex in enumerate(examples):
            for letter in LETTERS[:len(ex.choices)]:
                options.append(dataclasses.replace(ex, answer=letter))
                owners.append(i)
        scores = answer_logprobs(model, encoder, options, batch_size=batch_size, drop_latents=drop_latents)
        best = {}
        for i, option, score in zip(owners, options, scores):
            if i not in best or score > best[i][1]:
                best[i] = (option.answer, score)
        for i, (letter, _) in best.items():
            ex = examples[i]
            records[i] = {"task": ex.task, "answer": ex.answer, "prediction": letter, "correct": letter == answer_letter(ex.answer)}
    if to_generate:
        replies = generate_replies(model, encoder, [examples[i] for i in to_generate], handle=handle, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, drop_latents=drop_latents)
        for i, reply in zip(to_generate, replies):
            ex = examples[i]
            pred, correct = score_reply(reply, ex.answer, len(ex.choices))
            records[i] = {"task": ex.task, "answer": ex.answer, "prediction": pred, "correct": bool(correct), "reply": reply}
    return records


def result_from_records(records: Sequence[dict]) -> EvalResult:
    result = EvalResult()
    for r in records:
        result.add(r["task"], r["correct"], r)
    return result


@torch.no_grad()
def answer_latent_attention(model, handle, encoder: PromptEncoder, examples: Sequence, *, batch_size: int = 4) -> Optional[float]:
    """Mean attention mass that answer tokens put on the latent tokens.

    For each example (gold answer appended), each text layer and head, each answer query's
    attention probabilities summed over the LATENT keys; averaged over answer queries, heads,
    layers and examples (the paper reports 0.076 for LIVR vs 0.028 for latents without the mask).
    None when the prompts hold no latent slots.
    """
    device = _device_of(model)
    per_example = []
    with eval_mode(model):
        for chunk in _chunks(list(examples), batch_size):
            encoded = [encoder.encode(ex, with_answer=True) for ex in chunk]
            batch, _, segment_ids = encoder.collate(encoded, padding_side="right")
            batch = _to_device(batch, device)
            segment_ids = segment_ids.to(device)
            with handle.capture_attention() as capture:
                model(**batch, segment_ids=segment_ids)
            if not capture.weights:
                raise ValueError("capture_attention recorded no layers: is the model patched with patch_attention?")
            kinds = capture.segment_ids.to(device)
            # (B, Nq, Nk) averaged over layers and heads.
            weights = torch.stack([w.float().mean(dim=1) for w in capture.weights]).mean(dim=0)
            for row in range(weights.shape[0]):
                queries = kinds[row] == int(Segment.ANSWER)
                keys = kinds[row] == int(Segment.LATENT)
                if not keys.any():
                    return None
                mass = weights[row][queries][:, keys].sum(dim=-1)
                per_example.append(mass.mean().item())
    return sum(per_example) / len(per_example) if per_example else None


@torch.no_grad()
def latent_image_attention(model, handle, encoder: PromptEncoder, example) -> Optional[list]:
    """Per image of ``example``, a 2-D map (merged patch grid) of the attention the latent tokens pay
    to its image tokens, averaged over layers, heads and latents. None when there are no latents or
    the model gives no ``image_grid_thw`` (non-Qwen layouts)."""
    device = _device_of(model)
    encoded = [encoder.encode(example, with_answer=False)]
    batch, _, segment_ids = encoder.collate(encoded, padding_side="right")
    grid_thw = batch.get("image_grid_thw")
    if grid_thw is None:
        return None
    with eval_mode(model), handle.capture_attention() as capture:
        model(**_to_device(batch, device), segment_ids=segment_ids.to(device))
    kinds = capture.segment_ids[0].cpu()
    queries = kinds == int(Segment.LATENT)
    keys = kinds == int(Segment.IMAGE)
    if not queries.any() or not keys.any():
        return None
    weights = torch.stack([w[0].float().mean(dim=0).cpu() for w in capture.weights]).mean(dim=0)
    per_token = weights[queries][:, keys].mean(dim=0)
    merge = _merge_size(model, encoder.processor)
    maps, start = [], 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        count = t * rows * cols
        maps.append(per_token[start:start + count].reshape(t, rows, cols).mean(dim=0))
        start += count
    if start != per_token.numel():
        raise ValueError(f"image_grid_thw accounts for {start} image tokens but the prompt holds {per_token.numel()}")
    return maps


def _merge_size(model, processor) -> int:
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    merge = getattr(vision, "spatial_merge_size", None) or getattr(getattr(processor, "image_processor", None), "merge_size", None)
    if not merge:
        raise ValueError("cannot map image tokens to patches: neither the vision config nor the image processor names a merge size")
    return int(merge)


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


METRICS_FILE = "metrics.json"
HEATMAP_FILE = "latent_attention.png"
DEFAULT_PROBE_LIMIT = 32


def evaluate_model(model, handle, encoder: PromptEncoder, examples: Sequence, *, method: str = "generate",
                   rule: str = "standard", batch_size: int = 8, max_new_tokens: int = 16, probes: bool = True,
                   probe_limit: int = DEFAULT_PROBE_LIMIT, output_dir=None, extra: Optional[dict] = None,
                   verbose: bool = True) -> dict:
    """Accuracy per task and averaged, plus (``probes``) the paper's probes; writes
    ``metrics.json`` (and the heatmap PNG) into ``output_dir`` when given, prints a table.

    ``rule`` is the attention rule for the main accuracy (``standard``: the deployed model).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("examples must hold at least one Example to evaluate")
    options = dict(method=method, handle=handle, batch_size=batch_size, max_new_tokens=max_new_tokens)
    with rule_forced(handle, rule):
        main = result_from_records(predict(model, encoder, examples, **options))
    metrics = {
        "method": method,
        "rule": rule,
        "mode": encoder.mode,
        "num_examples": len(examples),
        "accuracy": main.to_dict(),
        "chance": chance_accuracy(examples),
        "predictions": main.predictions,
    }
    has_slots = bool(encoder.latent_text) or encoder.mode == "mask-only"
    # Removing mask-only's slots changes nothing under the standard rule: they are ordinary text.
    removable = bool(encoder.latent_text)
    if probes:
        probe = {}
        subset = examples[:probe_limit]
        with rule_forced(handle, rule):
            probe["answer_to_latent_attention"] = answer_latent_attention(model, handle, encoder, subset) if has_slots else None
            probe["latents_removed"] = (
                result_from_records(predict(model, encoder, examples, drop_latents=True, **options)).to_dict() if removable else None
            )
        with rule_forced(handle, "bottleneck"):
            probe["bottleneck_forced"] = result_from_records(predict(model, encoder, examples, **options)).to_dict()
        probe["heatmap"] = None
        if has_slots and output_dir is not None:
            with rule_forced(handle, rule):
                maps = latent_image_attention(model, handle, encoder, examples[0])
            if maps is not None:
                shown = encoder.prepare(examples[0]).images
                draw_heatmap(shown, maps, Path(output_dir) / HEATMAP_FILE)
                probe["heatmap"] = HEATMAP_FILE
        metrics["probes"] = probe
    if extra:
        metrics.update(extra)
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / METRICS_FILE, metrics)
    if verbose:
        print(metrics_table(metrics), flush=True)
    return metrics


def metrics_table(metrics: dict) -> str:
    """The printed summary: accuracy per task and averaged, next to the probes and chance."""
    columns = {"accuracy": metrics["accuracy"]}
    probes = metrics.get("probes") or {}
    for name in ("latents_removed", "bottleneck_forced"):
        if probes.get(name):
            columns[name] = probes[name]
    rows = {}
    for column, result in columns.items():
        for task, score in result["per_task"].items():
            rows.setdefault(task, {})[column] = score["accuracy"]
        rows.setdefault("(average)", {})[column] = result["average"]
    chances = metrics.get("chance", {})
    for task, chance in chances.items():
        rows.setdefault(task, {})["chance"] = chance
    if chances and all(v is not None for v in chances.values()):
        rows.setdefault("(average)", {})["chance"] = sum(chances.values()) / len(chances)
    table = format_table(rows, list(columns) + ["chance"])
    lines = [f"{metrics['num_examples']} examples, {metrics['method']} scoring, rule {metrics['rule']}", table]
    attention = probes.get("answer_to_latent_attention")
    if attention is not None:
        lines.append(f"mean answer->latent attention: {attention:.4f}")
    if probes.get("heatmap"):
        lines.append(f"latent->image attention heatmap: {probes['heatmap']}")
    return "\n".join(lines)
