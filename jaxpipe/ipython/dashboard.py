"""The fit dashboard: progress, a live metrics plot and a Stop button, in a notebook.

While ``%load_ext jaxpipe`` is active in a Jupyter kernel, :data:`DASHBOARD` is
a registered plugin. It supplies ``fit``'s progress display (hook
``jaxpipe_fit_progress``), so a notebook shows one progress display, not a
tqdm bar beside it. The view redraws at most every ``REFRESH_SECONDS`` and
reads only ``run.history``, the floats ``fit`` already copied from the device,
so it adds no device synchronisation to the loop.

Stop ends training after the current step and ``fit`` returns normally, so a
``.checkpoint()`` stage saves as at any end. A kernel reads a widget's click
only once the cell it runs has finished, too late for a ``fit`` running in
that cell; so the button's click asks the Jupyter server to interrupt the
kernel, through its REST API (``POST {baseUrl}api/kernels/<id>/interrupt``,
as JupyterLab's own interrupt button does), and ``fit`` takes that interrupt
as "stop after this step". The kernel's id is the one in its connection
file's name (``kernel-<id>.json``). The button interrupts only while ``fit``
runs in the kernel's main thread, between ``jaxpipe_fit_start`` and the end
of the loop; after the run it is disabled, so a late click cannot interrupt
the next cell.

Where the page is not served by a Jupyter server (JupyterLab and Notebook 7
are; VS Code, for one, is not) or the request fails, and when ``fit`` runs on
another thread, the click falls back to the widget message, which calls
``run.stop()`` once the kernel reads it: at once for a ``fit`` on a
background thread, but only after the cell for one in the cell itself. There,
interrupt the kernel (VS Code's Interrupt button), which ``fit`` also treats
as "stop after this step".
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from jaxpipe.hookspecs import hookimpl

REFRESH_SECONDS = 0.5
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
        for offset, row in enumerate(rows, run.start_step + self._rows + 1):
            for name, value in row.items():
                self.series.setdefault(name, Series(_TRAIN_COLOR)).add(float(offset), value)
        for row in evals:
            for name, value in row.items():
                if name not in ("epoch", "step"):
                    self.series.setdefault(name, Series(_EVAL_COLOR)).add(row["step"], value)
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
    latest = ", ".join(f"{k} {_format(v)}" for k, v in run.history[-1].items()) if run.history else ""
    speed = f"{done / elapsed:.3g} steps/s" if elapsed > 0 and done else ""
    return " · ".join(part for part in (f"step {run.step}{total}", speed, latest) if part)


# --- the Stop button: a kernel interrupt through the Jupyter server ------------------------

# The button's click handler (see the module docstring). ``data-kernel`` is set only while an
# interrupt means "stop after this step"; without it, or without a Jupyter server's page
# config, or when the request fails, it clicks the hidden widget button instead (run.stop()).
_STOP_ONCLICK = """if (this.disabled) return;
this.disabled = true; this.textContent = 'Stopping\u2026';
var button = this, kernel = button.dataset.kernel;
var config = document.getElementById('jupyter-config-data');
var viaWidget = function () {
  var hidden = button.closest('.jaxpipe-dashboard')?.querySelector('.jaxpipe-stop-comm');
  if (hidden) hidden.click();
};
if (!kernel || !config) return viaWidget();
var base = (JSON.parse(config.textContent).baseUrl || '/').replace(/\\/?$/, '/');
var xsrf = document.cookie.match(/(?:^|;\\s*)_xsrf=([^;]*)/);
fetch(base + 'api/kernels/' + encodeURIComponent(kernel) + '/interrupt', {
  method: 'POST', credentials: 'same-origin', headers: xsrf ? {'X-XSRFToken': xsrf[1]} : {}
}).then(function (response) { if (!response.ok) viaWidget(); }, viaWidget);"""

_STOP_TOOLTIP = (
    "End training after the current step; fit returns the state so far (checkpointed if the pipeline has a "
    ".checkpoint stage)."
)


def kernel_id() -> str | None:
    """This kernel's id on its Jupyter server, from its connection file ``kernel-<id>.json``; None outside one."""
    if "ipykernel" not in sys.modules:  # not in a Jupyter kernel: nothing to import
        return None
    from ipykernel.connect import get_connection_file

    try:
        name = os.path.basename(get_connection_file())
    except (RuntimeError, OSError):  # ipykernel imported, but no kernel running here
        return None
    match = re.fullmatch(r"kernel-([0-9A-Za-z-]+)\.json", name)
    return match.group(1) if match else None


