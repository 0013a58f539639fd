"""Scoring: the choice letter or number a reply commits to, accuracy per task, printed tables.

A reply's letter is read as BLINK scores it (a bare "A" or "(A)"; else a single distinct "(X)"
anywhere in the reply; we also accept a reply that starts with "A." / "A)" / "A:" or
"Answer: A"). Open-ended numeric answers (no choices) are compared by exact match of the first
number in the reply.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from livr_model.prompts import LETTERS

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


def result_from_records(records: Sequence[dict]) -> EvalResult:
    result = EvalResult()
    for r in records:
        result.add(r["task"], r["correct"], r)
    return result


# Accuracy this many points under chance is not noise on the study's 100-item sets (over two standard
# errors of a 4-way guess): the model prefers wrong answers systematically.
BELOW_CHANCE_MARGIN = 0.10


def most_common_prediction(records: Sequence[dict]) -> tuple:
    """(prediction, share of all items) of the most common committed prediction; (None, 0.0) without one."""
    committed = Counter(r["prediction"] for r in records if r.get("prediction") is not None)
    if not committed:
        return None, 0.0
    prediction, count = committed.most_common(1)[0]
    return prediction, count / len(records)


def _gold_share(records: Sequence[dict], prediction: str) -> Optional[float]:
    """The share of items whose gold answer is ``prediction`` (None when an answer is not a letter)."""
    try:
        return sum(answer_letter(r["answer"]) == prediction for r in records) / len(records)
    except (KeyError, ValueError):
        return None


def is_below_chance(accuracy: float, chance: float, margin: float = BELOW_CHANCE_MARGIN) -> bool:
    """Accuracy at least ``margin`` under chance: wrong answers preferred, not guessed."""
    return accuracy <= chance - margin


def below_chance_note(metrics: dict, margin: float = BELOW_CHANCE_MARGIN) -> Optional[str]:
    """A plain warning when accuracy is at least ``margin`` under chance (multiple-choice tasks), naming
    the answer the model prefers; None otherwise. Under chance is not weak learning: the model's
    preferences run against the gold answers, which a reader must not take for a noisy zero."""
    chances = list((metrics.get("chance") or {}).values())
    if not chances or any(c is None for c in chances):
        return None
    chance = sum(chances) / len(chances)
    accuracy = metrics["accuracy"]["average"]
    if not is_below_chance(accuracy, chance, margin):
        return None
    records = metrics.get("predictions") or []
    prediction, share = most_common_prediction(records)
    text = (f"BELOW CHANCE: accuracy {100 * accuracy:.1f}% is {100 * (chance - accuracy):.1f} points under chance "
            f"({100 * chance:.1f}%): the answers are systematically wrong, not guesses.")
    if prediction is not None:
        gold = _gold_share(records, prediction)
        text += f" The most common answer, {prediction!r}, is given for {100 * share:.0f}% of the items"
        text += f" but is the gold answer of {100 * gold:.0f}%." if gold is not None else "."
    return text + (" Either training moved the model too little to undo the preferences it started with (score the "
                   "model before training to tell), or the training labels and the evaluation disagree.")


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
    note = below_chance_note(metrics)
    if note:
        lines.append(note)
    return "\n".join(lines)
