"""How stage options are compared, hashed and written back as Python text."""

from __future__ import annotations

from typing import Any

_LITERALS = (bool, int, float, complex, str, bytes, type(None))


def format_value(value: Any) -> str:
    """Writes a value as it would appear in hand-written JAX code."""
    if isinstance(value, _LITERALS):
        return repr(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<{getattr(value.dtype, 'name', value.dtype)}{list(value.shape)}>"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if callable(value) and isinstance(name, str) and "<" not in name:
        return name
    text = repr(value)
    if "\n" in text or len(text) > 60:
        return f"{type(value).__name__}(...)"
    return text


def format_options(options: Any) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in dict(options).items())


def same_value(a: Any, b: Any) -> bool:
    """Equality that never raises and treats arrays as equal only to themselves."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # arrays and other objects without a truth value
        return False


def _freeze(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return frozenset((k, _freeze(v)) for k, v in value.items())
    return value


def value_hash(value: Any) -> int:
    """A hash consistent with :func:`same_value`; unhashable values hash by type."""
    try:
        return hash(_freeze(value))
    except TypeError:
        return hash(type(value).__qualname__)
