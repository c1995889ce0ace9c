"""The notebook's memo: re-running an unchanged ``%%jaxpipe`` cell returns the pipeline built before.

Re-running a cell, even after redefining its function, returns the pipeline
built before, compiled programs included. It reuses only when a snapshot of
everything the functions compute with (code, defaults, closures, the globals
they name, recursively) is unchanged, also at every trace; anything it cannot
snapshot (an arbitrary mutable object) means "build anew", never a stale
program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sysconfig
import types
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from jaxpipe._core import builds as _compiled
from jaxpipe._core import fold as _fold
from jaxpipe._pipeline import Pipeline

_LITERALS = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 24
_MAX_ARRAY_BYTES = 1 << 20


class _Same:
    """Equal only to itself: for values that never change (modules, jax arrays)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


class _Opaque(Exception):
    """A value whose state cannot be snapshot."""


def fingerprint(value: Any) -> Hashable | None:
    """A snapshot that compares equal exactly when ``value`` computes the same.

    For a function: its code, defaults, closure contents and the globals its
    code names, recursively, with modules by identity and the module attributes
    its code names (deeply for the user's own modules). None when some part is
    an object whose state cannot be snapshot.
    """
    try:
        return _snapshot(value, 0, set())
    except _Opaque:
        return None


def _snapshot(value: Any, depth: int, active: set[int]) -> Hashable:
    if depth > _MAX_DEPTH:
        raise _Opaque
    down = functools.partial(_snapshot, depth=depth + 1, active=active)
    if isinstance(value, _LITERALS):
        return (type(value), value)
    if type(value) in (tuple, list):
        return (type(value).__name__, tuple(down(v) for v in value))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuples, e.g. optax transformations
        return (_Same(type(value)), tuple(down(v) for v in value))
    if type(value) is dict:
        return ("dict", tuple((down(k), down(v)) for k, v in value.items()))
    if isinstance(value, types.FunctionType):
        return _snapshot_function(value, depth, active)
    if isinstance(value, (types.ModuleType, types.BuiltinFunctionType, type, jax.Array)):
        return _Same(value)  # modules' used attributes are snapshot by the functions naming them
    if isinstance(value, np.ndarray) and value.nbytes <= _MAX_ARRAY_BYTES:
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (np.generic, np.dtype)):
        return (_Same(type(value)), value)
    if isinstance(value, functools.partial):
        return ("partial", down(value.func), down(value.args), down(value.keywords))
    if isinstance(value, Pipeline):
        stages = tuple((_Same(stage.kind), down(dict(stage.options))) for stage in value.stages)
        return ("pipeline", value.name, down(value.fn), stages)
    raise _Opaque


def _snapshot_function(fn: types.FunctionType, depth: int, active: set[int]) -> Hashable:
    if id(fn) in active:  # recursion: the outer snapshot covers it
        return ("recursive", fn.__qualname__)
    active.add(id(fn))
    try:
        down = functools.partial(_snapshot, depth=depth + 1, active=active)
        names = sorted(_names(fn.__code__))
        named: list[tuple[str, Hashable]] = []
        for name in names:
            if name not in fn.__globals__:
                named.append((name, None))  # a builtin, or an attribute name; defining it later changes this
                continue
            value = fn.__globals__[name]
            if isinstance(value, types.ModuleType):
                named.append((name, _snapshot_module(value, names, depth, active)))
            else:
                named.append((name, down(value)))
        closure = []
        for cell in fn.__closure__ or ():
            try:
                closure.append(down(cell.cell_contents))
            except ValueError:  # an empty cell
                closure.append(("empty",))
        defaults = down(fn.__defaults__ or ())
        kwdefaults = down(fn.__kwdefaults__ or {})
        return ("function", _code(fn.__code__), defaults, kwdefaults, tuple(closure), tuple(named))
    finally:
        active.discard(id(fn))


def _snapshot_module(module: types.ModuleType, names: list[str], depth: int, active: set[int]) -> Hashable:
    """The module, and those of its attributes that the function's code names."""
    attributes = vars(module)  # not getattr: a module's __getattr__ may warn or import
    library = _is_library(module)
    used: list[tuple[Any, ...]] = []
    for name in names:
        if name not in attributes:
            continue
        value = attributes[name]
        if library:  # installed code: identity, and the code in case %autoreload swaps it
            code = getattr(value, "__code__", None)
            used.append((name, _Same(value), _code(code) if isinstance(code, types.CodeType) else None))
        else:
            used.append((name, _snapshot(value, depth + 1, active)))
    return ("module", _Same(module), tuple(used))


def _is_library(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return file is None or os.path.abspath(file).startswith(_library_dirs())


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Where installed code lives: the standard library and site-packages."""
    paths = sysconfig.get_paths()
    return tuple({paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths})


def _code(code: types.CodeType) -> Hashable:
    """What the code computes, without where it stands (a cell run again moves its lines)."""
    consts = tuple(_code(c) if isinstance(c, types.CodeType) else (type(c), c) for c in code.co_consts)
    return (
        code.co_name,
        code.co_code,
        consts,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_exceptiontable,
    )


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


@dataclasses.dataclass(eq=False)
class _Built:
    pipe: Pipeline
    fn_key: Hashable
    stale: bool = False  # traced while the function's snapshot differed from fn_key

    def watch(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, noting at each trace whether its snapshot is still ``fn_key``."""

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if fingerprint(fn) != self.fn_key:
                self.stale = True
            return fn(*args, **kwargs)

        return traced


class PipelineMemo:
    """The compiled pipelines built recently, found again when nothing they use changed.

    Only pipelines compiled as a whole (ending in ``jit`` or ``pmap``) are kept:
    those are the ones whose reuse saves an XLA compile.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._built: collections.OrderedDict[Hashable, _Built] = collections.OrderedDict()

    def reuse(self, pipe: Pipeline) -> tuple[Pipeline, bool]:
        """The pipeline built before for an unchanged ``pipe`` and True, else ``pipe`` to use and False."""
        program = _compiled.program(pipe)
        if not (program and program[-1].kind.compiles):
            return pipe, False
        key = fingerprint(pipe)
        try:
            found = self._built.get(key) if key is not None else None
        except TypeError:  # an unhashable snapshot part
            return pipe, False
        if found is not None and not found.stale:
            self._built.move_to_end(key)
            return found.pipe, True
        if key is None:
            return pipe, False
        entry = _Built(Pipeline(pipe), fingerprint(pipe.fn))
        # The pipeline stays equal to the one asked for (same function); only its
        # built callable sees the watch, which runs at trace time and never after.
        # Equal pipelines share a build (``_compiled``), so this one now builds to it; the
        # share is kept only while a pipeline holds the build, hence the name until it does.
        built = _fold.build(pipe.with_fn(entry.watch(pipe.fn)))
        _compiled.share(_compiled.key(pipe), built)
        entry.pipe.build()
        self._built[key] = entry
        while len(self._built) > self.size:
            self._built.popitem(last=False)
        return entry.pipe, False

    def clear(self) -> None:
        self._built.clear()
