"""Evaluation: the metrics of a state on held-out data, from the last stage that can evaluate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe._core import caches
from jaxpipe._core.fold import last_role
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.state import TrainLoss, TrainState
from jaxpipe._training import grain
from jaxpipe._training.checks import check_evaluate_args
from jaxpipe._training.data import check_arrays
from jaxpipe.errors import PipelineError


@caches.bounded(8)  # one compiled evaluator per pipeline, not one per epoch
def evaluator(pipe: PipelineLike) -> Callable[[TrainState, Any], dict[str, Any]] | None:
    """A jitted ``(state, batch) -> metrics`` from the last stage that can evaluate.

    A stage's ``evaluate`` may return None to leave evaluation to an earlier one.
    """
    found = last_role(pipe, "evaluate", "making the evaluation step")
    if found is None:
        found = _loss_evaluator(pipe.fn)
    return jax.jit(found) if found is not None else None


def _loss_evaluator(fn: Any) -> Callable[[TrainState, Any], dict[str, Any]] | None:
    """How a hand-written :class:`~jaxpipe.TrainLoss` evaluates: its ``evaluate`` method, else its eval-mode loss."""
    own = getattr(fn, "evaluate", None)
    if callable(own):
        return lambda state, batch: dict(own(state.params, batch, state.model_state))
    if isinstance(fn, TrainLoss):
        return lambda state, batch: {"loss": fn(state.params, batch, state.model_state)}
    return None


def evaluate(
    pipe: PipelineLike, state: TrainState, data: Any, batch_size: int | None = None, *, params: Any = None
) -> dict[str, float]:
    """Metrics of ``state`` on held-out data, averaged over examples.

    Args:
      pipe: the trainer (its last stage that can evaluate, e.g. ``.model``;
        or a hand-written :class:`~jaxpipe.TrainLoss`, by its ``evaluate``
        method or else its evaluation-mode loss).
      state: the state to evaluate.
      data: a dict of arrays, an iterable of batches (a list, a Grain
        dataset), or a function returning one.
      batch_size: examples per call for a dict of arrays; None: all at once.
      params: parameters to evaluate instead of ``state.params`` (e.g. an EMA).
    """
    check_evaluate_args(state, data, batch_size)
    step = evaluator(pipe)
    if step is None:
        raise PipelineError(
            "this pipeline has no stage that can evaluate (a `.model(...)` stage does, and so does a loss "
            "with an `evaluate(params, batch, model_state) -> metrics` method).",
            pipeline=repr(pipe),
        )
    if params is not None:
        state = state.replace(params=params)
    totals: dict[str, float] = {}
    size = 0
    for batch in _batches(data, batch_size):
        count = int(np.shape(jax.tree.leaves(batch)[0])[0])
        for name, value in jax.device_get(step(state, batch)).items():
            totals[name] = totals.get(name, 0.0) + float(value) * count
        size += count
    if size == 0:
        raise PipelineError("`eval_data` gave no batches; give at least one.", pipeline=repr(pipe))
    return {name: total / size for name, total in totals.items()}


def _batches(data: Any, batch_size: int | None) -> Iterator[Any]:
    if isinstance(data, Mapping):
        size = check_arrays(data, "eval data", argument="eval_data")
        step = min(batch_size or size, size)
        for start in range(0, size, step):
            yield {key: np.asarray(value)[start : start + step] for key, value in data.items()}
        return
    source = data() if callable(data) and not isinstance(data, Iterable) else data
    yield from grain.as_batches(source)
