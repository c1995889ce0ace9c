"""``FitRun``: one call of ``fit`` as hooks and callbacks see it."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any


def metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    """A ``run.history`` or ``run.eval_history`` row's metrics: all but its ``step`` and ``epoch``."""
    return {name: value for name, value in row.items() if name not in ("step", "epoch")}


@dataclasses.dataclass
class FitRun:
    """One call of ``fit``, as plugin hooks see it.

    Attributes:
      pipeline: the pipeline being trained.
      epochs: the run's total number of epochs (not a count to add).
      batch_size: examples per step (None for an iterable of batches).
      steps_per_epoch: steps in one epoch, if the data has a length.
      total_steps: the step the run ends at, if known.
      start_step: the step this call started from (after any resume).
      step: the state's step after the latest call.
      history: one row per step, ``{"step": int, "epoch": int, **metrics}``
        (epochs counted from 1), filled as ``fit`` reads metrics back.
      eval_history: one row per epoch with an eval set, ``{"step", "epoch", **eval metrics}``.
      interrupted: whether Ctrl-C, :meth:`stop` or a non-finite step ended the run early.
      keyboard_interrupt: whether Ctrl-C (or a hook's ``KeyboardInterrupt``)
        ended it: ``fit`` then re-raises ``KeyboardInterrupt`` once the end
        hooks have saved, as Python code does; :meth:`stop` (the notebook's
        Stop button) returns normally.
      error: the exception that ended the run, if any.
      error_in_step: whether ``error`` came from training itself (a failed
        compiled call, or a non-finite step under ``on_nonfinite="raise"``), so
        the state after it is not to be saved; False for an error raised by a
        callback (a hook, a progress display), which costs no checkpoint.
      resume: whether a checkpoint may be restored (``fit(..., resume=False)`` starts over).
      evaluates: whether ``fit`` was given ``eval_data`` (then
        ``jaxpipe_fit_evaluated`` follows each evaluation).
      data_state: for an iterator with ``get_state()``/``set_state()`` (Grain's),
        its JSON-able state right after the batches trained so far.
      resumed_data_state: set by a checkpointer that restored a saved
        ``data_state``; ``fit`` then calls ``set_state`` instead of skipping batches.
      per_call: what one compiled call runs, e.g. ``"20 steps, data on the device"``.
    """

    pipeline: Any
    epochs: int
    batch_size: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    start_step: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    keyboard_interrupt: bool = False
    error: BaseException | None = None
    error_in_step: bool = False
    resume: bool = True
    evaluates: bool = False
    data_state: Any = None
    resumed_data_state: Any = None
    per_call: str = ""
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def stop(self) -> None:
        """Ends training cleanly after the current call (thread-safe)."""
        self._stop.set()

    def interrupt(self) -> None:
        """Ctrl-C's rule: the first stops after the current call; a second, once a stop is asked, interrupts now."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.interrupted = self.keyboard_interrupt = True
        self.stop()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to, counted from 0 (as ``fold_in`` sees it)."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def position(self) -> dict[str, int]:
        """Where in the data the next step starts: epoch and batch within it, counted from 0."""
        per_epoch = self.steps_per_epoch or 0
        return {"epoch": self.epoch, "batch": self.step % per_epoch if per_epoch else self.step}

    def where(self, step: int) -> str:
        """``step`` (a count of steps, the n-th step) as a person reads it: "step 38 (epoch 2, batch 3 of 7)"."""
        if not self.steps_per_epoch:
            return f"step {step} (batch {step} of the data)"
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        return f"step {step} (epoch {epoch + 1}, batch {batch + 1} of {self.steps_per_epoch})"

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) that the ``step``-th step belongs to."""
        return (step - 1) // self.steps_per_epoch + 1 if self.steps_per_epoch else 1
