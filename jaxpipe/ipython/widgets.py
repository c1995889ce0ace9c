"""The Pipeline inspector: one tab per view of what a pipeline compiles to and costs.

Views other than the stages trace, lower, compile or time the pipeline, so
each is computed the first time its tab is opened, and kept. The widget is a
view over :class:`Inspector`, whose ``text``/``html`` work without widgets; in
terminal IPython the inspector prints every view as plain text.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jaxpipe._prng import key_tree
from jaxpipe._tools import display

if TYPE_CHECKING:
    from jaxpipe._pipeline import Pipeline

VIEWS = ("Stages", "jaxpr", "Lowered", "Cost & memory", "Timing", "PRNG keys")
# The Timing view runs the pipeline TIMING_REPEAT x TIMING_NUMBER times after compiling it.
TIMING_NUMBER = 20
TIMING_REPEAT = 5


def _cost_and_memory(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return f"{pipe.cost(*args, **kwargs)}\n\n{pipe.memory(*args, **kwargs)}"


def _timing(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return pipe.timing(*args, number=TIMING_NUMBER, repeat=TIMING_REPEAT, **kwargs)


def _key_tree(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return key_tree(pipe, *args, **kwargs)


_COMPUTE: dict[str, Callable[[Pipeline, tuple[Any, ...], dict[str, Any]], Any]] = {
    "jaxpr": lambda pipe, args, kwargs: pipe.jaxpr(*args, **kwargs),
    "Lowered": lambda pipe, args, kwargs: pipe.hlo(*args, **kwargs),
    "Cost & memory": _cost_and_memory,
    "Timing": _timing,
    "PRNG keys": _key_tree,
}


class _Failed:
    """A view whose computation raised: shown in place of the view, never raised into the widget."""

    def __init__(self, err: Exception) -> None:
        self.text = f"{type(err).__name__}: {err}"

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f'<pre style="color:#b00020;white-space:pre-wrap">{html.escape(self.text)}</pre>'


class Inspector:
    """What ``pipe`` compiles to and costs for example arguments ``*args, **kwargs``.

    Without arguments only the stages view is available; the others say which
    arguments to give. Each view is computed once, on first use.

    >>> from jaxpipe import Pipeline
    >>> print(Inspector(Pipeline(abs).grad().jit()).text("Stages"))
    Pipeline(abs).grad().jit()
      1. grad()
      2. jit()
    equivalent JAX:
      jax.jit(jax.grad(abs))
    """

    def __init__(self, pipe: Pipeline, /, *args: Any, **kwargs: Any) -> None:
        self.pipe, self.args, self.kwargs = pipe, args, kwargs
        self._results: dict[str, Any] = {}
        self._widget: Any = None

    def result(self, view: str) -> Any:
        """The computed view: a jaxpr, program text, Timing, KeyTree, ... (computed once)."""
        if view not in VIEWS:
            raise ValueError(f"unknown inspector view {view!r}; choose one of {VIEWS}")
        if view not in self._results:
            self._results[view] = self._compute(view)
        return self._results[view]

    def _compute(self, view: str) -> Any:
        if view == "Stages":
            return self.pipe
        if not self.args and not self.kwargs:
            return None
        try:
            return _COMPUTE[view](self.pipe, self.args, self.kwargs)
        except Exception as err:  # a view of a failure, e.g. a PipelineError for wrong arguments
            return _Failed(err)

    def _missing_arguments(self, view: str) -> str:
        return (
            f"The {view} view traces the pipeline, so it needs example arguments: "
            f"show_inspector(pipe, *args) with the arguments you would call `{self.pipe.name}` with."
        )

    def text(self, view: str) -> str:
        """One view as plain text."""
        result = self.result(view)
        if view == "Stages":
            return display.pipeline_text(self.pipe)
        if result is None:
            return self._missing_arguments(view)
        if hasattr(result, "pretty_print"):  # a jaxpr: JAX colours it for terminals and kernels
            return result.pretty_print(use_color=False)
        return str(result)

    def html(self, view: str) -> str:
        """One view as HTML; user data is escaped."""
        result = self.result(view)
        if view == "Stages":
            return display.pipeline_html(self.pipe)
        if result is None:
            return f"<p><i>{html.escape(self._missing_arguments(view))}</i></p>"
        if hasattr(result, "_repr_html_"):
            return result._repr_html_()
        return display.code_html(self.text(view))

    def __str__(self) -> str:
        return "\n\n".join(f"== {view} ==\n{self.text(view)}" for view in VIEWS)

    # --- the widget ------------------------------------------------------------------

    @property
    def widget(self) -> Any:
        """An ipywidgets Tab, one page per view, each filled when first selected."""
        if self._widget is None:
            import ipywidgets

            pages = [ipywidgets.HTML(value="<i>computing…</i>") for _ in VIEWS]
            self._widget = ipywidgets.Tab(children=pages, titles=VIEWS)
            self._widget.add_class("jaxpipe-inspector")
            self._widget.observe(lambda change: self._show(change["new"]), names="selected_index")
            self._show(self._widget.selected_index)
        return self._widget

    def _show(self, index: int | None) -> None:
        if index is not None:
            self.widget.children[index].value = self.html(VIEWS[index])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        if not display.in_notebook():
            return {"text/plain": str(self)}
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/plain"] = self.text("Stages")
        return bundle


def show_inspector(pipe: Pipeline, /, *args: Any, **kwargs: Any) -> None:
    """Shows the inspector of ``pipe`` for example arguments: tabs in a notebook, text elsewhere."""
    from IPython.display import display as ipython_display

    ipython_display(Inspector(pipe, *args, **kwargs))
