"""The layout of a training state: leaf paths, shapes and dtypes.

A checkpoint records its state's layout as JSON, so that restoring into a
pipeline of another structure can say exactly which leaves differ instead of
failing somewhere inside Orbax.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_SHOWN = 12  # differing leaves listed in an error; the rest are counted


def describe_leaf(leaf: Any) -> str:
    """``float32[64,10]``; typed PRNG keys keep their dtype, e.g. ``key<fry>[]``."""
    dtype = getattr(leaf, "dtype", type(leaf).__name__)
    shape = ",".join(str(d) for d in getattr(leaf, "shape", ()))
    return f"{dtype}[{shape}]"


def layout(state: Any) -> dict[str, str]:
    """``{leaf path: dtype[shape]}`` for every array in ``state``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): describe_leaf(leaf) for path, leaf in leaves}


def differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per leaf that is missing, extra or of another shape or dtype."""
    lines = []
    for path in [*saved, *(p for p in current if p not in saved)]:
        before, after = saved.get(path, "missing"), current.get(path, "missing")
        if before != after:
            lines.append(f"  {path}: {before} in the checkpoint, {after} in this pipeline")
    if len(lines) > _SHOWN:
        lines = [*lines[:_SHOWN], f"  ... and {len(lines) - _SHOWN} more"]
    return lines


def abstract(leaf: Any) -> Any:
    """The restore target of one leaf: shape, dtype (typed PRNG keys included) and placement."""
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
