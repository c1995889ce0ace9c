"""The dashboard's Stop button at the kernel protocol level, as VS Code and Colab drive it.

A real IPython kernel (started by jupyter_client) runs a cell whose ``fit``
shows the dashboard. The test finds the Stop button's comm in the kernel's
iopub messages, as a front end does, queues a second cell, and then sends the
comm message a click produces (ipywidgets 8: ``{"method": "custom",
"content": {"event": "click"}}``, what JupyterLab's widget manager sends).
fit must stop after a step with a consistent state, and the queued cell must
run after it, in order.
"""

from __future__ import annotations

import os
import queue
import re
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

TOTAL = 8 * 10**6  # epochs * steps per epoch: far longer than the test, unless Stop works

CELL = """\
%load_ext jaxpipe
import time
import jax, jax.numpy as jnp, numpy as np, optax
from jaxpipe import Pipeline

def loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
data = {{"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}}
trainer = Pipeline(loss).optimize(optax.sgd(0.01)).jit().checkpoint({directory!r}, every=10**9)
state = trainer.init(jax.random.key(0), data, params={{"w": jnp.zeros(3)}})
state = trainer.fit(state, data, epochs=10**6, batch_size=8, log_every=4)
print("fit returned at step", int(state.step))
time.sleep(1)  # a request sent now, after fit, must not be lost either
"""


class Frontend:
    """What a front end keeps of the kernel's iopub messages: widget models, outputs, replies."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.models: dict[str, dict[str, Any]] = {}
        self.displayed: list[str] = []
        self.text: list[tuple[str, str]] = []  # (parent msg_id, text)
        self.idle: set[str] = set()

    def pump(self, timeout: float = 0.2) -> None:
        try:
            msg = self.client.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return
        kind, content, parent = msg["msg_type"], msg["content"], msg["parent_header"].get("msg_id", "")
        if kind == "comm_open":
            self.models[content["comm_id"]] = dict(content["data"].get("state", {}))
        elif kind == "comm_msg" and content["data"].get("method") in ("update", "echo_update"):
            self.models.setdefault(content["comm_id"], {}).update(content["data"].get("state", {}))
        elif kind == "display_data" and "application/vnd.jupyter.widget-view+json" in content["data"]:
            self.displayed.append(content["data"]["application/vnd.jupyter.widget-view+json"]["model_id"])
        elif kind == "stream":
            self.text.append((parent, content["text"]))
        elif kind == "error":
            self.text.append((parent, "\n".join(content["traceback"])))
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle.add(parent)

    def wait(self, condition: Any, what: str, seconds: float = 120) -> Any:
        deadline = time.monotonic() + seconds
        while not (found := condition()):
            assert time.monotonic() < deadline, f"waited {seconds} s for {what}; output: {self.text}"
            self.pump()
        return found

    def find(self, root: str, dom_class: str) -> str | None:
        """The comm id of the model with ``dom_class`` under the displayed model ``root``."""
        state = self.models.get(root, {})
        if dom_class in state.get("_dom_classes", ()):
            return root
        for child in state.get("children", ()):
            found = self.find(child.removeprefix("IPY_MODEL_"), dom_class)
            if found:
                return found
        return None


@pytest.fixture
def kernel():
    manager, client = start_new_kernel(kernel_name="python3", env=dict(os.environ))
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_a_stop_click_sent_as_a_comm_message_stops_fit_between_steps(kernel, tmp_path: Path) -> None:
    front = Frontend(kernel)
    first = kernel.execute(CELL.format(directory=str(tmp_path / "ckpt")))
    dashboard = front.wait(
        lambda: next((m for m in front.displayed if "jaxpipe-dashboard" in front.models[m]["_dom_classes"]), None),
        "the dashboard",
    )
    stop = front.find(dashboard, "jaxpipe-stop")
    status = front.wait(lambda: front.find(dashboard, "jaxpipe-status"), "the status line")
    assert stop is not None and front.models[stop]["_model_name"] == "ButtonModel"
    front.wait(lambda: re.match(r"step [1-9]\d*/", front.models[status].get("value", "")), "fit to be running")
    second = kernel.execute('print("second cell saw step", int(state.step))')  # held until fit ends
    time.sleep(0.5)
    assert second not in front.idle and first not in front.idle

    kernel.shell_channel.send(
        kernel.session.msg("comm_msg", {"comm_id": stop, "data": {"method": "custom", "content": {"event": "click"}}})
    )
    front.wait(lambda: any(p == first and "fit returned" in t for p, t in front.text), "fit to return")
    third = kernel.execute('print("third cell")')  # arrives after fit, while its cell still runs
    front.wait(lambda: third in front.idle, "the cells to run")
    assert front.idle >= {first, second, third}
    assert [p for p, _ in front.text if p in (second, third)] == [second, third]  # in the order sent

    ended = re.fullmatch(rf"stopped at step (\d+)/{TOTAL}: \d+ steps in .* s", front.models[status]["value"])
    assert ended, front.models[status]["value"]
    step = int(ended.group(1))
    first_text = "".join(t for p, t in front.text if p == first)
    second_text = "".join(t for p, t in front.text if p == second)
    assert f"fit returned at step {step}\n" in first_text and "Traceback" not in first_text, first_text
    assert second_text == f"second cell saw step {step}\n"  # ran after fit, on the state it returned
    assert front.models[stop]["disabled"] and 0 < step < TOTAL
    assert [name for name in os.listdir(tmp_path / "ckpt") if name.isdigit()] == [str(step)]  # saved at fit end
