"""Rich display, the inspector and the fit dashboard: the same programs as hand-written JAX, escaped HTML,
lazy tabs, plain text outside a notebook, and a Stop button that ends training cleanly."""

from __future__ import annotations

import html
import os
import re
import threading
from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import treescope
from IPython.core.interactiveshell import InteractiveShell

import jaxpipe
from jaxpipe import Pipeline
from jaxpipe._plugins import plugin_manager
from jaxpipe._prng import KeyReuseWarning
from jaxpipe._tools.display import pipeline_html, pipeline_text, show_tree, tree_html
from jaxpipe.ipython import dashboard as dash
from jaxpipe.ipython.widgets import TIMING_NUMBER, VIEWS, Inspector

NASTY = ["<script>alert(1)</script>", "a&b"]


class Tags(HTMLParser):
    """The start tags of an HTML text, to check that user data never became markup."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def assert_escaped(text: str, name: str) -> None:
    assert html.escape(name) in text
    assert name not in text
    assert not [t for t, _ in Tags(text).tags if t == "script"]


def noisy_loss(w, x, key):
    return jnp.sum((w * x + jax.random.normal(key, x.shape)) ** 2)


def args():
    return jnp.arange(3.0), jnp.ones((4, 3)), jax.random.key(0)


PER_EXAMPLE = Pipeline(noisy_loss).grad().vmap(in_axes=(None, 0, None)).jit()
HAND = jax.jit(jax.vmap(jax.grad(noisy_loss), in_axes=(None, 0, None)))


# --- rich display of a Pipeline ----------------------------------------------------------------


@pytest.mark.parametrize("name", NASTY)
def test_pipeline_html_escapes_names_and_options(name):
    pipe = Pipeline(noisy_loss, name=name).grad().vmap(in_axes=(None, 0, None), axis_name=name).jit()
    out = pipe._repr_html_()
    assert out == pipeline_html(pipe)
    assert_escaped(out, name)
    assert html.escape(pipe.explain()) in out  # the equivalent JAX, as code


def test_pipeline_text_lists_the_stages_and_the_equivalent_jax():
    assert pipeline_text(PER_EXAMPLE) == (
        "Pipeline(noisy_loss).grad().vmap(in_axes=(None, 0, None)).jit()\n"
        "  1. grad()\n"
        "  2. vmap(in_axes=(None, 0, None))\n"
        "  3. jit()\n"
        "equivalent JAX:\n"
        "  jax.jit(jax.vmap(jax.grad(noisy_loss), in_axes=(None, 0, None)))"
    )


# --- the inspector -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inspector():
    return Inspector(PER_EXAMPLE, *args())


def test_inspector_shows_the_programs_of_the_hand_written_jax(inspector):
    assert inspector.text("jaxpr") == HAND.trace(*args()).jaxpr.pretty_print(use_color=False)
    assert inspector.text("Lowered") == HAND.lower(*args()).as_text()
    flops = HAND.lower(*args()).compile().cost_analysis()["flops"]
    assert f"{flops:,.0f}" in inspector.text("Cost & memory") and "temp bytes" in inspector.text("Cost & memory")
    timing = inspector.result("Timing")
    assert isinstance(timing, jaxpipe.Timing) and timing.number == TIMING_NUMBER and timing.compile > 0
    assert inspector.html("Timing") == timing._repr_html_()
    tree = inspector.result("PRNG keys")
    assert tree.reuses == [] and "jax.random.normal" in inspector.text("PRNG keys")


def test_prng_view_flags_a_reused_key():
    def reuse(key):
        return jax.random.normal(key) + jax.random.uniform(key)

    with pytest.warns(KeyReuseWarning):
        inspector = Inspector(Pipeline(reuse).jit(), jax.random.key(0))
        assert len(inspector.result("PRNG keys").reuses) == 1
    assert "⚠" in inspector.html("PRNG keys") and "⚠" in inspector.text("PRNG keys")


def test_tabs_are_computed_when_first_opened_and_kept():
    traces = []

    def counted(w, x):
        traces.append(1)
        return jnp.sum(w * x)

    inspector = Inspector(Pipeline(counted).grad().jit(), jnp.ones(3), jnp.ones(3))
    tab = inspector.widget
    assert list(tab.titles) == list(VIEWS) and tab.selected_index == 0
    assert tab.children[0].value == pipeline_html(inspector.pipe)
    assert not traces and all(page.value == "<i>computing…</i>" for page in tab.children[1:])
    tab.selected_index = VIEWS.index("jaxpr")  # what a click on the tab does
    assert len(traces) == 1 and tab.children[1].value == inspector.html("jaxpr")
    assert "lambda" in tab.children[1].value and tab.children[2].value == "<i>computing…</i>"
    tab.selected_index = 0
    tab.selected_index = VIEWS.index("jaxpr")
    assert len(traces) == 1


def test_views_without_arguments_say_what_to_give():
    inspector = Inspector(PER_EXAMPLE)
    assert inspector.text("Stages") == pipeline_text(PER_EXAMPLE)
    for view in VIEWS[1:]:
        assert inspector.text(view).startswith(f"The {view} view traces the pipeline, so it needs example arguments")


def test_a_view_that_fails_shows_the_error_in_its_tab():
    inspector = Inspector(PER_EXAMPLE, jnp.ones(3), jnp.ones((4, 5)), jax.random.key(0))  # 5 != 3
    tab = inspector.widget
    tab.selected_index = VIEWS.index("jaxpr")  # does not raise into the widget
    assert inspector.text("jaxpr") == "TypeError: mul got incompatible shapes for broadcasting: (3,), (5,)."
    assert tab.children[1].value == inspector.html("jaxpr") and "color:#b00020" in tab.children[1].value


@pytest.mark.parametrize("name", NASTY)
def test_every_view_escapes_the_pipeline_name(name):
    inspector = Inspector(Pipeline(lambda x: x * 2.0, name=name).jit(), jnp.ones(2))
    for view in VIEWS:
        assert name not in inspector.html(view)
    assert_escaped(inspector.html("Stages"), name)


# --- plain text outside a notebook --------------------------------------------------------------


def test_terminal_ipython_shows_every_view_as_plain_text(capsys):
    shell = InteractiveShell.instance()
    assert getattr(shell, "kernel", None) is None
    inspector = Inspector(PER_EXAMPLE, *args())
    data, _ = shell.display_formatter.format(inspector)
    assert set(data) == {"text/plain"}
    assert data["text/plain"] == str(inspector)
    assert [line for line in str(inspector).splitlines() if line.startswith("== ")] == [f"== {v} ==" for v in VIEWS]
    shell.user_ns.update(per_example=PER_EXAMPLE, inputs=args())
    shell.run_cell("from jaxpipe.ipython.widgets import show_inspector\nshow_inspector(per_example, *inputs)")
    out = capsys.readouterr().out
    assert "== jaxpr ==\n" + inspector.text("jaxpr") in out and "steady median" in out


def test_loading_the_extension_outside_a_kernel_adds_no_dashboard():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jaxpipe")
    try:
        assert not plugin_manager().is_registered(dash.DASHBOARD)
    finally:
        shell.run_line_magic("unload_ext", "jaxpipe")


# --- pytrees through treescope -----------------------------------------------------------------


def test_show_tree_renders_with_treescope_and_escapes_keys():
    tree = {NASTY[0]: jnp.ones(3), NASTY[1]: {"b": 2.0}}
    assert repr(show_tree(tree)) == treescope.render_to_text(tree)
    out = tree_html(tree, compressed=False)
    assert "treescope-container" in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    scripts = [t for t, attrs in Tags(out).tags if t == "script" and ("type", "application/octet-stream") not in attrs]
    assert all("alert(1)" not in str(attrs) for _, attrs in Tags(out).tags if _ != "span")
    assert scripts  # treescope's own loader only
    assert show_tree(tree)._repr_html_().startswith("<script>")  # compressed: the same renderer, zipped


# --- the fit dashboard -------------------------------------------------------------------------


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


class KeptDashboard(dash.Dashboard):
    """The dashboard plugin, keeping its last view for the test to look at."""

    view: dash.FitView | None = None

    @jaxpipe.hookimpl
    def jaxpipe_fit_progress(self, run):
        self.view = super().jaxpipe_fit_progress(run)
        return self.view


class ClickStop:
    """Clicks the dashboard's Stop button after step ``at``, as a user would."""

    def __init__(self, board: KeptDashboard, at: int) -> None:
        self.board, self.at, self.clicked = board, at, None

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        if run.step >= self.at and self.clicked is None:  # fit runs several steps per call
            self.board.view.stop_button.click()
            self.clicked = run.step


