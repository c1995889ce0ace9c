"""The plugin layer: pluggy's manager with isolated installed plugins, and the stage registry they fill."""

from jaxpipe._plugins.manager import plugin_manager as plugin_manager
from jaxpipe._plugins.manager import run_hooks as run_hooks
from jaxpipe._plugins.registry import reset as reset
