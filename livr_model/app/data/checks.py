"""Warnings about the data of a run: examples given twice, and validation examples that are also
training examples (the same question on the same images, whatever the label)."""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Sequence

from .fingerprint import example_fingerprint


class DataWarning(UserWarning):
    """Data that trains or validates, but probably not as the user meant."""


def overlap_report(train: Sequence, val: Sequence, train_spec=None, val_spec=None) -> list:
    """Messages (empty when all is well) about duplicates in ``train`` and ``val`` examples that
    also appear in ``train``; compared by content (``example_fingerprint`` without the answer)."""
    messages = []
    if train_spec and val_spec and train_spec == val_spec:
        messages.append(f"the training data {train_spec!r} is given again as validation data: "
                        "validation accuracy will measure memorisation, not generalisation")
    train_counts = Counter(example_fingerprint(e, with_answer=False) for e in train)
    extra = sum(n - 1 for n in train_counts.values() if n > 1)
    if extra:
        repeated = sum(1 for n in train_counts.values() if n > 1)
        messages.append(f"{extra} of {len(train)} training examples repeat another one ({repeated} distinct examples "
                        "occur more than once; an identical question on identical images counts as a repeat)")
    if val:
        leaked = sum(1 for e in val if example_fingerprint(e, with_answer=False) in train_counts)
        if leaked:
            messages.append(f"{leaked} of {len(val)} validation examples are also training examples")
    return messages


def warn_about_overlap(train: Sequence, val: Sequence, train_spec=None, val_spec=None) -> list:
    """``overlap_report`` as ``DataWarning``s; returns the messages."""
    messages = overlap_report(train, val, train_spec, val_spec)
    for message in messages:
        warnings.warn(message, DataWarning, stacklevel=2)
    return messages
