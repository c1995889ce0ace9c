"""How stage options are compared, hashed and written back as Python text."""

from __future__ import annotations

import inspect
from typing import Any

import jax

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
    public = _public_jax_name(value)
    if public is not None:
        return public
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if callable(value) and isinstance(name, str) and "<" not in name:
        return name
    text = repr(value)
    if "\n" in text or len(text) > 60:
        return f"{type(value).__name__}(...)"
    return text


# Namespaces whose objects are passed as stage options, e.g. remat's policy.
_JAX_NAMESPACES = ("jax.checkpoint_policies", "jax.nn", "jax.numpy", "jax.lax")


def _public_jax_name(value: Any) -> str | None:
    """``"jax.checkpoint_policies.dots_saveable"`` for an object JAX exports under that name."""
    if not callable(value):
        return None
    for namespace in _JAX_NAMESPACES:
        module = jax
        for part in namespace.split(".")[1:]:
            module = getattr(module, part)
        for name, member in vars(module).items():
            if member is value and not name.startswith("_"):
                return f"{namespace}.{name}"
    return None


def format_options(options: Any) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in dict(options).items())


def format_signature(signature: inspect.Signature) -> str:
    """Options as a user writes them: ``(in_axes=0, out_axes=0, ...)``, no annotations.

    ``**options`` (pass-through options of the JAX function) shows as ``...``.
    """
    parts = []
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            parts.append("...")
        elif param.kind is param.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
        elif param.default is param.empty:
            parts.append(param.name)
        else:
            parts.append(f"{param.name}={format_value(param.default)}")
    return f"({', '.join(parts)})"


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
