"""The ``jaxpipe`` command: ``jaxpipe plugins`` and ``jaxpipe demo``."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxpipe._core.stage import StageKind


def plugins_report() -> str:
    """Every stage by plugin, with conflicts and skipped plugins, as text.

    Signatures read as calls (``.vmap(in_axes=0, out_axes=0, axis_name=None, ...)``);
    ``...`` stands for the JAX function's other keyword arguments.
    """
    import importlib.metadata

    from jaxpipe._plugins.manager import BLOCK_ENV, ENTRY_POINT_GROUP, blocked_plugins, plugin_manager
    from jaxpipe._plugins.registry import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = plugin_manager()
        reg = registry()
    stages: dict[str, list[tuple[str, str]]] = {"jaxpipe": []}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or () if h.name != "jaxpipe_register_stages")
        stages[name] = [("(hooks)", ", ".join(hooks))] if hooks else []
    for kind in reg.kinds.values():
        stages.setdefault(kind.plugin, []).append((f".{kind.name}{_usage(kind)}", plain(kind.summary)))
    sources = {
        ep.name: f"{ep.value}, {ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    lines = []
    for plugin in sorted(stages, key=lambda p: (p != "jaxpipe", p)):
        title = "jaxpipe (built-in stages)" if plugin == "jaxpipe" else f"{plugin} ({sources.get(plugin, 'plugin')})"
        rows = sorted(stages[plugin], key=lambda row: (row[0] == "(hooks)", row[0])) or [("(no stages)", "")]
        lines += [title, *_columns(rows), ""]
    for name, owners in sorted(reg.conflicts.items()):
        lines.append(f"conflict: stage `{name}` is registered by {' and '.join(owners)}; it is unavailable")
    for warning in caught:
        lines.append(f"skipped: {warning.message}")
    if blocked_plugins():
        lines.append(f"blocked by {BLOCK_ENV}: {', '.join(sorted(blocked_plugins()))}")
    return "\n".join(lines).rstrip() + "\n"


def plain(text: str) -> str:
    """reStructuredText from docstrings as a terminal shows it: ``x`` and :func:`~a.x` become `x`."""
    text = re.sub(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _usage(kind: StageKind) -> str:
    """The stage's options as a user writes them: the Pipeline method's for built-ins."""
    from jaxpipe._core.format import format_signature
    from jaxpipe._pipeline import Pipeline

    method = vars(Pipeline).get(kind.name) if kind.plugin == "jaxpipe" else None
    if method is None:
        return format_signature(kind.signature)
    params = list(inspect.signature(method).parameters.values())[1:]  # without self
    return format_signature(inspect.Signature(params))


def _columns(rows: list[tuple[str, str]], limit: int = 60) -> list[str]:
    """Two aligned columns; a first cell longer than ``limit`` puts its second on the next line."""
    width = max((len(first) for first, _ in rows if len(first) <= limit), default=0)
    out = []
    for first, second in rows:
        if len(first) <= width:
            out.append(f"  {first:<{width}}  {second}".rstrip())
        else:
            out += [f"  {first}", f"  {'':<{width}}  {second}".rstrip()]
    return [line for line in out if line.strip()]


DEMO = """\
Builds, explains, runs and times a per-example-gradients pipeline against the
hand-written JAX, then trains an MLP on scikit-learn's bundled 8x8 digits: the
equivalent JAX code, progress, test accuracy, Orbax checkpoints, loss.png,
metrics.jsonl and a timing table, all in --out. Run it again and it resumes
from its checkpoints; Ctrl-C stops training after the current step, saved.
Needs the demo extra: pip install -e '.[demo]' (scikit-learn, matplotlib)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxpipe", description="jaxpipe: JAX transforms as a declarative, inspectable pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "plugins", help="list plugins and the stages they add", description="Lists plugins and the stages they add."
    )
    demo = commands.add_parser(
        "demo",
        help="build, explain, run and time pipelines against hand-written JAX",
        description=DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--quick", action="store_true", help="fewer timing rounds (about 3x faster timing; the same training)"
    )
    demo.add_argument("--out", default="jaxpipe-demo", help="directory for checkpoints, metrics and the loss curve")
    args = parser.parse_args(argv)
    if args.command == "plugins":
        sys.stdout.write(plugins_report())
        return 0
    try:
        import jaxpipe_demo
    except ImportError:
        jaxpipe_demo = None
    absent = ["the jaxpipe_demo package"] if jaxpipe_demo is None else jaxpipe_demo.missing()
    if absent:
        sys.stderr.write(
            f"jaxpipe demo needs {' and '.join(absent)}, which the `demo` extra installs.\n"
            f"From the repository root: .venv/bin/pip install -e '.[demo]'\n"
        )
        return 2
    return jaxpipe_demo.main(quick=args.quick, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
