"""The example notebook in a real browser: JupyterLab on 127.0.0.1, chromium, headless.

Runs every cell of ``examples/inspector.ipynb`` and checks that the widgets
render in the page: the inspector's tabs (and a lazily computed tab), the
fit dashboard's Stop button and metric charts, and treescope's tree. A cell
added to the test's copy of the notebook starts a long checkpointed ``fit``;
the test clicks its Stop button while the cell runs and checks that training
ended cleanly after a step, with that step saved (the click travels as an
ordinary widget message, which the dashboard reads between steps). Screenshots go to pytest's
tmp dir and to ``tests/artifacts/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from environment import unavailable
from playwright.sync_api import sync_playwright

from jaxpipe.ipython.widgets import VIEWS

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "inspector.ipynb"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ENV = "JAXPIPE_CHROMIUM"  # a chromium to use instead of looking for one
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000
LONG_FIT_EPOCHS = 100_000  # 1.6M steps: far longer than the test, unless Stop works


def add_long_fit(notebook: Path, checkpoints: Path) -> None:
    """Appends a cell to ``notebook`` that trains for ages with a ``.checkpoint()`` stage, then prints the step."""
    source = (
        f"stoppable = trainer.checkpoint({str(checkpoints)!r}, every=10**9)  # saves when fit ends\n"
        "state = stoppable.init(jax.random.key(2), data, params={'w': w})\n"
        f"state = stoppable.fit(state, data, epochs={LONG_FIT_EPOCHS}, batch_size=32, log_every=4)\n"
        "print(f'fit returned at step {int(state.step)}')"
    )
    content = nbformat.read(notebook, as_version=4)
    content.cells.append(nbformat.v4.new_code_cell(source))
    nbformat.write(content, notebook)


def find_chromium() -> tuple[str | None, str]:
    """The chromium to drive, or None and why there is none (the test then skips, saying so).

    Looks at ``$JAXPIPE_CHROMIUM`` alone if set, else at Debian's ``chromium`` (or ``chromium-browser``) on
    PATH, then at Playwright's own download (``python -m playwright install chromium``); ``scripts/test``
    installs one of these where it can. A browser counts only if ``--version`` runs: a download without its
    system libraries does not.
    """
    given = os.environ.get(CHROMIUM_ENV)
    if given is not None:
        candidates = [given] if given else []
    else:
        candidates = [found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))]
        try:
            with sync_playwright() as playwright:
                candidates.append(playwright.chromium.executable_path)
        except Exception as err:  # no driver: Playwright's browser cannot be asked for
            candidates.append(f"<Playwright's chromium: {type(err).__name__}: {err}>")
    tried = []
    for path in candidates:
        if not Path(path).is_file():
            tried.append(f"{path} (not there)")
            continue
        try:
            ran = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            tried.append(f"{path} ({type(err).__name__}: {err})")
            continue
        if ran.returncode == 0:
            return path, ""
        tried.append(f"{path} (--version exited {ran.returncode}: {ran.stderr.strip()[-200:]})")
    where = "; ".join(tried) or f"{CHROMIUM_ENV} is empty"
    return None, (
        f"no chromium to drive: tried {where}. Install Debian's (apt-get install -y chromium) or Playwright's "
        f"(python -m playwright install chromium), or set {CHROMIUM_ENV}; scripts/test tries both."
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path, home: Path) -> Iterator[str]:
    """A JupyterLab server serving ``root`` on 127.0.0.1; yields its URL with the token."""
    port, token = free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
    )
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells through JupyterLab's commands
        "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=None",
        f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--LabApp.user_settings_dir={home / 'settings'}",
    ]  # fmt: skip
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the screenshot
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    log = (home / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"JupyterLab exited early:\n{(home / 'jupyterlab.log').read_text()}"
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.2)
        yield f"{url}/lab/tree/{NOTEBOOK.name}?token={token}"
    finally:
        server.terminate()  # JupyterLab shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_example_notebook_renders_inspector_and_dashboard_and_stop_ends_a_running_fit(tmp_path: Path) -> None:
    chromium, why_not = find_chromium()
    if chromium is None:
        unavailable(why_not)
    root, checkpoints = tmp_path / "root", tmp_path / "checkpoints"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    add_long_fit(root / NOTEBOOK.name, checkpoints)
    with jupyterlab(root, tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a new, empty profile
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1600},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel")
            page.evaluate(
                "async () => { const panel = window.jupyterapp.shell.currentWidget;"
                " await panel.context.ready; await panel.sessionContext.ready; }"
            )
            # not awaited: the last cell runs until the test clicks Stop
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

            # the fit dashboard: its status says how the run ended once fit returned
            dashboard = page.locator(".jaxpipe-dashboard").first
            dashboard.get_by_text("finished at step 320/320").wait_for()
            assert dashboard.get_by_role("button", name="Stop").is_disabled()
            assert dashboard.locator("svg.jaxpipe-chart polyline").count() >= 1
            charts = dashboard.locator("svg.jaxpipe-chart").all_text_contents()
            assert any(chart.startswith("loss = ") for chart in charts), charts

            # the long fit, running in its cell: the click reaches the kernel as a widget message, which the
            # dashboard reads between steps, and fit stops after the step
            running = page.locator(".jaxpipe-dashboard").nth(1)
            running.get_by_text(re.compile(r"^step [1-9]\d*/")).wait_for()  # fit's loop has begun
            running.get_by_role("button", name="Stop").click()
            total = LONG_FIT_EPOCHS * 16
            ended = running.get_by_text(re.compile(rf"^stopped at step \d+/{total}: "))
            ended.wait_for()
            step = int(re.match(r"stopped at step (\d+)/", ended.inner_text()).group(1))
            assert 0 < step < total, ended.inner_text()
            outputs = page.locator(".jp-OutputArea-output")
            outputs.get_by_text(f"fit returned at step {step}").wait_for()  # the cell went on after fit
            assert outputs.get_by_text("KeyboardInterrupt").count() == 0  # no traceback in any output
            assert running.locator("button.jaxpipe-stop").is_disabled()  # a late click does nothing
            assert str(step) in os.listdir(checkpoints)  # .checkpoint saved the stopped state
            page.locator("treescope-container").last.scroll_into_view_if_needed()  # treescope draws once in view
            page.wait_for_function(  # show_tree: the trained params, drawn by treescope in its shadow DOM
                "[...document.querySelectorAll('treescope-container')]"
                ".some(c => c.shadowRoot?.textContent.includes('float32(8,)'))"
            )

            # the inspector: one tab per view; opening a tab computes it in the kernel
            inspector = page.locator(".jaxpipe-inspector")
            tabs = inspector.locator(".lm-TabBar-tab")
            assert [t.strip() for t in tabs.all_inner_texts()] == list(VIEWS)
            assert "jax.jit(jax.vmap(jax.grad(loss)" in inspector.inner_text()
            tabs.nth(VIEWS.index("jaxpr")).click()
            inspector.get_by_text("lambda", exact=False).first.wait_for()

            inspector.scroll_into_view_if_needed()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=tmp_path / "inspector.png")
            running.scroll_into_view_if_needed()  # the stopped run, the first dashboard above it
            page.screenshot(path=tmp_path / "dashboard.png")
            for name in ("inspector.png", "dashboard.png"):
                shutil.copy(tmp_path / name, ARTIFACTS / name)
        finally:
            browser.close()


if __name__ == "__main__":  # pragma: no cover - a handy way to look at the screenshots
    sys.exit(pytest.main([__file__, "-q"]))
