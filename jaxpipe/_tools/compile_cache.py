"""Not compiling the same program twice, and counting when JAX does.

Two tools (the notebook's memo of unchanged pipelines is ``jaxpipe.ipython.memo``):

- :func:`enable_compilation_cache`: JAX's persistent compilation cache, opt in.
  Its key is the lowered program itself, so a fresh process (or a redefined but
  identical function) reuses the executable after a re-trace, and anything that
  changes the program misses. It writes to disk, hence opt in.
- :class:`CompileEvents`: counts traces, lowerings and XLA compiles through
  ``jax.monitoring``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax

from jaxpipe.errors import PipelineError

# --- the persistent compilation cache ------------------------------------------

_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)
_saved_settings: dict[str, Any] | None = None  # as they were before enable_compilation_cache


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/jaxpipe/xla``, else ``~/.cache/jaxpipe/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxpipe" / "xla"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache; returns its directory.

    Every compiled program is stored (JAX's defaults skip those compiled in
    under a second, which is most of them on a CPU), so a fresh kernel's first
    call of an unchanged pipeline loads the executable instead of compiling.
    The cache is trusted code: do not point it at a directory others can write.

    Args:
      path: the directory; default :func:`default_cache_dir`.

    Raises:
      PipelineError: the directory cannot be created.
    """
    from jax.experimental.compilation_cache import compilation_cache

    global _saved_settings
    directory = pathlib.Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(
            f"`enable_compilation_cache` cannot use {str(directory)!r}: {err}.\n"
            f"Pass a directory you can write to, e.g. enable_compilation_cache('/tmp/jax-cache')."
        ) from err
    if _saved_settings is None:
        _saved_settings = {name: getattr(jax.config, name) for name in _SETTINGS}
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit
    compilation_cache.set_cache_dir(str(directory))
    compilation_cache.reset_cache()  # JAX opens the cache once; reopen it at this directory
    return directory


def disable_compilation_cache() -> None:
    """Restores the cache settings from before :func:`enable_compilation_cache`."""
    from jax.experimental.compilation_cache import compilation_cache

    global _saved_settings
    if _saved_settings is None:
        return
    for name, value in _saved_settings.items():
        jax.config.update(name, value)
    _saved_settings = None
    compilation_cache.reset_cache()


def compilation_cache_dir() -> pathlib.Path | None:
    """The persistent cache's directory while it is on, else None."""
    path = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    return pathlib.Path(path) if path and jax.config.jax_enable_compilation_cache else None  # type: ignore[attr-defined]


# --- counting compilations ---------------------------------------------------------

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


@dataclasses.dataclass
class CompileEvents:
    """What JAX traced, lowered and compiled inside a ``with`` block.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(3.0)
    >>> with CompileEvents() as events:
    ...     _ = jax.jit(lambda x: x * 2)(x)
    >>> events.traces, events.compiles
    (1, 1)
    """

    traces: int = 0
    lowerings: int = 0
    backend_compiles: int = 0
    persistent_hits: int = 0
    persistent_misses: int = 0

    @property
    def compiles(self) -> int:
        """XLA compilations that ran; a persistent-cache hit also reports as a backend compile."""
        return self.backend_compiles - self.persistent_hits

    def _on_duration(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        del duration_secs, kwargs  # only counted
        if event == TRACE_EVENT:
            self.traces += 1
        elif event == LOWER_EVENT:
            self.lowerings += 1
        elif event == COMPILE_EVENT:
            self.backend_compiles += 1

    def _on_event(self, event: str, **kwargs: str | int) -> None:
        del kwargs  # only counted
        if event == CACHE_HIT_EVENT:
            self.persistent_hits += 1
        elif event == CACHE_MISS_EVENT:
            self.persistent_misses += 1

    def __enter__(self) -> CompileEvents:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
