"""``jaxpipe.EarlyStopping``: ends a run when an eval metric stops improving, as Keras's callback does."""

from __future__ import annotations

import math
from typing import Any

from jaxpipe.errors import PipelineError
from jaxpipe.hookspecs import hookimpl


class EarlyStopping:
    """Stops ``fit`` after ``patience`` evaluations without improvement of ``monitor``.

    A callback for ``fit(..., hooks=[...])``; it reads the metrics of each
    evaluation (each epoch's end, or every ``eval_every`` steps)::

        stopper = jaxpipe.EarlyStopping(monitor="eval_loss", patience=3)
        state = trainer.fit(state, data, epochs=50, batch_size=128, eval_data=test, hooks=[stopper])
        stopper.best, stopper.best_step  # the best value seen and the step it was seen at

    The run ends as the dashboard's Stop ends it (``fit`` returns normally, a
    ``.checkpoint()`` stage saves the last state); keep the best state itself
    with ``.checkpoint(dir, best="eval_loss")``.

    Args:
      monitor: an eval metric, named as ``fit`` reports it (``eval_loss``, ``eval_accuracy``).
      patience: evaluations without improvement before stopping.
      mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      min_delta: the least change that counts as an improvement.
    """

    accepts_calls = True

    def __init__(self, monitor: str = "eval_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise PipelineError(f'`mode` must be "min" or "max", got {mode!r}; e.g. EarlyStopping(mode="max").')
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise PipelineError(f"`patience` must be a positive int, got {patience!r}; e.g. patience=3.")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise PipelineError(f"`min_delta` must be a number >= 0, got {min_delta!r}; e.g. min_delta=1e-3.")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, float(min_delta)
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.waited = 0
        self.stopped_at: int | None = None

    @hookimpl
    def jaxpipe_fit_evaluated(self, run: Any, state: Any, metrics: dict[str, float]) -> None:
        del state  # the metrics decide
        if self.monitor not in metrics:
            raise PipelineError(
                f"EarlyStopping monitors `{self.monitor}`, but the evaluation reported {sorted(metrics)}.\n"
                f"Monitor one of them, e.g. EarlyStopping(monitor={sorted(metrics)[0]!r})."
            )
        value = metrics[self.monitor]
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.best_step, self.waited = value, run.step, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.stopped_at = run.step
            run.stop()
