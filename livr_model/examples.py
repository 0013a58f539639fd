"""The Example schema: one visual question, and its prompt and answer text in BLINK's style."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import List

from PIL import Image

LETTERS = string.ascii_uppercase
MIN_CHOICES = 2
CHOICES_HEADER = "Select from the following choices."


def _normalize_letter(answer: str) -> str:
    """``"(B)"``, ``" B "`` -> ``"B"``; anything else is returned stripped, unchanged."""
    text = answer.strip()
    if len(text) == 3 and text[0] == "(" and text[2] == ")":
        text = text[1]
    return text


@dataclass
class Example:
    """One visual question.

    ``images``: PIL images in the order the prompt refers to them. ``choices``: option texts, empty
    for an open-ended question. ``answer``: a letter ("A".."Z"; "(A)" is accepted and normalised)
    naming one of ``choices``, or the exact answer text when there are no choices. ``meta``: what
    a synthetic generator drew (ground truth for tests), free-form.
    """

    images: list
    question: str
    choices: List[str]
    answer: str
    task: str = "custom"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images; got {type(self.images).__name__}")
        self.images = list(self.images)
        for index, image in enumerate(self.images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{index}] must be a PIL.Image.Image; got {type(image).__name__}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be a non-empty string; got {self.question!r}")
        if self.choices is None:
            self.choices = []
        if not isinstance(self.choices, (list, tuple)):
            raise ValueError(f"choices must be a list of strings (empty for open-ended); got {type(self.choices).__name__}")
        self.choices = list(self.choices)
        if any(not isinstance(c, str) or not c.strip() for c in self.choices):
            raise ValueError(f"choices must be non-empty strings; got {self.choices!r}")
        if self.choices and not MIN_CHOICES <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"choices must hold {MIN_CHOICES} to {len(LETTERS)} options; got {len(self.choices)}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"answer must be a non-empty string; got {self.answer!r}")
        if self.choices:
            letter = _normalize_letter(self.answer)
            valid = LETTERS[: len(self.choices)]
            if len(letter) != 1 or letter not in valid:
                raise ValueError(
                    f"answer must be one of the letters {', '.join(valid)} (or '(A)' style) naming a choice; "
                    f"got {self.answer!r} for {len(self.choices)} choices"
                )
            self.answer = letter
        else:
            self.answer = self.answer.strip()
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty string; got {self.task!r}")

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)


def format_prompt(example: Example) -> str:
    """BLINK's prompt: the question, then ``Select from the following choices.`` and ``(A) ...`` lines."""
    if not example.choices:
        return example.question
    options = "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(example.choices))
    return f"{example.question}\n{CHOICES_HEADER}\n{options}"


def answer_text(example: Example) -> str:
    """The supervised target: ``"(A)"`` for multiple choice, the answer itself for open-ended questions."""
    return f"({example.answer})" if example.choices else example.answer
