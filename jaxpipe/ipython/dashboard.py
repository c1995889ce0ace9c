"""The fit dashboard: progress, a live metrics plot and a Stop button, in a notebook.

While ``%load_ext jaxpipe`` is active in a Jupyter kernel, :data:`DASHBOARD` is
a registered plugin. It supplies ``fit``'s progress display (hook
``jaxpipe_fit_progress``), so a notebook shows one progress display, not a
tqdm bar beside it. The view redraws at most every ``REFRESH_SECONDS`` and
reads only ``run.history``, the floats ``fit`` already copied from the device,
so it adds no device synchronisation to the loop.

Stop is an ordinary ``ipywidgets.Button``. A kernel reads a widget's click
only once the running cell returns, too late for a ``fit`` in that cell; so
while ``fit`` runs in the kernel's main thread the dashboard processes the
kernel's pending widget messages once per training call (hook
``jaxpipe_fit_step``, at most every ``POLL_SECONDS``; see
:mod:`jaxpipe.ipython.uipoll`). The click then calls ``run.stop()`` between
steps, ``fit`` ends after the current step and returns normally, so a
``.checkpoint()`` stage saves as at any end. No JavaScript and no Jupyter server
are involved, so it works alike in JupyterLab, Notebook, VS Code and Colab.
For a ``fit`` on a background thread the kernel reads the click itself.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

from jaxpipe._core.run import metrics_of
from jaxpipe.hookspecs import hookimpl

REFRESH_SECONDS = 0.5
POLL_SECONDS = 0.05  # between reads of the widget messages: a click is seen within ~50 ms
MAX_POINTS = 400  # per chart: a longer history is thinned for drawing
_TRAIN_COLOR, _EVAL_COLOR = "#1f77b4", "#ff7f0e"


# --- the metrics plot, as plain SVG text ---------------------------------------------


@dataclasses.dataclass
class Series:
    """One metric's (step, value) points and its range, kept as the run grows."""

    color: str
    steps: list[float] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    low: float = math.inf
    high: float = -math.inf
    non_finite: int = 0

    def add(self, step: float, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        if math.isfinite(value):
            self.low, self.high = min(self.low, value), max(self.high, value)
        else:
            self.non_finite += 1

    def points(self, limit: int = MAX_POINTS) -> list[tuple[float, float]]:
        """At most about ``limit`` finite points, evenly thinned, always with the last."""
        stride = max(1, math.ceil(len(self.steps) / limit))
        picked = [*range(0, len(self.steps), stride), *([len(self.steps) - 1] if self.steps else [])]
        return [(self.steps[i], self.values[i]) for i in sorted(set(picked)) if math.isfinite(self.values[i])]


class Metrics:
    """Each metric of a run as a :class:`Series`; ``read`` takes only the rows added since the last read,
    so a redraw costs the same at step 100 and at step 100,000."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self._rows = self._evals = 0

    def read(self, run: Any) -> bool:
        """Adds the run's new history rows (floats ``fit`` read back); says whether there were any."""
        rows, evals = run.history[self._rows :], run.eval_history[self._evals :]
        for row in rows:
            step = float(row["step"])
            for name, value in metrics_of(row).items():
                self.series.setdefault(name, Series(_TRAIN_COLOR)).add(step, value)
        for row in evals:
            for name, value in metrics_of(row).items():
                self.series.setdefault(name, Series(_EVAL_COLOR)).add(float(row["step"]), value)
        self._rows, self._evals = self._rows + len(rows), self._evals + len(evals)
        return bool(rows or evals)


def _format(value: float) -> str:
    return f"{value:.4g}"


def svg_chart(name: str, series: Series, *, width: int = 300, height: int = 130) -> str:
    """One metric against the step, as an SVG polyline with its range labelled."""
    points = series.points()
    left, right, top, bottom = 8, width - 8, 22, height - 18
    title = html.escape(name) + (f" = {_format(series.values[-1])}" if series.values else "")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="jaxpipe-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" style="font:11px sans-serif">',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#ccc"/>',
        f'<text x="{left}" y="14" font-weight="bold">{title}</text>',
    ]
    if points:
        x0, x1 = points[0][0], points[-1][0]
        y0, y1 = series.low, series.high
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        if y1 == y0:
            pad = abs(y0) * 0.05 or 0.5
            y0, y1 = y0 - pad, y1 + pad
        placed = [
            (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
            for x, y in points
        ]
        coordinates = " ".join(f"{px:.1f},{py:.1f}" for px, py in placed)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{series.color}" stroke-width="1.5"/>')
        if len(placed) < 30:  # few points (an eval per epoch): mark each
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{series.color}"/>' for px, py in placed]
        parts += [
            f'<text x="{right - 2}" y="{top + 11}" text-anchor="end" fill="#666">{_format(series.high)}</text>',
            f'<text x="{right - 2}" y="{bottom - 3}" text-anchor="end" fill="#666">{_format(series.low)}</text>',
            f'<text x="{left}" y="{height - 4}" fill="#666">step {int(points[0][0])}</text>',
            f'<text x="{right}" y="{height - 4}" text-anchor="end" fill="#666">{int(points[-1][0])}</text>',
        ]
    if series.non_finite:
        parts.append(
            f'<text x="{width // 2}" y="14" text-anchor="middle" fill="#b00020">{series.non_finite} non-finite</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def plot_html(metrics: Metrics) -> str:
    """Every metric as a row of small charts (training blue, eval orange)."""
    charts = [svg_chart(name, series) for name, series in metrics.series.items()]
    if not charts:
        return '<div class="jaxpipe-plot"><i>metrics appear after the first read-back</i></div>'
    return f'<div class="jaxpipe-plot" style="display:flex;flex-wrap:wrap;gap:8px">{"".join(charts)}</div>'


def status_text(run: Any, elapsed: float) -> str:
    """One line: where the run is, its speed and its latest metrics."""
    total = f"/{run.total_steps}" if run.total_steps else ""
    done = run.step - run.start_step
    latest = ", ".join(f"{k} {_format(v)}" for k, v in metrics_of(run.history[-1]).items()) if run.history else ""
    speed = f"{done / elapsed:.3g} steps/s" if elapsed > 0 and done else ""
    return " · ".join(part for part in (f"step {run.step}{total}", speed, latest) if part)


_STOP_TOOLTIP = (
    "End training after the current step; fit returns the state so far (checkpointed if the pipeline has a "
    ".checkpoint stage)."
)


# --- the view of one run --------------------------------------------------------------


class FitView:
    """The dashboard of one ``fit`` run; also the run's progress bar (tqdm-like).

    ``fit`` calls ``update`` after every step; the view redraws from the run
    at most every ``REFRESH_SECONDS``, and once more when the run closes.
    """

    def __init__(self, run: Any) -> None:
        import ipywidgets

        self.run = run
        self.started = self._drawn = self._polled = time.monotonic()
        self.metrics = Metrics()
        self.title = ipywidgets.HTML(value=f"<b>fit</b> <code>{html.escape(repr(run.pipeline))}</code>")
        self.progress = ipywidgets.IntProgress(value=run.step, min=0, max=run.total_steps or max(run.step, 1))
        self.status = ipywidgets.HTML()
        self.status.add_class("jaxpipe-status")
        self.stop_button = ipywidgets.Button(
            description="Stop", icon="stop", button_style="danger", tooltip=_STOP_TOOLTIP
        )
        self.stop_button.add_class("jaxpipe-stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.closed = False
        self.poller: Any = None  # reads the click while fit runs in the cell (see the module docstring)
        self.plot = ipywidgets.HTML()
        self.widget = ipywidgets.VBox(
            [self.title, ipywidgets.HBox([self.progress, self.stop_button, self.status]), self.plot]
        )
        self.widget.add_class("jaxpipe-dashboard")
        self.draw()

    def arm(self) -> None:
        """Starts reading widget messages between steps; called as the loop starts."""
        from jaxpipe.ipython.uipoll import comm_poller

        if not self.closed and self.poller is None:
            self.poller = comm_poller()

    def poll(self) -> None:
        """Handles a pending click, at most every ``POLL_SECONDS`` (a clock read in between)."""
        if self.poller is not None and time.monotonic() - self._polled >= POLL_SECONDS:
            try:
                self.poller.poll()
            except Exception as err:  # training goes on; the click is then read after the cell
                self.disarm()
                warnings.warn(f"the dashboard stopped reading its Stop button during this run: {err!r}", stacklevel=2)
            self._polled = time.monotonic()

    def disarm(self) -> None:
        if self.poller is not None:
            self.poller.close()
            self.poller = None

    def stop(self) -> None:
        """Ends training after the current step (the Stop button's click)."""
        if self.closed:  # a click the kernel read only after the run ended
            return
        self.run.stop()
        self._show_stopping()

    def _show_stopping(self) -> None:
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"

    def draw(self) -> None:
        """Redraws progress, status and (when the history grew) the plot from the run."""
        now = time.monotonic()
        self._drawn = now
        run = self.run
        if run.total_steps is None:
            self.progress.max = max(run.step, 1)
        self.progress.value = min(run.step, self.progress.max)
        self.status.value = html.escape(status_text(run, now - self.started))
        if self.metrics.read(run) or not self.plot.value:
            self.plot.value = plot_html(self.metrics)
        if run.stop_requested and not self.stop_button.disabled:  # stopped by Ctrl-C or run.stop()
            self._show_stopping()

    def finish(self, message: str) -> None:
        """Shows how the run ended and retires the Stop button."""
        self.close()
        self.stop_button.button_style = ""
        self.status.value = html.escape(message)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/plain"] = f"fit dashboard of {self.run.pipeline!r}"
        return bundle

    # --- the tqdm-like surface fit uses ---------------------------------------------

    def update(self, n: int = 1) -> None:
        del n  # the run's step is the truth
        if time.monotonic() - self._drawn >= REFRESH_SECONDS:
            self.draw()

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs  # the status line and plot show the latest metrics

    def write(self, text: str) -> None:
        print(text)  # as tqdm.write: epoch summaries stay in the cell's text output

    def close(self) -> None:
        """The loop has ended: a later click does nothing, and the kernel gets back the requests held."""
        self.disarm()
        self.closed = True
        self.draw()
        self.stop_button.disabled = True


def end_message(run: Any, seconds: float) -> str:
    """How a run ended, for the status line."""
    if run.error is not None:
        return f"failed at step {run.step}: {type(run.error).__name__}: {run.error}"
    done = run.step - run.start_step
    how = "stopped" if run.interrupted else "finished"
    message = (
        f"{how} at step {run.step}{f'/{run.total_steps}' if run.total_steps else ''}: {done} steps in {seconds:.3g} s"
    )
    return message


# --- the plugin ------------------------------------------------------------------------


class Dashboard:
    """Shows a :class:`FitView` for every ``fit`` run while registered."""

    accepts_calls = True  # draws run.history and polls Stop once per call (each call lasts a bounded time)

    def __init__(self) -> None:
        self.views: dict[int, FitView] = {}

    @hookimpl
    def jaxpipe_fit_progress(self, run: Any) -> FitView:
        from IPython.display import display

        view = self.views[id(run)] = FitView(run)
        display(view)
        return view

    @hookimpl(trylast=True)  # the last step before the loop
    def jaxpipe_fit_start(self, run: Any, state: Any) -> None:
        del state  # the view shows the run
        view = self.views.get(id(run))
        if view is not None:
            view.arm()

    @hookimpl
    def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
        del state, metrics  # a click is read between steps; metrics are read back by fit
        view = self.views.get(id(run))
        if view is not None:
            view.poll()

    @hookimpl(trylast=True)  # after a checkpoint stage's save at fit end
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        del state  # the view shows the run
        view = self.views.pop(id(run), None)
        if view is not None:
            view.finish(end_message(run, time.monotonic() - view.started))


DASHBOARD = Dashboard()


def register() -> Callable[[], None]:
    """Registers :data:`DASHBOARD` with jaxpipe's plugins; returns the undo (for ``%unload_ext``)."""
    from jaxpipe._plugins.manager import plugin_manager

    pm = plugin_manager()
    if not pm.is_registered(DASHBOARD):
        pm.register(DASHBOARD, name="jaxpipe-dashboard")

    def unregister() -> None:
        if pm.is_registered(DASHBOARD):
            pm.unregister(DASHBOARD)

    return unregister
