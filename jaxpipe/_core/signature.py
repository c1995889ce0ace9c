"""What a function's signature says about its positional arguments, and the option checks built on it.

Shared by the built-in stages and the sharding stages, so neither imports the other.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jaxpipe._core.caches import WeakKeyCache
from jaxpipe._core.format import format_signature

if TYPE_CHECKING:
    from jaxpipe._core.stage import StageContext


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


_signatures: WeakKeyCache[inspect.Signature | None] = WeakKeyCache(256)


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``fn``'s signature, if Python can tell.

    Cached, as pipelines of one function are made often, by the function's
    identity and only while it lives: the cache never keeps a function alive.
    """
    return _signatures.get(fn, _signature)


def positional_range(sig: inspect.Signature | None) -> tuple[int, int | None] | None:
    """(required, maximum or None for *args) positional arguments, if known."""
    if sig is None:
        return None
    P = inspect.Parameter
    positional = [p for p in sig.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is P.empty for p in positional)
    varargs = any(p.kind is P.VAR_POSITIONAL for p in sig.parameters.values())
    return required, None if varargs else len(positional)


def as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _indices(value: Any) -> tuple[int, ...] | None:
    """``value`` read as JAX reads argument numbers: an index or an iterable of them (``operator.index``)."""
    if value is None:
        return ()
    try:
        return (operator.index(value),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(n) for n in value)
    except TypeError:
        return None


class TypeAndValueError(TypeError, ValueError):
    """An argument number beyond the arguments: ``jax.grad`` reports it as a TypeError, jaxpipe as a ValueError."""


def check_argnums(
    ctx: StageContext, options: dict[str, Any], key: str, default: Any = 0, out_of_range: type[Exception] = ValueError
) -> None:
    """``options[key]`` are argument numbers JAX accepts, within ``ctx``'s positional arguments when known.

    ``out_of_range`` is the error for a number beyond them: the builtin the JAX
    function raises for it (``jax.jit``: ValueError, ``jax.grad``: TypeError).
    """
    value = options.get(key, default)
    nums = _indices(value)
    if nums is None:
        raise TypeError(
            f"`{key}` must be an int or a tuple of ints, got {value!r}.\n"
            f"Use positions of `{ctx.fn_name}`'s positional arguments, e.g. {key}=0."
        )
    bounds = positional_range(ctx.signature)
    if bounds is None or bounds[1] is None:
        return
    count = bounds[1]
    out = [n for n in nums if not -count <= n < count]
    if out:
        names = [p for p in ctx.signature.parameters][:count] if ctx.signature else []
        raise out_of_range(
            f"`{key}={value!r}` refers to argument {out[0]}, but `{ctx.fn_name}` takes "
            f"{count} positional argument{'s' if count != 1 else ''} {tuple(names)}.\n"
            f"Use a number from 0 to {count - 1}."
        )


def check_argnames(ctx: StageContext, options: dict[str, Any], key: str) -> None:
    value = options.get(key)
    try:  # as JAX reads them: a str or an iterable of str
        names = (value,) if isinstance(value, str) else () if value is None else tuple(value)
    except TypeError:
        names = (value,)
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"`{key}` must be a string or a tuple of strings, got {value!r}.")
    sig = ctx.signature
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    unknown = [n for n in names if n not in sig.parameters]
    if unknown:
        raise ValueError(
            f"`{key}` names {unknown[0]!r}, which is not a parameter of `{ctx.fn_name}{format_signature(sig)}`.\n"
            f"Use one of {tuple(sig.parameters)}."
        )
