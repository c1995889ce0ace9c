"""A data iterator's state (``run.data_state``) as the JSON a checkpoint holds.

Hand-written iterators often keep NumPy numbers in ``get_state()`` (an
``np.int64`` counter, an array of indices), which ``json`` refuses. They become
the Python numbers and lists they stand for, so a resumed ``set_state`` gets
plain ints back; anything JSON cannot hold is found here, before Orbax starts
writing, instead of failing half-way through a save.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class NotJSONError(TypeError):
    """A value in the iterator's state that JSON cannot hold; ``where`` is its place, e.g. ``['order'][2]``."""

    def __init__(self, value: Any, where: str) -> None:
        super().__init__(f"{type(value).__module__}.{type(value).__qualname__} at state{where}")
        self.value, self.where = value, where


def as_json(value: Any, where: str = "") -> Any:
    """``value`` as JSON-able data: NumPy numbers and arrays as Python numbers and lists, bytes as str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):  # np.int64(3) -> 3, np.float32 -> float, np.bool_ -> bool
        return as_json(value.item(), where)
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "shape")):
        return as_json(np.asarray(value).tolist(), where)  # also a jax.Array
    if isinstance(value, bytes):  # as fit encodes a Grain DataLoader's state
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise NotJSONError(value, where) from None
    if isinstance(value, Mapping):
        return {_key(k, value, where): as_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise NotJSONError(value, where)


def _key(key: Any, mapping: Mapping[Any, Any], where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return str(key)  # as json.dumps does
    raise NotJSONError(key, f"{where} (a key of {type(mapping).__name__})")
