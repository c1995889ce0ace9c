"""Where in the user's source a key was made or drawn: frames outside library code, API and Flax names."""

from __future__ import annotations

import inspect
import itertools
import linecache
import os
import re
import sys
import sysconfig
from typing import Any

from jaxpipe._plugins.manager import plugin_manager


def api_name(frames: list[Any], directory: str, namespace: Any) -> str | None:
    """The outermost public function of ``namespace`` defined under ``directory``."""
    for frame in frames:
        fn = frame.function_name
        if frame.file_name.startswith(directory) and not fn.startswith("_") and "." not in fn:
            if hasattr(namespace, fn):
                return f"{namespace.__name__}.{fn}"
    return None


_PARAM_CALL = re.compile(r"\.param\(\s*['\"]([^'\"]+)['\"]")


def flax_param(frames: list[Any]) -> str | None:
    """The name given to Flax's ``self.param`` (read from the caller's source)."""
    for caller, frame in itertools.pairwise(frames):
        if frame.function_name == "Module.param" and os.sep + "flax" + os.sep in frame.file_name:
            text = "".join(linecache.getline(caller.file_name, caller.line_num + i) for i in range(3))
            found = _PARAM_CALL.search(text)
            return found.group(1) if found else None
    return None


def file_label(file: str) -> str:
    """``model.py``, or ``In[3]`` for a cell of the running IPython shell."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    format_code_name = getattr(getattr(shell, "compile", None), "format_code_name", None)
    named = format_code_name(file) if format_code_name is not None else None
    return named[1] if named else os.path.basename(file)


def library_dirs() -> tuple[str, ...]:
    """Where library code lives: frames there are not the user's.

    The standard library, known libraries, jaxpipe and every loaded jaxpipe
    plugin (whose stages' code is theirs, not the user's).
    """
    dirs = {sysconfig.get_paths()["stdlib"], "<frozen"}
    manager = plugin_manager()
    plugins = [inspect.getmodule(plugin) for plugin in manager.get_plugins()]
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax",
        "numpy",
        "jaxpipe",
        "equinox",
        "chex",
        "haiku",
        "treescope",
        "IPython",
        *(module.__name__.partition(".")[0] for module in plugins if module is not None),
    ):
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            dirs.add(os.path.dirname(file) + os.sep)
    return tuple(sorted(dirs))
