"""Widget clicks while a cell runs: process the kernel's pending comm messages between training steps.

A Jupyter kernel reads the next message from its shell channel only once the
running cell returns, so a widget's click reaches Python after a long ``fit``,
not during it. :func:`comm_poller` gives the running cell a ``poll()`` that
handles the widget (comm) messages waiting now, the technique of
``jupyter-ui-poll``; every other request (a next cell, a completion) is held
and handed back to the kernel, in order, when the poller closes. This needs
nothing from the front end, so it works alike in JupyterLab, Notebook, VS Code
and Colab.

- ipykernel 7 reads shell messages on a thread of its own and passes the main
  shell's to the main thread through an in-process socket; the main thread,
  which runs the cell, reads that socket itself here.
- ipykernel 6 (still in Colab) has ``Kernel.do_one_iteration``, which the
  ``jupyter-ui-poll`` package drives; it is used there.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any, Protocol


class Poller(Protocol):
    def poll(self) -> None: ...

    def close(self) -> None: ...


def comm_poller() -> Poller | None:
    """A poller for the cell running now; None outside a Jupyter kernel's main thread."""
    if "ipykernel" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return None
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or getattr(kernel, "session", None) is None:
        return None
    try:
        if hasattr(kernel, "shell_main") and "comm_msg" in kernel.shell_handlers:
            return SocketPoller(kernel)
        if hasattr(kernel, "do_one_iteration"):
            return UiPoller()
    except (AttributeError, ImportError):  # a kernel laid out otherwise: the click is read after the cell
        pass
    return None


class SocketPoller:
    """ipykernel 7: reads the main shell's pending messages, handles comm messages, holds the rest."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        channel = getattr(kernel, "shell_channel_thread", None)
        if channel:  # messages reach the main thread through an in-process socket pair
            self.socket = channel.manager.get_shell_channel_to_subshell_pair(None).to_socket
        else:
            self.socket = kernel.shell_stream.socket
        self.held: list[Any] = []
        self.closed = False

    def poll(self, hold_all: bool = False) -> None:
        """Handles every comm message waiting now (about 15 µs when none is); holds the other messages."""
        import zmq

        session, handle = self.kernel.session, self.kernel.shell_handlers["comm_msg"]
        while not self.closed:
            try:
                raw = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            idents, frames = session.feed_identities(raw, copy=False)
            try:
                header = session.deserialize(frames, content=False, copy=False)["header"]
            except Exception:  # not ours to judge: the kernel reports it when it reads it
                header = {}
            if hold_all or header.get("msg_type") != "comm_msg":
                self.held.append(raw)
                continue
            # the comm's handler runs with the cell's output context, as the kernel's would between cells
            handle(None, idents, session.deserialize(frames, content=True, copy=False))

    def close(self) -> None:
        """Gives the held messages back to the kernel, in order, to handle after the cell.

        The socket is drained first: its file descriptor signals only new
        arrivals, so a message left in it could wait there until the next one.
        Each becomes a task of the kernel's loop, which waits for the running
        cell's lock like any request that comes in while a cell runs.
        """
        if self.closed:
            return
        self.poll(hold_all=True)
        self.closed = True
        for raw in self.held:
            asyncio.ensure_future(self.kernel.shell_main(None, raw))
        self.held.clear()


class UiPoller:
    """ipykernel 6: ``jupyter-ui-poll``'s ``ui_events``, which runs ``Kernel.do_one_iteration``."""

    def __init__(self) -> None:
        from jupyter_ui_poll import ui_events

        self.events = ui_events()
        self._poll = self.events.__enter__()
        self.closed = False

    def poll(self) -> None:
        if not self.closed:
            self._poll(10)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.__exit__(None, None, None)
