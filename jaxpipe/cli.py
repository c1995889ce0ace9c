"""The ``jaxpipe`` command: ``jaxpipe plugins`` and ``jaxpipe demo``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence


def plugins_report() -> str:
    """Every stage by plugin, with conflicts and skipped plugins, as text."""
    from jaxpipe._plugins import BLOCK_ENV, blocked_plugins, plugin_manager
    from jaxpipe._registry import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin_manager()
        reg = registry()
    by_plugin: dict[str, list[str]] = {}
    for kind in reg.kinds.values():
        by_plugin.setdefault(kind.plugin, []).append(f"  .{kind.name}{kind.signature}  {kind.summary}")
    lines = []
    for plugin in sorted(by_plugin, key=lambda p: (p != "jaxpipe", p)):
        title = "jaxpipe (built-in)" if plugin == "jaxpipe" else f"{plugin}"
        lines += [title, *sorted(by_plugin[plugin]), ""]
    for name, owners in sorted(reg.conflicts.items()):
        lines.append(f"conflict: stage `{name}` is registered by {' and '.join(owners)}")
    for warning in caught:
        lines.append(f"skipped: {warning.message}")
    if blocked_plugins():
        lines.append(f"blocked by {BLOCK_ENV}: {', '.join(sorted(blocked_plugins()))}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list plugins and the stages they add")
    demo = commands.add_parser("demo", help="build, explain, run and time pipelines against hand-written JAX")
    demo.add_argument("--quick", action="store_true", help="fewer timing rounds")
    args = parser.parse_args(argv)
    if args.command == "plugins":
        sys.stdout.write(plugins_report())
        return 0
    from jaxpipe import _demo

    return _demo.main(quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
