"""Every cache jaxpipe keeps, in one registry: each bounded, all emptied by :func:`clear_caches`.

A cache must not keep a user's function alive longer than ``jax.jit`` does:
``jax.jit(f)`` holds ``f`` only while the jitted object lives. So a cache whose
values hold the function (a built callable closes over it) holds those values
weakly (:class:`WeakValueCache`): a value lives as long as something else, such
as the pipeline that built it, holds it. A cache keyed by the function itself
holds the key weakly, by identity (:class:`WeakKeyCache`). Only values that
reference no user object may be held strongly (:func:`bounded`).
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: list[Callable[[], None]] = []


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Adds ``clear`` (a cache's clear method) to what :func:`clear_caches` calls; returns it."""
    _REGISTRY.append(clear)
    return clear


def clear_caches() -> None:
    """Empties every cache jaxpipe keeps (shared builds, signatures, compiled training steps).

    Pipelines keep what they built already; the next new pipeline builds and
    compiles again. JAX's own caches are ``jax.clear_caches()``'s.
    """
    for clear in _REGISTRY:
        clear()


def bounded(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)``, registered; only for values that hold no user function."""

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        register(cached.cache_clear)
        return cached  # type: ignore[return-value]

    return decorate


class WeakValueCache(Generic[V]):
    """``key -> value``, each value kept only while something else holds it; at most ``maxsize`` entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._values: weakref.WeakValueDictionary[Hashable, Any] = weakref.WeakValueDictionary()
        register(self.clear)

    def get(self, key: Hashable | None) -> V | None:
        if key is None:
            return None
        try:
            return self._values.get(_Hashed(key))
        except TypeError:  # an unhashable part
            return None

    def put(self, key: Hashable | None, value: V) -> None:
        """Keeps ``value`` for ``key``; a value that cannot be referenced weakly is not kept."""
        if key is None:
            return
        try:
            self._values[_Hashed(key)] = value
        except TypeError:  # unhashable key, or a value without weak references
            return
        while len(self._values) > self.maxsize:  # the oldest still alive goes first
            oldest = next(iter(self._values.keys()), None)
            if oldest is None:
                break
            self._values.pop(oldest, None)

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)


class _Hashed:
    """A key with its hash computed once: a weak value's removal at interpreter exit hashes no live code."""

    __slots__ = ("hash", "key")

    def __init__(self, key: Hashable) -> None:
        self.key, self.hash = key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashed) and self.hash == other.hash and self.key == other.key


class WeakKeyCache(Generic[V]):
    """``obj -> value`` by the object's identity, forgotten when the object dies; at most ``maxsize``.

    For values that do not refer back to the object (a signature of a
    function): the object itself is held only weakly. Objects that cannot be
    referenced weakly are not cached (``get`` computes each time).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[int, tuple[weakref.ref[Any], V]] = collections.OrderedDict()
        register(self.clear)

    def get(self, obj: Any, compute: Callable[[Any], V]) -> V:
        key = id(obj)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is obj:
            self._entries.move_to_end(key)
            return entry[1]
        value = compute(obj)
        try:
            ref = weakref.ref(obj, functools.partial(_forget, weakref.ref(self._entries), key))
        except TypeError:  # no weak references to this object: not cached
            return value
        self._entries[key] = (ref, value)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _forget(entries: weakref.ref[collections.OrderedDict[int, Any]], key: int, ref: weakref.ref[Any]) -> None:
    """Drops the entry of an object that died (only if it is still that object's entry)."""
    table = entries()
    if table is not None:
        entry = table.get(key)
        if entry is not None and entry[0] is ref:
            del table[key]
