"""How many training batches one call of a pipeline consumes (``.scan(k)`` stacks k)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from jaxpipe._core.protocol import PipelineLike

_fit_calls: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxpipe_fit_calls", default=False)


@contextlib.contextmanager
def fit_calls() -> Iterator[None]:
    """Inside: ``fit`` calls the pipeline with batches it stacked itself, so a group may hold fewer than k."""
    token = _fit_calls.set(True)
    try:
        yield
    finally:
        _fit_calls.reset(token)


def in_fit_call() -> bool:
    """Whether this call of the pipeline is ``fit``'s own (see :func:`fit_calls`)."""
    return _fit_calls.get()


def stacks_batches(pipe: PipelineLike) -> bool:
    """Whether a call of ``pipe`` takes stacked batches (a stage such as ``.scan(k)`` runs several steps)."""
    return any(stage.kind.steps_per_call is not None for stage in pipe.stages)


def scan_steps(pipe: PipelineLike) -> int:
    """Batches per call: the product of the stages' declared ``steps_per_call``, else 1."""
    steps = 1
    for stage in pipe.stages:
        if stage.kind.steps_per_call is not None:
            steps *= stage.kind.steps_per_call(stage.options)
    return steps
