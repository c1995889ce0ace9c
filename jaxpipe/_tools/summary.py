"""``param_summary``: the arrays of a pytree at a glance (path, shape, dtype, count)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    """Shapes, dtypes and sizes of the arrays in a pytree, shown as a table.

    Attributes:
      rows: ``(path, shape, dtype, count)`` for each array, in pytree order.
      nbytes: the arrays' total size in bytes.
    """

    rows: tuple[tuple[str, tuple[int, ...], str, int], ...]
    nbytes: int

    @property
    def count(self) -> int:
        """The number of scalars in all arrays together."""
        return sum(row[3] for row in self.rows)

    def __str__(self) -> str:
        table = [("path", "shape", "dtype", "count")]
        table += [(path, str(shape), dtype, f"{count:,}") for path, shape, dtype, count in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths[:3], strict=True)), row[3].rjust(widths[3])])
            for row in table
        ]
        arrays = f"{len(self.rows)} array{'s' if len(self.rows) != 1 else ''}"
        lines.append(f"total: {self.count:,} parameters in {arrays}, {_format_bytes(self.nbytes)}")
        return "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__


def param_summary(tree: Any) -> ParamSummary:
    """A table of a pytree's arrays: path, shape, dtype and count, with totals.

    Works on anything ``jax.tree`` can flatten: Flax parameters, a
    :class:`TrainState`'s ``params``, optimizer states.

    >>> import jax.numpy as jnp
    >>> print(param_summary({"dense": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}}))
    path          shape     dtype    count
    dense/bias    (10,)     float32     10
    dense/kernel  (64, 10)  float32    640
    total: 650 parameters in 2 arrays, 2.5 KiB
    """
    rows = []
    nbytes = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        count = math.prod(shape)
        rows.append((jax.tree_util.keystr(path, simple=True, separator="/"), shape, str(dtype), count))
        nbytes += getattr(leaf, "nbytes", 0) or 0
    return ParamSummary(tuple(rows), nbytes)


def _format_bytes(size: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    unit = 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} B" if unit == 0 else f"{size:.1f} {units[unit]}"
