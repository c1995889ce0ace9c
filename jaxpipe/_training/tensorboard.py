"""``jaxpipe.TensorBoard``: a ``fit`` hook that writes the run's metrics as TensorBoard scalars.

It writes the floats ``fit`` already read back (``run.history``,
``run.eval_history``), so it adds no device synchronisation to the loop, with
tensorboardX (no TensorFlow), imported when a run starts.

Resuming. Every ``fit`` call writes a new event file in the same log
directories, starting with TensorBoard's purge marker at ``start_step + 1``:
TensorBoard then hides the events of earlier files from that step on. A run
resumed from a checkpoint at step ``s`` after a crash at step ``s + x`` thus
shows each step once: steps up to ``s`` from the first run, the rest from the
resumed one, which recomputes them (the crashed run's events past ``s``
described a state that no checkpoint kept). A fresh run (``resume=False``)
in an old log directory replaces the old curves the same way.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

from jaxpipe._core.run import metrics_of
from jaxpipe.errors import PipelineError, PipelineTypeError
from jaxpipe.hookspecs import hookimpl


class TensorBoard:
    """Writes scalars for ``fit``: ``fit(..., hooks=[jaxpipe.TensorBoard("runs/mnist")])``.

    Training metrics (every metric the step returns, the learning rate among
    them when the optimizer reports it) go to ``<logdir>/train``; eval metrics,
    without their ``eval_`` prefix, to ``<logdir>/eval``, so TensorBoard draws
    ``loss`` for both on one chart. Steps are the state's step; events are
    flushed after each call's rows are written (before that call's
    checkpoint, so a killed run resumed from it has every step it saved),
    at each epoch's end and when ``fit`` ends, stopped or not. Across
    several processes only process 0 writes.

    Args:
      logdir: the run's log directory (``tensorboard --logdir`` its parent to
        compare runs).
    """

    accepts_calls = True  # writes run.history's rows, so one call of several steps is fine

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = _check_logdir(logdir)
        _check_installed()
        self._writers: dict[str, Any] = {}
        self._rows = self._evals = 0
        self._purge_step: int | None = None

    def __repr__(self) -> str:
        return f"TensorBoard({self.logdir!r})"

    def _writer(self, name: str) -> Any:
        writer = self._writers.get(name)
        if writer is None:
            assert self._purge_step is not None
            writer = self._writers[name] = _EventFile(os.path.join(self.logdir, name), self._purge_step)
        return writer

    @hookimpl
    def jaxpipe_fit_start(self, run: Any, state: Any) -> None:
        del state  # scalars come from the run's history
        import jax

        self._close()
        self._rows = self._evals = 0
        self._purge_step = run.start_step + 1 if jax.process_index() == 0 else None
        if self._purge_step is not None:
            self._writer("train")
            if os.path.isdir(os.path.join(self.logdir, "eval")):  # hide a crashed run's later evals now
                self._writer("eval")

    def _write(self, run: Any) -> None:
        if self._purge_step is None:
            return
        for row in run.history[self._rows :]:
            for name, value in metrics_of(row).items():
                self._writer("train").scalar(name, value, int(row["step"]))
        for row in run.eval_history[self._evals :]:
            for name, value in metrics_of(row).items():
                self._writer("eval").scalar(name.removeprefix("eval_"), value, int(row["step"]))
        self._rows, self._evals = len(run.history), len(run.eval_history)

    @hookimpl(tryfirst=True)  # before a checkpoint of this call is saved: no saved step is missing from the log
    def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
        del state, metrics  # written once fit has read them back
        if len(run.history) > self._rows:
            self._write(run)
            for writer in self._writers.values():
                writer.flush()  # a run killed now and resumed from a checkpoint loses no step of its curves

    @hookimpl
    def jaxpipe_fit_epoch_end(self, run: Any, state: Any, metrics: Any) -> None:
        del state, metrics  # in run.eval_history
        self._write(run)
        for writer in self._writers.values():
            writer.flush()

    @hookimpl(tryfirst=True)  # before a slow checkpoint save: the curves are on disk whatever happens next
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        del state  # scalars come from the run's history
        self._write(run)
        self._close()

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()  # flushes
        self._writers.clear()


_EXAMPLE = "jaxpipe.TensorBoard('runs/mnist')"


def _check_logdir(logdir: Any) -> str:
    """``logdir`` as a path string: a str or path naming a directory (existing or not), never a file."""
    try:
        path = os.fspath(logdir)
    except TypeError:
        path = None
    if not isinstance(path, str):  # None, a number, or bytes (tensorboardX writes str paths)
        raise PipelineTypeError(
            f"`TensorBoard` needs `logdir`, the run's log directory, as a str or path; got "
            f"{type(logdir).__name__} {logdir!r}.\nFor example {_EXAMPLE}."
        )
    if not path:
        raise PipelineError(f"`TensorBoard` got an empty `logdir`; name the run's log directory, e.g. {_EXAMPLE}.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise PipelineError(
            f"`TensorBoard`'s `logdir` {path!r} is an existing file, not a directory; the run's "
            f"events are written in directories below it.\nName a directory, e.g. {_EXAMPLE}."
        )
    return path


def _check_installed() -> None:
    """tensorboardX writes the events; it is an optional dependency (the ``tensorboard`` extra)."""
    try:
        found = importlib.util.find_spec("tensorboardX") is not None
    except (ImportError, ValueError):  # a broken or hidden install
        found = False
    if not found:
        raise PipelineError(
            "`TensorBoard` writes its events with tensorboardX, which is not installed.\n"
            "Install it with: pip install jaxpipe[tensorboard]  (or pip install tensorboardX)."
        )


class _EventFile:
    """One new event file, written synchronously, so ``flush`` means on disk.

    (tensorboardX's ``SummaryWriter`` queues events for a thread and its
    ``flush`` does not wait for that queue.)
    """

    def __init__(self, directory: str, purge_step: int) -> None:
        _check_installed()  # still there when the run starts
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check
        from tensorboardX.summary import scalar

        directory_check(directory)
        self._event, self._summary = Event, scalar
        # named to sort after the earlier files of this directory: TensorBoard reads them in name order
        self._file = EventsWriter(os.path.join(directory, "events"), f".{time.time_ns()}")
        self._file.write_event(
            Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))
        )

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write_event(self._event(wall_time=time.time(), step=step, summary=self._summary(tag, value)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
