"""Segment kinds and attention rules: which kind of token may attend which.

A rule is a 5x5 boolean table indexed ``[query kind][key kind]``. Causality, padding and
document boundaries are applied on top of the table by every backend, so a rule only has to
say which kinds may talk to each other.
"""
from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import numpy as np
import torch


class Segment(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    LATENT = 2
    ANSWER = 3
    PAD = 4


NUM_SEGMENTS = len(Segment)


@dataclass(frozen=True)
class AttentionRule:
    """A named 5x5 allow table: ``allowed[q][k]`` says whether a query of kind q may see a key of kind k.

    PAD rows and columns are forced to False whatever the table says (a padded token neither
    attends nor is attended), so ``allows(Segment.PAD, ...)`` is always False.
    """

    name: str
    allowed: tuple

    def __post_init__(self):
        shape_error = ValueError(
            f"AttentionRule.allowed must be a {NUM_SEGMENTS}x{NUM_SEGMENTS} table "
            f"indexed [query kind][key kind]; got {self.allowed!r}"
        )
        if isinstance(self.allowed, (str, bytes)) or not isinstance(self.allowed, Iterable):
            raise shape_error
        rows = [list(row) if isinstance(row, Iterable) and not isinstance(row, (str, bytes)) else None for row in self.allowed]
        if len(rows) != NUM_SEGMENTS or any(r is None or len(r) != NUM_SEGMENTS for r in rows):
            raise shape_error
        rows = tuple(tuple(_table_entry(x, q, k) for k, x in enumerate(row)) for q, row in enumerate(rows))
        pad = int(Segment.PAD)
        rows = tuple(
            tuple(v and q != pad and k != pad for k, v in enumerate(row)) for q, row in enumerate(rows)
        )
        object.__setattr__(self, "allowed", rows)
        # Device copies of the table, made once per device: a host-to-device copy per forward would
        # make the host wait for the GPU.
        object.__setattr__(self, "_tables", {})

    @classmethod
    def from_blocked(cls, name: str, blocked: Iterable[tuple] = ()) -> "AttentionRule":
        """Every non-PAD pair allowed except the ``(query kind, key kind)`` pairs in ``blocked``."""
        table = [[True] * NUM_SEGMENTS for _ in range(NUM_SEGMENTS)]
        for q, k in blocked:
            table[int(Segment(q))][int(Segment(k))] = False
        return cls(name, tuple(tuple(r) for r in table))

    def allows(self, query_kind, key_kind) -> bool:
        return self.allowed[int(query_kind)][int(key_kind)]

    @property
    def row_bits(self) -> tuple:
        """Per query kind, a bit mask of the key kinds it may see (bit k set = kind k allowed)."""
        return tuple(sum(1 << k for k, v in enumerate(row) if v) for row in self.allowed)

    @property
    def bits(self) -> int:
        """The whole table packed into one integer, bit ``q * 5 + k``: how the kernels receive it."""
        return sum(bits << (q * NUM_SEGMENTS) for q, bits in enumerate(self.row_bits))

    def table(self, device=None) -> torch.Tensor:
        """The (5, 5) bool table on ``device``, cached per device (do not modify it in place)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._tables:
            self._tables[device] = torch.tensor(self.allowed, dtype=torch.bool, device=device)
        return self._tables[device]

    def __repr__(self) -> str:
        names = [s.name[:3] for s in Segment]
        lines = [f"AttentionRule({self.name!r}, q\\k " + " ".join(names) + ")"]
        for s, row in zip(Segment, self.allowed):
            lines.append(f"  {s.name:<6} " + "  ".join(" x " if v else " . " for v in row))
        return "\n".join(lines)


def _table_entry(value, q: int, k: int) -> bool:
    """One table entry as a bool: Python/numpy/torch bools and the integers 0 and 1 only, so that a
    string such as ``"False"`` (truthy) cannot silently allow a pair."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    raise ValueError(
        f"AttentionRule.allowed[{q}][{k}] ({Segment(q).name} query, {Segment(k).name} key) must be a bool "
        f"or 0/1; got {value!r} ({type(value).__name__})"
    )


STANDARD = AttentionRule.from_blocked("standard")
BOTTLENECK = AttentionRule.from_blocked(
    "bottleneck", [(Segment.TEXT, Segment.IMAGE), (Segment.ANSWER, Segment.IMAGE)]
)
BOTTLENECK_ANSWER_ONLY = AttentionRule.from_blocked(
    "bottleneck_answer_only", [(Segment.ANSWER, Segment.IMAGE)]
)

RULES: Mapping[str, AttentionRule] = {r.name: r for r in (STANDARD, BOTTLENECK, BOTTLENECK_ANSWER_ONLY)}

RuleLike = Union[str, AttentionRule]


def resolve_rule(rule: RuleLike) -> AttentionRule:
    """A rule name from ``RULES`` or an ``AttentionRule``; anything else is a ValueError."""
    if isinstance(rule, AttentionRule):
        return rule
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)} or an AttentionRule; got {rule!r}")
        return RULES[rule]
    raise ValueError(f"rule must be a rule name ({sorted(RULES)}) or an AttentionRule; got {type(rule).__name__}")