def train(pipe, data, hooks, capsys):
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    state = pipe.fit(state, data, epochs=3, batch_size=8, log_every=4, hooks=hooks)
    return state, capsys.readouterr()


def test_dashboard_replaces_the_progress_bar_and_plots_the_history(data, capsys):
    board = KeptDashboard()
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05), metrics=("grad_norm",)).jit()
    state, captured = train(pipe, data, [board], capsys)
    view = board.view
    assert int(state.step) == 24 and "step/s]" not in captured.err  # no tqdm bar beside the dashboard
    assert view.progress.value == view.progress.max == 24
    assert view.status.value.startswith("finished at step 24/24: 24 steps in ")
    assert view.stop_button.disabled
    history = view.run.history
    assert [len(history), sorted(dash.metrics_of(history[0]))] == [24, ["grad_norm", "loss"]]
    metrics = dash.Metrics()
    assert metrics.read(view.run) and view.plot.value == dash.plot_html(metrics)
    assert sorted(metrics.series) == ["grad_norm", "loss"]  # a row's step and epoch are not metrics
    assert metrics.series["loss"].steps == [float(s) for s in range(1, 25)]
    assert f"loss = {history[-1]['loss']:.4g}" in view.plot.value
    assert view._repr_mimebundle_()["text/plain"].startswith("fit dashboard of Pipeline(linear_loss)")


