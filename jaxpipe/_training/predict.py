"""Prediction: a model's outputs in evaluation mode, from the last stage that can predict, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core import caches
from jaxpipe._core.fold import last_role
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.state import TrainState
from jaxpipe._training.checks import check_batch_size
from jaxpipe.errors import PipelineError


@caches.bounded(8)  # one compiled predictor per pipeline, not one per call
def predictor(pipe: PipelineLike) -> Callable[[TrainState, Any], Any] | None:
    """A jitted ``(state, batch) -> outputs`` from the last stage that can predict.

    A stage's ``predict`` may return None to leave prediction to an earlier one.
    """
    found = last_role(pipe, "predict", "making the prediction step")
    return jax.jit(found) if found is not None else None


def _size(data: Any, pipe: PipelineLike) -> int:
    """The number of examples: the common length of axis 0 of every array."""
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(data)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        shapes = jax.tree.map(np.shape, data)
        raise PipelineError(
            f"`predict` takes a dict of arrays with the same number of examples (at least one) along axis 0, "
            f"or one array for the model's one input; got shapes {shapes}.\n"
            f"Give e.g. trainer.predict(state, {{'image': x_test}}) or trainer.predict(state, x_test).",
            pipeline=repr(pipe),
        )
    return int(next(iter(sizes)))  # type: ignore[arg-type]


def predict(pipe: PipelineLike, state: TrainState, data: Any, batch_size: int | None = None) -> Any:
    """The model's outputs on ``data``, ``batch_size`` examples per call, concatenated; see ``Pipeline.predict``."""
    step = predictor(pipe)
    if step is None:
        raise PipelineError(
            "`predict` needs a stage that runs a model, and this pipeline has none.\n"
            "Add one, e.g. Pipeline(loss).model(module, input='image').optimize(tx).",
            pipeline=repr(pipe),
        )
    if not isinstance(data, Mapping):
        data = np.asarray(data) if not hasattr(data, "shape") else data
    size = _size(data, pipe)
    check_batch_size(batch_size, call="predict")
    batch_size = min(batch_size or size, size)
    outputs = [
        step(state, jax.tree.map(lambda x, s=start: x[s : s + batch_size], data))
        for start in range(0, size, batch_size)
    ]  # the last batch may be smaller: one more compile, no row dropped
    if len(outputs) == 1:
        return outputs[0]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)
