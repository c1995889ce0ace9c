"""Evaluation: the metrics of a state on held-out data, from the last stage that can evaluate."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe._core.fold import fold
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.stage import Stage, StageContext
from jaxpipe._core.state import TrainState
from jaxpipe._training.data import check_arrays
from jaxpipe.errors import PipelineError


@functools.lru_cache(maxsize=8)  # one compiled evaluator per pipeline, not one per epoch
def evaluator(pipe: PipelineLike) -> Callable[[TrainState, Any], dict[str, Any]] | None:
    """A jitted ``(state, batch) -> metrics`` from the last stage that can evaluate.

    A stage's ``evaluate`` may return None to leave evaluation to an earlier one.
    """
    found = None

    def note(fn: Callable[..., Any], stage: Stage, ctx: StageContext) -> Callable[..., Any]:
        nonlocal found
        training = stage.kind.training
        if training is not None and training.evaluate is not None:
            found = training.evaluate(fn, **stage.options) or found
        return stage.apply(fn)

    fold(pipe, note, pipe.fn, lambda stage, err: f"making the evaluation step of `.{stage.name}()` failed: {err}")
    return jax.jit(found) if found is not None else None


def evaluate(
    pipe: PipelineLike, state: TrainState, data: Mapping[str, Any], batch_size: int | None = None
) -> dict[str, float]:
    """Metrics of ``state`` on a dict-of-arrays data set, averaged over examples."""
    step = evaluator(pipe)
    if step is None:
        raise PipelineError(
            "this pipeline has no stage that can evaluate (a `.model(...)` stage does).",
            pipeline=repr(pipe),
        )
    size = check_arrays(data, "eval data", argument="eval_data")
    batch_size = min(batch_size or size, size)
    totals: dict[str, float] = {}
    for start in range(0, size, batch_size):
        batch = {key: np.asarray(value)[start : start + batch_size] for key, value in data.items()}
        count = next(iter(batch.values())).shape[0]
        for name, value in jax.device_get(step(state, batch)).items():
            totals[name] = totals.get(name, 0.0) + float(value) * count
    return {name: total / size for name, total in totals.items()}