def test_stop_button_ends_training_after_the_current_step_with_a_checkpoint(data, capsys, tmp_path):
    board = KeptDashboard()
    directory = tmp_path / "ckpt"
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit().checkpoint(str(directory), every=100)
    click = ClickStop(board, at=5)
    state, _ = train(pipe, data, [board, click], capsys)
    view, step = board.view, click.clicked
    assert 5 <= step < 24 and int(state.step) == step  # stopped after the call the click came in
    assert view.run.interrupted and view.stop_button.description == "Stopping…"
    assert re.fullmatch(rf"stopped at step {step}/24: {step} steps in \S+ s", html.unescape(view.status.value))
    assert view.stop_button.disabled and "jaxpipe-stop" in view.stop_button._dom_classes
    assert str(step) in os.listdir(directory)  # Orbax saved the stopped state at fit end


class Polls:
    """Counts the view's reads of widget messages: a stand-in poller, as outside a kernel there is none."""

    def __init__(self, board: KeptDashboard) -> None:
        self.board, self.polls, self.closed, self.calls = board, 0, 0, 0

    def poll(self):
        self.polls += 1

    def close(self):
        self.closed += 1

    @jaxpipe.hookimpl(trylast=True)
    def jaxpipe_fit_start(self, run, state):
        assert self.board.view.poller is None  # outside a kernel: no poller
        self.board.view.poller = self

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        self.calls += 1


def test_dashboard_reads_clicks_between_steps_at_most_every_poll_period_and_closes_the_poller(
    data, capsys, monkeypatch
):
    board = KeptDashboard()
    polls = Polls(board)
    monkeypatch.setattr(dash, "POLL_SECONDS", 0.0)
    train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), data, [board, polls], capsys)
    assert polls.calls > 1 and (polls.polls, polls.closed, board.view.poller) == (polls.calls, 1, None)  # one per call
    monkeypatch.setattr(dash, "POLL_SECONDS", 3600.0)
    board, polls = KeptDashboard(), None
    polls = Polls(board)
    train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), data, [board, polls], capsys)
    assert (polls.polls, polls.closed) == (0, 1)


class BrokenPolls(Polls):
    def poll(self):
        raise RuntimeError("socket gone")


def test_a_poller_that_fails_is_dropped_with_a_warning_and_training_goes_on(data, capsys, monkeypatch):
    board = KeptDashboard()
    polls = BrokenPolls(board)
    monkeypatch.setattr(dash, "POLL_SECONDS", 0.0)
    with pytest.warns(UserWarning, match="stopped reading its Stop button during this run: RuntimeError"):
        state, _ = train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), data, [board, polls], capsys)
    assert int(state.step) == 24 and board.view.poller is None and polls.closed == 1


def test_no_poller_outside_a_kernel_or_off_the_main_thread():
    from jaxpipe.ipython.uipoll import comm_poller

    assert comm_poller() is None  # pytest: IPython may be imported, but no kernel runs here
    found = []
    thread = threading.Thread(target=lambda: found.append(comm_poller()))
    thread.start()
    thread.join()
    assert found == [None]


