"""The key tree's nodes and the reuses found in it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxpipe._prng.uses import Use

KEY_KINDS = ("root", "fold_in", "index")


class KeyReuseWarning(UserWarning):
    """A PRNG key is used twice, so two "independent" random draws are correlated.

    Failing::

        a = jax.random.normal(key, (3,))
        b = jax.random.normal(key, (3,))      # b == a

    fixed::

        k1, k2 = jax.random.split(key)
        a, b = jax.random.normal(k1, (3,)), jax.random.normal(k2, (3,))
    """


@dataclasses.dataclass(eq=False)
class KeyNode:
    """A node of the key tree.

    Attributes:
      kind: ``"root"``, ``"fold_in"`` or ``"index"`` for a key; ``"split"`` for a
        split (its children are the ``"index"`` keys it made); ``"consume"`` for a
        draw (a leaf).
      label: short name, used in paths: ``"key"``, ``"split(2)"``, ``"[1]"``,
        ``"fold_in(3)"``, ``"jax.random.normal"``.
      detail: more about it: the initializer and Flax module of a draw, ...
      location: the user's ``file:line`` (``None`` for arguments).
      note: e.g. ``"2nd iteration of jax.lax.fori_loop at f.py:9"``.
      returned: the key is among the function's outputs.
      reuse: the kinds of reuse found at this key.
    """

    kind: str
    label: str
    detail: str = ""
    location: str | None = None
    note: str = ""
    children: list[KeyNode] = dataclasses.field(default_factory=list, repr=False)
    parent: KeyNode | None = dataclasses.field(default=None, repr=False)
    returned: bool = False
    reuse: list[str] = dataclasses.field(default_factory=list)
    _uses: list[Use] = dataclasses.field(default_factory=list, repr=False)
    _folds: dict[Any, KeyNode] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def path(self) -> str:
        """How the key was derived: ``"key → split(4)[2] → fold_in(3)"``."""
        parts: list[str] = []
        node: KeyNode | None = self
        while node is not None:
            if node.kind == "index" and node.parent is not None and node.parent.kind == "split":
                parts.append(node.parent.label + node.label)
                node = node.parent.parent
            else:
                parts.append(node.label)
                node = node.parent
        return " → ".join(reversed(parts))

    def _add(self, child: KeyNode) -> KeyNode:
        child.parent = self
        self.children.append(child)
        return child


@dataclasses.dataclass(frozen=True)
class KeyReuse:
    """One break of the one-use rule.

    Attributes:
      kind: ``"consumed twice"``, ``"split twice"``, ``"consumed after split"``,
        ``"split after use"``, ``"folded after use"`` or ``"used after fold_in"``.
      path: the key's path in the tree (:attr:`KeyNode.path`).
      places: the two uses, e.g. ``("jax.random.normal at f.py:3", ...)``.
      message: the warning text, with the fix.
    """

    kind: str
    path: str
    places: tuple[str, ...]
    message: str
    node: KeyNode = dataclasses.field(compare=False, repr=False)
