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
    from jaxpipe._pipeline import Pipeline

SIZE = 256
_shared: collections.OrderedDict[Hashable, Callable[..., Any]] = collections.OrderedDict()


def key(pipe: Pipeline) -> Hashable | None:
    """What the built program depends on; None when the function or an option cannot be hashed."""
    program = tuple(stage for stage in pipe.stages if not stage.kind.keeps_program)
    try:
        hash((pipe.fn, program))
    except TypeError:
        return None
    return (pipe.fn, program)


def lookup(pipe: Pipeline) -> Callable[..., Any] | None:
    found = None
    k = key(pipe)
    if k is not None:
        found = _shared.get(k)
        if found is not None:
            _shared.move_to_end(k)
    return found


def share(pipe: Pipeline, built: Callable[..., Any]) -> None:
    """Pipelines equal to ``pipe`` (in the stages that shape the program) build to ``built`` from now on."""
    k = key(pipe)
    if k is None:
        return
    _shared[k] = built
    _shared.move_to_end(k)
    while len(_shared) > SIZE:
        _shared.popitem(last=False)


def clear() -> None:
    """Forgets every shared build (pipelines keep what they built already)."""
    _shared.clear()
