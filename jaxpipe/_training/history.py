"""``jaxpipe.History``: a ready-made hook that keeps a run's metrics, as Keras's ``History`` does."""

from __future__ import annotations

import itertools
from typing import Any

from jaxpipe._core.run import metrics_of
from jaxpipe.hookspecs import hookimpl


class History:
    """Keeps every step's metrics and one row per epoch, across ``fit`` calls.

    Use it as a hook (tests/test_fit_loop.py checks its rows)::

        history = jaxpipe.History()
        state = trainer.fit(state, data, epochs=3, batch_size=128, hooks=[history])
        history.as_dict()["epochs"]["loss"]  # the mean training loss of each epoch

    Attributes:
      steps: ``{"step": int, "epoch": int, **metrics}`` per step (epochs from 1).
      epochs: per epoch, ``{"epoch": int, "step": int}``, the mean of each
        training metric over the epoch's steps, and the ``eval_*`` metrics.
    """

    accepts_calls = True  # reads run.history, so one call of several steps is fine

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._run: Any = None
        self._seen = 0

    @hookimpl
    def jaxpipe_fit_start(self, run: Any, state: Any) -> None:
        del state  # rows come from run.history
        self._run, self._seen = run, 0
        # A resumed run continues the rows: drop any from a run that went past this start.
        self.steps = [row for row in self.steps if row["step"] <= run.start_step]
        self.epochs = [row for row in self.epochs if row["step"] <= run.start_step]

    @hookimpl
    def jaxpipe_fit_epoch_end(self, run: Any, state: Any, metrics: dict[str, Any]) -> None:
        del state  # only metrics are kept
        self._collect(run)
        epoch = run.step // run.steps_per_epoch if run.steps_per_epoch else len(self.epochs) + 1
        since = self.epochs[-1]["step"] if self.epochs else 0  # the steps of this epoch: after the last one's end
        rows = list(itertools.takewhile(lambda row: row["step"] > since, reversed(self.steps)))
        means = (
            {name: sum(metrics_of(row)[name] for row in rows) / len(rows) for name in metrics_of(rows[0])}
            if rows
            else {}
        )
        self.epochs.append({"epoch": epoch, "step": run.step, **means, **{k: float(v) for k, v in metrics.items()}})

    @hookimpl
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        del state  # only metrics are kept
        self._collect(run)

    def _collect(self, run: Any) -> None:
        self.steps.extend(run.history[self._seen :])
        self._seen = len(run.history)

    def as_dict(self) -> dict[str, dict[str, list[Any]]]:
        """``{"steps": {name: [values...]}, "epochs": {name: [values...]}}``, None where a row lacks a name."""
        return {"steps": _columns(self.steps), "epochs": _columns(self.epochs)}

    def __repr__(self) -> str:
        return f"History({len(self.steps)} steps, {len(self.epochs)} epochs)"


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}
