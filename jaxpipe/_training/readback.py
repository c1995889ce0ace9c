"""Reading a run's metrics back: one call late, into ``run.history``, stopping at a non-finite step.

A compiled call returns its metrics as one ``[steps, metrics]`` array whose
copy to the host starts at once; the loop reads it while the next call runs.
A step whose metrics are not all finite ends the readback there: the steps
before it are kept, the rest of the call and every call queued behind it are
dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe._core.run import FitRun


@dataclasses.dataclass
class Rows:
    """One call's metrics, one row per step.

    ``device``: a compiled call's ``[capacity, len(names)]`` array (first ``n``
    rows used). ``metrics``: what a pipeline called as built returned (each
    metric with a leading axis of ``n`` when it ran several steps).
    """

    n: int
    names: list[str]
    device: jax.Array | None = None
    metrics: Mapping[str, Any] | None = None

    @classmethod
    def of_call(cls, rows: jax.Array, n: int, names: list[str]) -> Rows:
        rows.copy_to_host_async()  # fetched while the next call runs
        return cls(n, names, device=rows)

    @classmethod
    def as_returned(cls, metrics: Mapping[str, Any], n: int) -> Rows:
        return cls(n, list(metrics), metrics=metrics)

    def host(self) -> np.ndarray:
        """``[n, len(names)]`` floats: each step's metrics, a non-scalar one as its first element, NaN if any
        element is not finite (so the guard sees a NaN anywhere in a vector metric)."""
        if self.device is not None:
            return np.asarray(self.device)[: self.n]
        assert self.metrics is not None
        host = jax.device_get(dict(self.metrics))
        columns = []
        for name in self.names:
            value = np.asarray(host[name], dtype=np.float64).reshape(self.n, -1)
            first = value[:, 0] if value.shape[1] else np.full(self.n, np.nan)
            columns.append(np.where(np.isfinite(value).all(axis=1), first, np.nan))
        return np.stack(columns, axis=1) if columns else np.zeros((self.n, 0))

    def for_hooks(self, per_step: bool) -> StepMetrics:
        return StepMetrics(self, per_step)


class StepMetrics(Mapping[str, Any]):
    """A call's metrics as hooks see them: device arrays with a leading axis of the call's steps.

    ``per_step``: for a hook written when ``fit`` ran one step per call, each
    metric a scalar (the call has one step then).
    """

    def __init__(self, rows: Rows, per_step: bool) -> None:
        self._rows, self._per_step = rows, per_step

    def _all(self) -> dict[str, Any]:
        rows = self._rows
        if rows.metrics is not None:
            return dict(rows.metrics)
        assert rows.device is not None
        if self._per_step:
            return {name: rows.device[0, j] for j, name in enumerate(rows.names)}
        return {name: rows.device[: rows.n, j] for j, name in enumerate(rows.names)}

    def __getitem__(self, name: str) -> Any:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows.names)

    def __len__(self) -> int:
        return len(self._rows.names)


@dataclasses.dataclass
class PendingCall:
    """A launched call whose metrics are not read yet.

    ``replay(good)`` redoes the first ``good`` steps of an unguarded call from
    the state kept before it (see ``Loop``); ``whole``: the state can go back
    only to the call's start (a pipeline called as built runs its steps as one).
    """

    first: int
    rows: Rows
    replay: Callable[[int], None] | None = None
    whole: bool = False


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """The first non-finite step found: the state is the one after ``kept`` steps."""

    step: int  # the step that went non-finite, counted from 1
    kept: int  # steps whose state is kept
    metrics: dict[str, float]  # the non-finite metrics of that step
    call_start: bool  # the state went back to the start of its call, not to just before the step


class Readback:
    """The calls launched and not read yet, read in order into ``run.history``."""

    def __init__(self, run: FitRun, guard: bool) -> None:
        self.run, self.guard = run, guard
        self.pending: list[PendingCall] = []

    def add(self, call: PendingCall) -> None:
        self.pending.append(call)

    def read(self, keep_last: bool = False) -> NonFinite | None:
        """Moves finished calls' rows into ``run.history``; the first non-finite step, if one is found."""
        run = self.run
        take = self.pending[:-1] if keep_last else self.pending[:]
        del self.pending[: len(take)]
        for call in take:
            host = call.rows.host()
            n, names = call.rows.n, call.rows.names
            finite = np.isfinite(host).all(axis=1) if self.guard else np.ones(len(host), bool)
            good = int(np.argmin(finite)) if not finite.all() else n
            kept = 0 if good < n and call.whole else good
            for i in range(kept):
                step = call.first + i + 1
                values = {k: float(v) for k, v in zip(names, host[i], strict=True)}
                run.history.append({"step": step, "epoch": run.epoch_of(step), **values})
            if good < n:
                if call.replay is not None:  # a full call, unguarded: its state is redone up to the good steps
                    call.replay(good)
                self.pending.clear()
                bad = {k: float(v) for k, v in zip(names, host[good], strict=True) if not np.isfinite(v)}
                return NonFinite(call.first + good + 1, call.first + kept, bad, call_start=kept < good)
        return None

    def latest(self) -> dict[str, Any] | None:
        return self.run.history[-1] if self.run.history else None