def test_stop_button_on_a_background_fit_stops_it_through_the_widget(data, capsys):
    board = KeptDashboard()
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    click = ClickStop(board, at=5)
    thread = threading.Thread(target=train, args=(pipe, data, [board, click], capsys))
    thread.start()
    thread.join()
    assert board.view.run.step == click.clicked < 24 and board.view.run.interrupted  # the widget route: run.stop()


def test_a_click_read_after_the_run_ended_changes_nothing(data, capsys):
    board = KeptDashboard()
    train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), data, [board], capsys)
    view = board.view
    status, button = view.status.value, view.stop_button.description
    view.stop_button.click()  # the kernel was busy in the cell; it reads the click now
    assert not view.run.stop_requested and (view.status.value, view.stop_button.description) == (status, button)


def test_dashboard_redraws_at_most_every_refresh_period(data, monkeypatch):
    run = jaxpipe.FitRun(Pipeline(linear_loss), epochs=1, batch_size=8, steps_per_epoch=8, total_steps=8)
    monkeypatch.setattr(dash, "REFRESH_SECONDS", 3600.0)  # no clock in the test: the period is an hour, then none
    view = dash.FitView(run)
    run.step = 3
    view.update(1)
    assert view.progress.value == 0  # drawn at creation, under REFRESH_SECONDS ago
    monkeypatch.setattr(dash, "REFRESH_SECONDS", 0.0)
    view.update(1)
    assert view.progress.value == 3


@pytest.mark.parametrize("name", NASTY)
def test_dashboard_escapes_metric_and_pipeline_names(name):
    run = jaxpipe.FitRun(Pipeline(linear_loss, name=name), epochs=1, batch_size=8, steps_per_epoch=2, total_steps=2)
    run.history.extend([{"step": 1, "epoch": 1, name: 1.0}, {"step": 2, "epoch": 1, name: 0.5}])  # as fit writes rows
    view = dash.FitView(run)
    view.draw()
    for text in (view.title.value, view.plot.value, view.status.value):
        assert name not in text
    assert html.escape(name) in view.title.value and html.escape(name) in view.plot.value


def series(values):
    line = dash.Series("#000")
    for step, value in enumerate(values, 1):
        line.add(float(step), value)
    return line


def test_chart_skips_non_finite_values_and_thins_long_histories():
    chart = dash.svg_chart("loss", series([1.0, float("nan"), 0.5]))
    (points,) = [attrs for tag, attrs in Tags(chart).tags if tag == "polyline"]
    assert len(dict(points)["points"].split()) == 2 and "1 non-finite" in chart
    long = series([1.0 / step for step in range(1, 10_001)])
    (points,) = [attrs for tag, attrs in Tags(dash.svg_chart("loss", long)).tags if tag == "polyline"]
    assert len(dict(points)["points"].split()) <= dash.MAX_POINTS + 1
    assert long.points()[-1] == (10_000.0, 1e-4) and (long.low, long.high) == (1e-4, 1.0)


def test_metrics_read_only_the_new_rows_and_match_one_read_of_everything():
    run = jaxpipe.FitRun(Pipeline(linear_loss), epochs=1, batch_size=8, steps_per_epoch=9, total_steps=9)
    growing = dash.Metrics()
    for step in range(9):
        run.history.append({"step": step + 1, "epoch": 1, "loss": 1.0 / (step + 1)})  # as fit writes rows
        if step % 3 == 2:
            run.eval_history.append({"epoch": 0.0, "step": float(step + 1), "eval_loss": 0.5})
        assert growing.read(run)
    assert not growing.read(run)
    at_once = dash.Metrics()
    at_once.read(run)
    assert dash.plot_html(growing) == dash.plot_html(at_once)
    assert growing.series["loss"].steps == [float(s) for s in range(1, 10)]
    assert growing.series["eval_loss"].steps == [3.0, 6.0, 9.0]


def test_register_adds_the_dashboard_once_and_its_undo_removes_it():
    undo = dash.register()
    try:
        assert dash.register() is not None and plugin_manager().is_registered(dash.DASHBOARD)
        assert [p for p in plugin_manager().get_plugins() if p is dash.DASHBOARD] == [dash.DASHBOARD]
    finally:
        undo()
    assert not plugin_manager().is_registered(dash.DASHBOARD)
