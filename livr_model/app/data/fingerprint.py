"""Content fingerprints of examples: what leakage checks and resume checks compare.

An example's fingerprint hashes what the model sees and is scored on: every image's pixels
(mode, size and bytes, so a re-encoded PNG of the same picture matches), the question, the
choices and the answer. File names and paths play no part. A data set's fingerprint hashes its
examples' fingerprints in order, so reordering, cutting or relabelling a data set changes it.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Sequence

HASH_NAME = "sha256"
# Separates fields so that ("ab", "c") and ("a", "bc") hash differently.
FIELD_SEPARATOR = b"\x1f"


def image_fingerprint(image) -> str:
    """Hash of a PIL image's mode, size and pixel bytes."""
    digest = hashlib.new(HASH_NAME)
    digest.update(image.mode.encode())
    digest.update(FIELD_SEPARATOR)
    digest.update(f"{image.size[0]}x{image.size[1]}".encode())
    digest.update(FIELD_SEPARATOR)
    digest.update(image.tobytes())
    return digest.hexdigest()


def example_fingerprint(example, *, with_answer: bool = True) -> str:
    """Hash of an example's images (pixels), question, choices and (by default) answer.

    ``with_answer=False`` gives the fingerprint of the item a model is asked, which is what a
    leakage check compares: the same question on the same images is leaked whatever its label.
    """
    digest = hashlib.new(HASH_NAME)
    for image in example.images:
        digest.update(image_fingerprint(image).encode())
        digest.update(FIELD_SEPARATOR)
    parts: List[str] = [example.question, *example.choices]
    if with_answer:
        parts.append(example.answer)
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(FIELD_SEPARATOR)
    return digest.hexdigest()


def dataset_fingerprint(examples: Sequence) -> str:
    """Hash of the examples' fingerprints (answers included) in order."""
    return fingerprint_of_fingerprints(example_fingerprint(e) for e in examples)


def fingerprint_of_fingerprints(fingerprints: Iterable[str]) -> str:
    digest = hashlib.new(HASH_NAME)
    count = 0
    for fp in fingerprints:
        digest.update(fp.encode())
        digest.update(FIELD_SEPARATOR)
        count += 1
    digest.update(str(count).encode())
    return digest.hexdigest()
