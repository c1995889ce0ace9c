"""The abstract values the key analysis computes: key elements, value records, and where an equation sits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxpipe._prng.nodes import KeyNode

MAX_ALTERNATIVES = 8  # keys a cond output may stand for


class Elem:
    """One key element: the key nodes it may be (several after a ``cond``), each with
    the branch choices under which it is that node."""

    __slots__ = ("alts",)

    def __init__(self, alts: Sequence[tuple[KeyNode, frozenset[tuple[int, int]]]]) -> None:
        self.alts = tuple(alts)[:MAX_ALTERNATIVES]

    def identity(self) -> tuple[Any, ...]:
        return tuple((id(node), tag) for node, tag in self.alts)


@dataclasses.dataclass
class Abs:
    """What is known of one jaxpr value.

    ``token`` is equal for two values only if they are equal (value numbering);
    ``value`` is the value itself for small integer data; ``keys`` holds the key
    elements of a typed key array (its shape) or of tracked raw key data (its shape
    without the trailing data axis); ``uniform`` is the token every element equals.
    """

    token: int
    value: Any = None  # np.ndarray
    keys: Any = None  # np.ndarray of Elem | None
    uniform: int | None = None


def key_elements(a: Abs) -> list[Elem]:
    return [] if a.keys is None else [e for e in a.keys.flat if e is not None]


@dataclasses.dataclass(frozen=True)
class Context:
    """Where an equation sits: the enclosing equations' source infos, the cond
    branches taken to get there, and the loop iteration (as a note)."""

    sources: tuple[Any, ...] = ()
    tag: frozenset[tuple[int, int]] = frozenset()
    note: str = ""

    def enter(self, eqn: Any) -> Context:
        return dataclasses.replace(self, sources=(*self.sources, eqn.source_info))

    def branch(self, cond: int, index: int) -> Context:
        return dataclasses.replace(self, tag=self.tag | {(cond, index)})

    def iteration(self, note: str) -> Context:
        return dataclasses.replace(self, note=f"{self.note}; {note}" if self.note else note)
