"""Test-session hygiene shared by the test modules."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator

import pytest

from jaxpipe._plugins import reset


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


@pytest.fixture
def example_plugin_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the example plugin (jaxpipe-nancheck) besides the built-ins, loaded afresh, and reset after.

    Use it for a whole module with ``pytestmark = pytest.mark.usefixtures("example_plugin_only")``.
    """
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "flax,optax,orbax")
    reset()
    yield
    reset()


# Whole modules that are slow, need a browser or start processes; `pytest -m "not slow"` leaves
# them out (CI runs everything). Mark a single slow test in a fast module with @pytest.mark.slow.
MODULE_MARKS = {
    "test_browser.py": ("slow", "browser"),
    "test_multiprocess.py": ("slow", "multiprocess"),
    "test_kill_resume.py": ("slow", "multiprocess"),
    "test_notebooks.py": ("slow",),
    "test_demo.py": ("slow",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in MODULE_MARKS.get(item.path.name, ()):
            item.add_marker(getattr(pytest.mark, name))
