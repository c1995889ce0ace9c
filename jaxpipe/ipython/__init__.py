"""``%load_ext jaxpipe``: the notebook magics, imported only when loaded.

Loading is a list of steps, each returning the function that undoes it;
unloading runs those in reverse, so ``%unload_ext`` removes exactly what
``%load_ext`` added and ``%reload_ext`` leaves no duplicate magics or
callbacks. A step that only applies in a Jupyter kernel (widgets) checks
``getattr(ipython, "kernel", None)`` and appends its own undo.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

_undo: weakref.WeakKeyDictionary[Any, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


def load_ipython_extension(ipython: Any) -> None:
    """Registers the magics in ``ipython`` (once per shell)."""
    if ipython in _undo:
        return
    from jaxpipe.ipython import magics

    steps: list[Callable[[], None]] = []
    try:
        steps.append(magics.register(ipython))
        if getattr(ipython, "kernel", None) is not None:  # a Jupyter kernel: fit shows the dashboard
            from jaxpipe.ipython import dashboard

            steps.append(dashboard.register())
    except BaseException:
        for undo in reversed(steps):  # a failed load leaves nothing behind
            undo()
        raise
    _undo[ipython] = steps


def unload_ipython_extension(ipython: Any) -> None:
    """Undoes what :func:`load_ipython_extension` did in ``ipython``, in reverse."""
    for undo in reversed(_undo.pop(ipython, [])):
        undo()
