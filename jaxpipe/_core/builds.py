"""Equal pipelines share their built callable, and with it JAX's compiled programs.

A pipeline is a value, so two equal ones compute the same program: building
looks here first, keyed by the function and the stages that shape the program
(a stage declared ``keeps_program``, such as ``.checkpoint()``, does not), so
``make()`` twice, ``Pipeline(pipe)`` or ``pipe.checkpoint(dir)`` compile nothing
new while the first is alive. A build is kept only while a pipeline holds it
(it closes over the function, so holding it here would keep the function alive
after ``jax.jit`` would have let it go); bounded, and emptied by
``jaxpipe.clear_caches()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from jaxpipe._core.caches import WeakValueCache

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike
    from jaxpipe._core.stage import Stage

SIZE = 256
_shared: WeakValueCache[Callable[..., Any]] = WeakValueCache(SIZE)


def program(pipe: PipelineLike) -> tuple[Stage, ...]:
    """The stages that shape the built program (not those declared ``keeps_program``)."""
    return tuple(stage for stage in pipe.stages if not stage.kind.keeps_program)


def key(pipe: PipelineLike) -> Hashable | None:
    """What the built program depends on; None when the function or an option cannot be hashed.

    The function is held weakly (a weak reference compares and hashes as its
    function while that lives), so a key never keeps the function, or an object
    whose bound method it is, alive: ``obj.step = Pipeline(obj.loss).jit()`` is
    a cycle that Python collects, as with ``jax.jit``.
    """
    fn = pipe.fn
    try:
        held: Any = weakref.ref(fn)
    except TypeError:  # no weak references to this callable
        held = fn
    k = (held, program(pipe))
    try:
        hash(k)
    except TypeError:
        return None
    return k


def lookup(k: Hashable | None) -> Callable[..., Any] | None:
    """The callable built for ``key(pipe)`` before, if a pipeline still holds it."""
    return _shared.get(k)


def share(k: Hashable | None, built: Callable[..., Any]) -> None:
    """Pipelines with this ``key`` build to ``built`` from now on, while something holds ``built``."""
    _shared.put(k, built)


def clear() -> None:
    """Forgets every shared build (pipelines keep what they built already)."""
    _shared.clear()