def stop_button_html(label: str = "Stop", *, kernel: str | None = None, enabled: bool = True) -> str:
    """The Stop button; with ``kernel``, its click interrupts that kernel (see the module docstring)."""
    attributes = f' onclick="{html.escape(_STOP_ONCLICK)}"' if enabled else " disabled"
    if enabled and kernel is not None:
        attributes += f' data-kernel="{html.escape(kernel)}"'
    style = " mod-danger" if enabled else ""
    return (
        f'<button type="button" class="jupyter-widgets jupyter-button widget-button jaxpipe-stop{style}" '
        f'title="{html.escape(_STOP_TOOLTIP)}"{attributes}><i class="fa fa-stop"></i> {html.escape(label)}</button>'
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
        self.started = self._drawn = time.monotonic()
        self.metrics = Metrics()
        self.title = ipywidgets.HTML(value=f"<b>fit</b> <code>{html.escape(repr(run.pipeline))}</code>")
        self.progress = ipywidgets.IntProgress(value=run.step, min=0, max=run.total_steps or max(run.step, 1))
        self.status = ipywidgets.HTML()
        self.stop_control = ipywidgets.HTML(stop_button_html())  # the Stop button in the page
        self.stop_button = ipywidgets.Button(  # its widget-message route: hidden, clicked by stop_control
            description="Stop",
            icon="stop",
            button_style="danger",
            tooltip=_STOP_TOOLTIP,
            layout=ipywidgets.Layout(display="none"),
        )
        self.stop_button.add_class("jaxpipe-stop-comm")
        self.stop_button.on_click(lambda _: self.stop())
        self.closed = False
        self.plot = ipywidgets.HTML()
        self.widget = ipywidgets.VBox(
            [self.title, ipywidgets.HBox([self.progress, self.stop_control, self.stop_button, self.status]), self.plot]
        )
        self.widget.add_class("jaxpipe-dashboard")
        self.draw()

    def arm(self) -> None:
        """Lets a click interrupt the kernel; called as the loop starts, where ``fit`` reads SIGINT as "stop"."""
        kernel = kernel_id() if threading.current_thread() is threading.main_thread() else None
        if kernel is not None and not self.closed and not self.stop_button.disabled:
            self.stop_control.value = stop_button_html(kernel=kernel)

    def stop(self) -> None:
        """Ends training after the current step (the Stop button's widget route)."""
        if self.closed:  # a click the kernel read only after the run ended
            return
        self.run.stop()
        self._show_stopping()

    def _show_stopping(self) -> None:
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"
        self.stop_control.value = stop_button_html("Stopping…", enabled=False)

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
        if run.stop_requested and not self.stop_button.disabled:  # stopped by an interrupt or run.stop()
            self._show_stopping()

    def finish(self, message: str) -> None:
        """Shows how the run ended and retires the Stop button."""
        self.closed = True
        self.draw()
        self.stop_button.disabled = True
        self.stop_button.button_style = ""
        self.stop_control.value = stop_button_html(enabled=False)
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
        """The loop has ended: from now on a click neither interrupts the kernel nor stops the run."""
        self.closed = True
        self.draw()
        self.stop_control.value = stop_button_html(self.stop_button.description, enabled=False)


def end_message(run: Any, seconds: float) -> str:
    """How a run ended, for the status line."""
    if run.error is not None:
        return f"failed at step {run.step}: {type(run.error).__name__}: {run.error}"
    done = run.step - run.start_step
    how = "stopped" if run.interrupted else "finished"
    message = (
        f"{how} at step {run.step}{f'/{run.total_steps}' if run.total_steps else ''}: {done} steps in {seconds:.3g} s"
    )
    checkpoint = next((s for s in run.pipeline.stages if s.name == "checkpoint"), None)
    if checkpoint is not None and "directory" in checkpoint.options:
        message += f"; state saved by .checkpoint in {checkpoint.options['directory']}"
    return message


# --- the plugin ------------------------------------------------------------------------


class Dashboard:
    """Shows a :class:`FitView` for every ``fit`` run while registered."""

    def __init__(self) -> None:
        self.views: dict[int, FitView] = {}

    @hookimpl
    def jaxpipe_fit_progress(self, run: Any) -> FitView:
        from IPython.display import display

        view = self.views[id(run)] = FitView(run)
        display(view)
        return view

    @hookimpl(trylast=True)  # the last step before the loop, inside which fit reads SIGINT as "stop"
    def jaxpipe_fit_start(self, run: Any, state: Any) -> None:
        del state  # the view shows the run
        view = self.views.get(id(run))
        if view is not None:
            view.arm()

    @hookimpl(trylast=True)  # after a checkpoint stage's save at fit end
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        del state  # the view shows the run
        view = self.views.pop(id(run), None)
        if view is not None:
            view.finish(end_message(run, time.monotonic() - view.started))


DASHBOARD = Dashboard()


def register() -> Callable[[], None]:
    """Registers :data:`DASHBOARD` with jaxpipe's plugins; returns the undo (for ``%unload_ext``)."""
    from jaxpipe._plugins import plugin_manager

    pm = plugin_manager()
    if not pm.is_registered(DASHBOARD):
        pm.register(DASHBOARD, name="jaxpipe-dashboard")

    def unregister() -> None:
        if pm.is_registered(DASHBOARD):
            pm.unregister(DASHBOARD)

    return unregister
