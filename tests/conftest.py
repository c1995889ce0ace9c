"""Test-session hygiene shared by the test modules."""

from __future__ import annotations

import contextlib
import gc
import sys


def pytest_sessionfinish() -> None:
    """Closes the widgets tests made, before interpreter exit would, noisily.

    Widgets made before an in-process nbclient run imported ipykernel belong to
    comm's default manager, but close through ipykernel's afterwards; at exit
    each such ``Widget.__del__`` prints a KeyError. Closing them here, quietly,
    keeps the test log to what the tests say.
    """
    ipywidgets = sys.modules.get("ipywidgets")
    if ipywidgets is None:
        return
    for widget in [obj for obj in gc.get_objects() if isinstance(obj, ipywidgets.Widget)]:
        with contextlib.suppress(KeyError):
            widget.close()
        widget.comm = None  # closed, or its comm's manager is gone: nothing left to close at exit
