"""Equal pipelines share their built callable, and with it JAX's compiled programs.

A pipeline is a value, so two equal ones compute the same program: building
looks here first, keyed by the function and the stages that shape the program
(a stage declared ``keeps_program``, such as ``.checkpoint()``, does not), so
``make()`` twice, ``Pipeline(pipe)`` or ``pipe.checkpoint(dir)`` compile nothing
new. Bounded, newest kept: an evicted pipeline builds again on its next use.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike
    from jaxpipe._core.stage import Stage

SIZE = 256
_shared: collections.OrderedDict[Hashable, Callable[..., Any]] = collections.OrderedDict()


def program(pipe: PipelineLike) -> tuple[Stage, ...]:
    """The stages that shape the built program (not those declared ``keeps_program``)."""
    return tuple(stage for stage in pipe.stages if not stage.kind.keeps_program)


def key(pipe: PipelineLike) -> Hashable | None:
    """What the built program depends on; None when the function or an option cannot be hashed."""
    k = (pipe.fn, program(pipe))
    try:
        hash(k)
    except TypeError:
        return None
    return k


def lookup(k: Hashable | None) -> Callable[..., Any] | None:
    """The callable built for ``key(pipe)`` before, if it is still kept."""
    found = _shared.get(k) if k is not None else None
    if found is not None:
        _shared.move_to_end(k)
    return found


def share(k: Hashable | None, built: Callable[..., Any]) -> None:
    """Pipelines with this ``key`` build to ``built`` from now on."""
    if k is None:
        return
    _shared[k] = built
    _shared.move_to_end(k)
    while len(_shared) > SIZE:
        _shared.popitem(last=False)


def clear() -> None:
    """Forgets every shared build (pipelines keep what they built already)."""
    _shared.clear()
