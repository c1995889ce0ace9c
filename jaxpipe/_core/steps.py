"""How many training batches one call of a pipeline consumes (``.scan(k)`` stacks k)."""

from __future__ import annotations

from jaxpipe._core.protocol import PipelineLike


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
