"""The plugin manager: hook specs, entry-point loading, per-plugin isolation.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that
fails to import; here each entry point loads on its own, and a failure becomes
one :class:`~jaxpipe.errors.PluginWarning` naming that plugin.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings

import pluggy

from jaxpipe import hookspecs
from jaxpipe.errors import PluginWarning

ENTRY_POINT_GROUP = "jaxpipe"
BLOCK_ENV = "JAXPIPE_DISABLE_PLUGINS"


def blocked_plugins() -> frozenset[str]:
    """Names listed in ``JAXPIPE_DISABLE_PLUGINS`` (comma or space separated)."""
    raw = os.environ.get(BLOCK_ENV, "")
    return frozenset(name for name in raw.replace(",", " ").split() if name)


def warn_plugin(name: str, what: str, err: BaseException) -> None:
    warnings.warn(
        f"jaxpipe plugin {name!r} {what} and was skipped: {type(err).__name__}: {err}. "
        f"Fix or update the plugin, or block it with {BLOCK_ENV}={name}.",
        PluginWarning,
        stacklevel=3,
    )


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every loadable plugin registered."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked_plugins():
        pm.set_blocked(name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as err:  # one broken plugin must not stop the others
            warn_plugin(ep.name, f"({ep.value}) could not be loaded", err)
    while True:  # a misspelt hook name fails loudly, but only for its plugin
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as err:
            name = pm.get_name(err.plugin) or repr(err.plugin)
            pm.unregister(err.plugin)
            warn_plugin(name, "implements a hook that jaxpipe does not define", err)
    return pm


def reset() -> None:
    """Forgets loaded plugins and stages, so the next lookup loads them again."""
    from jaxpipe import _registry

    plugin_manager.cache_clear()
    _registry.registry.cache_clear()
