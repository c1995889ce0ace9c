"""What a run calls besides its steps: hooks and the progress display, in one order, with one rule for errors.

The hooks of a run are the installed plugins', the pipeline's stages' (the
checkpointer), and the objects given as ``fit(hooks=...)`` (History,
TensorBoard, EarlyStopping, the dashboard). The contract:

* During the run, a callback's exception ends it: a run's own objects raise
  (an installed plugin's hook gives one warning and is off for the run).
* The end always runs, in this order, whatever happened before: the data
  source closes, the progress display closes, then every ``jaxpipe_fit_end``
  implementation is called in turn, each whatever the others did. So a raising
  hook or display never costs the checkpoint of the steps already trained.
* Then ``fit`` raises, in this order of precedence: the training error (a
  failed call, a non-finite step), else the first callback error (later ones
  as notes on it), else ``KeyboardInterrupt`` if Ctrl-C ended the run.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from jaxpipe._core.run import FitRun
from jaxpipe._core.state import TrainState, not_a_state
from jaxpipe._plugins.manager import first_result, installed_plugins
from jaxpipe.errors import PipelineError


def is_display(value: Any) -> str | None:
    missing = [name for name in ("update", "close") if not callable(getattr(value, name, None))]
    return f"a {type(value).__name__} without {', '.join(missing)}()" if missing else None


def is_shard_count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"{value!r}, not a positive int"


class Callbacks:
    """The hook relay of one run, asked through the contract above."""

    def __init__(self, hook: Any, run: FitRun, own: tuple[object, ...]) -> None:
        self.hook, self.run, self.own = hook, run, own
        self.errors: list[BaseException] = []

    # --- before the first step -------------------------------------------------------------

    def resume(self, state: TrainState) -> TrainState | None:
        return first_result(self.hook.jaxpipe_fit_resume, not_a_state, run=self.run, state=state)

    def place_state(self, state: TrainState) -> TrainState | None:
        return first_result(self.hook.jaxpipe_place_state, not_a_state, pipeline=self.run.pipeline, state=state)

    def batch_shards(self) -> int:
        """How many devices share each batch (a ``.data_parallel`` stage's batch axis), as the hooks say."""
        return first_result(self.hook.jaxpipe_batch_shards, is_shard_count, run=self.run) or 1

    def display(self, progress: bool | Callable[..., Any]) -> tuple[Any, bool]:
        """The progress display and whether ``fit`` made it itself (then it prints the steps-per-call line)."""
        run = self.run
        if progress is True:
            supplied = first_result(self.hook.jaxpipe_fit_progress, is_display, run=run)  # e.g. the dashboard
            if supplied is not None:
                return supplied, False
        if callable(progress):
            bar = progress(total=run.total_steps, initial=run.step)
            problem = is_display(bar)
            if problem is not None:
                raise PipelineError(
                    f"`progress` returned {problem}; it must return a tqdm-like display.\n"
                    f"Pass e.g. progress=functools.partial(tqdm.tqdm, unit='step'), or progress=False.",
                    pipeline=repr(run.pipeline),
                )
            return bar, True
        from tqdm.auto import tqdm  # only when a run shows progress

        bar = tqdm(total=run.total_steps, initial=run.step, unit="step", disable=not progress, dynamic_ncols=True)
        return bar, True

    def wants_every_step(self) -> bool:
        """Whether a ``jaxpipe_fit_step`` of a plugin or of ``hooks=`` expects to run after every step.

        Such a hook (written when ``fit`` ran one step per call) keeps one step
        per call, unless it says ``accepts_calls = True``: it handles a call of
        several steps (``run.step`` advanced by k, metrics with a leading axis
        of k). A stage's own hooks (the checkpointer) are fine: calls end on
        its period.
        """
        asked = {id(obj) for obj in [*installed_plugins(), *self.own]}
        for impl in self.hook.jaxpipe_fit_step.get_hookimpls():
            obj = getattr(impl.plugin, "obj", impl.plugin)  # the object itself, as the plugin manager wraps it
            if id(obj) in asked and not getattr(obj, "accepts_calls", False):
                return True
        return False

    # --- during the run ----------------------------------------------------------------------

    def start(self, state: TrainState) -> None:
        self.hook.jaxpipe_fit_start(run=self.run, state=state)

    def has_step_hooks(self) -> bool:
        return bool(self.hook.jaxpipe_fit_step.get_hookimpls())

    def step(self, state: TrainState, metrics: Any) -> None:
        self.hook.jaxpipe_fit_step(run=self.run, state=state, metrics=metrics)

    def evaluated(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.hook.jaxpipe_fit_evaluated(run=self.run, state=state, metrics=metrics)

    def epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.hook.jaxpipe_fit_epoch_end(run=self.run, state=state, metrics=metrics)

    # --- the end -----------------------------------------------------------------------------

    def finish(self, closers: list[Callable[[], Any]], state: Callable[[], TrainState]) -> None:
        """Runs every end action (see the module's contract), keeping the errors for :meth:`outcome`."""
        for close in closers:
            self._guarded(close)
        final = state()
        caller = self.hook.jaxpipe_fit_end
        impls = caller.get_hookimpls()
        if any(impl.wrapper or impl.hookwrapper for impl in impls):  # a wrapper sees the call as a whole
            self._guarded(lambda: caller(run=self.run, state=final))
            return
        kwargs = {"run": self.run, "state": final}
        for impl in reversed(impls):  # pluggy's call order, each whatever the others did
            self._guarded(functools.partial(impl.function, *[kwargs[name] for name in impl.argnames]))

    def _guarded(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except BaseException as err:  # kept and raised after every end action has run
            self.errors.append(err)

    def raise_outcome(self, training_error: BaseException | None, state: Callable[[], TrainState]) -> None:
        """Raises what the run ended with, by the contract's precedence; returns if it ended well."""
        first = training_error or (self.errors[0] if self.errors else None)
        for later in self.errors:
            if later is not first:
                first.add_note(f"also raised at the end of fit: {type(later).__name__}: {later}")  # type: ignore[union-attr]
        if training_error is not None:
            return  # the caller re-raises it with its own traceback
        if first is not None:
            raise first
        if self.run.keyboard_interrupt:
            interrupted = KeyboardInterrupt(f"fit was interrupted at step {self.run.step}; the end hooks have run")
            interrupted.state = state()  # type: ignore[attr-defined]  # the state it stopped at, to go on from
            raise interrupted


@contextlib.contextmanager
def graceful_interrupt(run: FitRun) -> Iterator[None]:
    """First Ctrl-C: stop after the current call. Second: interrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        del signum, frame  # any SIGINT
        run.interrupt()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
