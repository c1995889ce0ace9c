"""Rich display: a Pipeline as HTML (notebook) or text (terminal), pytrees through treescope.

Everything built from user data (function names, stage options, pytree keys)
is escaped, so a name like ``<script>`` shows as text and never runs.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from jaxpipe._core.format import format_options

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike

_PRE_STYLE = "margin:0;padding:6px;max-height:28em;overflow:auto;background:rgba(127,127,127,0.08)"


def in_notebook(shell: Any = None) -> bool:
    """Whether ``shell`` (default: the running IPython) is a Jupyter kernel, which can show widgets."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:  # IPython is a dependency, but a stripped install should still print text
            return False
        shell = get_ipython()
    return getattr(shell, "kernel", None) is not None


def code_html(text: str) -> str:
    """Program text (jaxpr, StableHLO, JAX code) as an escaped, scrollable block."""
    return f'<pre style="{_PRE_STYLE}">{html.escape(text)}</pre>'


def stage_rows(pipe: PipelineLike) -> list[tuple[str, str, str, str]]:
    """One (stage, options, plugin, summary) row per stage, in call order."""
    return [(s.name, format_options(s.options), s.kind.plugin, s.kind.summary) for s in pipe.stages]


def pipeline_text(pipe: PipelineLike) -> str:
    """The plain-text view: the fluent form, the stages and the equivalent JAX."""
    lines = [repr(pipe)]
    for number, (name, options, plugin, _) in enumerate(stage_rows(pipe), 1):
        origin = "" if plugin == "jaxpipe" else f"  [{plugin}]"
        lines.append(f"  {number}. {name}({options}){origin}")
    lines += ["equivalent JAX:", *("  " + line for line in pipe.explain().splitlines())]
    return "\n".join(lines)


def pipeline_html(pipe: PipelineLike) -> str:
    """The HTML view: a table of stages and the equivalent JAX code."""
    e = html.escape
    left = '<td style="text-align:left">'  # JupyterLab right-aligns table cells
    cells = "".join(
        f"<tr>{left}{number}</td>{left}<code>{e(name)}</code></td>{left}"
        f"{f'<code>{e(options)}</code>' if options else ''}</td>{left}{e(plugin)}</td>{left}{e(summary)}</td></tr>"
        for number, (name, options, plugin, summary) in enumerate(stage_rows(pipe), 1)
    )
    heads = "".join(
        f'<th style="text-align:left">{h}</th>' for h in ("#", "stage", "options", "plugin", "what it does")
    )
    table = (
        f"<table><thead><tr>{heads}</tr></thead><tbody>{cells}</tbody></table>"
        if cells
        else "<p><i>no stages yet</i></p>"
    )
    return (
        f'<div class="jaxpipe-pipeline"><div><b>{e(repr(pipe))}</b></div>{table}'
        f"<div>equivalent JAX:</div>{code_html(pipe.explain())}</div>"
    )


def tree_html(tree: Any, *, compressed: bool = True) -> str:
    """A pytree as treescope's foldable HTML (treescope escapes keys and values)."""
    import treescope

    return treescope.render_to_html(tree, ignore_exceptions=True, compressed=compressed)


def tree_text(tree: Any) -> str:
    """A pytree as treescope's text rendering."""
    import treescope

    return treescope.render_to_text(tree, ignore_exceptions=True)


class TreeView:
    """A pytree that displays with treescope: foldable HTML in a notebook, text in a terminal."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree

    def _repr_html_(self) -> str:
        return tree_html(self.tree)

    def __repr__(self) -> str:
        return tree_text(self.tree)


def show_tree(tree: Any) -> TreeView:
    """Wraps a pytree (parameters, optimizer state, a TrainState) for treescope display.

    The last expression of a cell displays it; ``print`` gives the text form.

    >>> print(show_tree({"w": 1.0, "b": (2, 3)}))
    {'w': 1.0, 'b': (2, 3)}
    """
    return TreeView(tree)
