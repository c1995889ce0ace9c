"""A key's use as a user reads it (the API, the source line), and the advice for each kind of reuse."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Where:
    """The user-facing view of an equation, from its source infos."""

    api: str | None  # e.g. "jax.random.normal"
    file: str | None
    line: int | None
    scope: str  # Flax module path from the name stack, e.g. "MLP/Dense_0"
    initializer: str | None
    param: str | None
    location: str | None  # "model.py:12", or "In[3]:2" for a notebook cell
    caller: str | None  # the outermost user frame, to tell calls of one helper apart


@dataclasses.dataclass
class Use:
    kind: str  # "consume" | "split" | "fold_in"
    what: str
    where: Where
    note: str
    tag: frozenset[tuple[int, int]]

    def place(self, with_caller: bool = False) -> str:
        text = self.what if self.where.location is None else f"{self.what} at {self.where.location}"
        if with_caller and self.where.caller and self.where.caller != self.where.location:
            text += f" (called from {self.where.caller})"
        return f"{text} ({self.note})" if self.note else text


REUSE_KINDS = {
    ("consume", "consume"): "consumed twice",
    ("split", "split"): "split twice",
    ("split", "consume"): "consumed after split",
    ("consume", "split"): "split after use",
    ("consume", "fold_in"): "folded after use",
    ("split", "fold_in"): "folded after use",
    ("fold_in", "consume"): "used after fold_in",
    ("fold_in", "split"): "used after fold_in",
}

ADVICE = {
    "consumed twice": (
        "is drawn from twice: {0} and {1}. Both draws get the same random bits. "
        "Split it and use each subkey once: `k1, k2 = jax.random.split(key)`."
    ),
    "split twice": (
        "is split twice: {0} and {1}. Both splits return the same subkeys. "
        "Split once and pass the subkeys on, or split one of the subkeys again."
    ),
    "consumed after split": (
        "is drawn from after being split: {0}, then {1}. The draw is correlated with the subkeys. "
        "After `key, sub = jax.random.split(key)` use only `key` and `sub`."
    ),
    "split after use": (
        "is split after being drawn from: {0}, then {1}. The subkeys are correlated with the draw. "
        "Split first and draw from a subkey: `key, sub = jax.random.split(key)`."
    ),
    "folded after use": (
        "is passed to fold_in after being used: {0}, then {1}. `fold_in(key, i)` equals "
        "`split(key)[i]` and feeds the key's own draws. Derive keys from it one way only."
    ),
    "used after fold_in": (
        "is used after fold_in: {0}, then {1}. `fold_in(key, i)` equals `split(key)[i]` and feeds "
        "the key's own draws. Derive keys from it one way only: fold_in, or one split, or one draw."
    ),
}


# --- how keys and places read ----------------------------------------------------------


def impl_name(impl: Any) -> str:
    return str(getattr(impl, "name", impl))


def index_text(index: Sequence[Any]) -> str:
    return f"[{', '.join(str(int(i)) for i in index)}]" if len(index) else ""


def iteration_note(where: Where, default: str) -> str:
    loop = where.api or default
    return f"2nd iteration of {loop}" + (f" at {where.location}" if where.location else "")
