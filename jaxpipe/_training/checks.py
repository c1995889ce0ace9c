"""Argument checks of ``init``, ``fit`` and ``evaluate``: each mistake a PipelineError naming the argument.

Each check says which argument is wrong, what was given, and a correct call.
A wrong type is a :class:`~jaxpipe.errors.PipelineTypeError` (also a
``TypeError``), a wrong value a plain :class:`~jaxpipe.PipelineError` (a
``ValueError``), as Python's own argument errors are.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe.errors import PipelineError, PipelineTypeError

_CALLS = {"fit": "trainer.fit(state, data, ", "evaluate": "jaxpipe.evaluate(trainer, state, data, "}
_TEXT_KINDS = {"O": "object", "U": "str", "S": "bytes", "V": "void"}  # NumPy dtype kinds JAX cannot hold


def _call_of(call: str) -> str:
    """The start of a correct call of ``call``, up to its options."""
    return _CALLS.get(call, f"trainer.{call}(state, ")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_state(state: Any, *, call: str = "fit") -> None:
    """``state`` is a training state whose ``step`` is a non-negative integer (``call``: the function checked).

    Call it first in ``fit`` (``check_state(state)``) and on any state a run
    resumes from; ``init`` makes its states itself.
    """
    if state is None or not hasattr(state, "step") or not hasattr(state, "params"):
        raise PipelineTypeError(
            f"`{call}` needs the training state as `state`, got {_shown(state)}.\n"
            f"Make it with `init`: state = trainer.init(jax.random.key(0), sample_batch); "
            f"then {_call_of(call)}...)."
        )
    step = state.step
    dtype = getattr(step, "dtype", None)
    integral = np.issubdtype(dtype, np.integer) if dtype is not None else isinstance(step, int)
    if isinstance(step, bool) or not integral or np.ndim(step) != 0:
        raise PipelineTypeError(
            f"`state.step` must be a scalar integer (the number of steps taken), got {_shown(step)}"
            f"{f' of dtype {dtype}' if dtype is not None else ''}.\n"
            f"Keep the step `init` made, or set an int: state = state.replace(step=jnp.asarray(100, jnp.int32))."
        )
    if isinstance(step, jax.core.Tracer):  # inside a trace: the value is unknown here
        return
    if int(step) < 0:
        raise PipelineError(
            f"`state.step` must be 0 or more (the number of steps taken), got {int(step)}.\n"
            f"Start from the state `init` made (step 0), or state.replace(step=jnp.asarray(0, jnp.int32))."
        )


def check_batch_dtypes(batch: Any, *, argument: str = "data") -> None:
    """Every leaf of ``batch`` is numeric: no Python strings, no string, bytes or object arrays.

    JAX arrays hold numbers only, so a column of labels such as ``'cat'`` must
    be encoded as ints first. Call it on ``fit``'s and ``evaluate``'s data and
    on ``init``'s sample batch (``argument``: the argument's name in the message).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        where = f"{argument}{jax.tree_util.keystr(path)}"
        if isinstance(leaf, (str, bytes)):
            found = f"a {type(leaf).__name__} {leaf!r}"
        else:
            dtype = getattr(leaf, "dtype", None)
            kind = getattr(dtype, "kind", None)
            if kind not in _TEXT_KINDS:
                continue
            found = f"an array of dtype {dtype} ({_TEXT_KINDS[kind]} values)"
        raise PipelineTypeError(
            f"`{where}` is {found}; JAX arrays hold numbers only.\n"
            f"Encode it as ints first, e.g. classes, codes = np.unique(labels, return_inverse=True), "
            f"then pass codes.astype(np.int32) as `{where}`."
        )


def check_batch_size(batch_size: Any, *, argument: str = "batch_size", call: str = "evaluate") -> None:
    """``batch_size`` is None or a positive int (NumPy ints too), not a float, a str or a bool."""
    if batch_size is None:
        return
    try:
        size = None if isinstance(batch_size, bool) else operator.index(batch_size)
    except TypeError:
        size = None
    if size is None:
        raise PipelineTypeError(
            f"`{argument}` must be a positive int or None, got {_shown(batch_size)}.\n"
            f"Give a whole number of examples per call, e.g. {_call_of(call)}{argument}=256)."
        )
    if size < 1:
        raise PipelineError(
            f"`{argument}` must be a positive int or None, got {size}.\n"
            f"Give a whole number of examples per call, e.g. {_call_of(call)}{argument}=256)."
        )


def check_evaluate_args(state: Any, data: Any, batch_size: Any) -> None:
    """``evaluate(pipe, state, data, batch_size)``'s arguments; called first in ``evaluate``."""
    check_state(state, call="evaluate")
    example = "For example jaxpipe.evaluate(trainer, state, {'image': x_test, 'label': y_test}, batch_size=256)."
    if data is None or isinstance(data, (str, bytes)) or not (isinstance(data, (Mapping, Iterable)) or callable(data)):
        raise PipelineTypeError(
            f"`evaluate` needs `data` as a dict of arrays (one row per example), an iterable of batches or a "
            f"function returning one, got {_shown(data)}.\n{example}"
        )
    if isinstance(data, (list, tuple)) and data and all(hasattr(x, "shape") for x in data):
        raise PipelineTypeError(
            f"`evaluate` needs `data` as a dict of arrays, got {type(data).__name__} of {len(data)} arrays "
            f"(a list is read as batches, so each array would be a batch of its own).\n"
            f"Put the arrays in a dict, named as the loss reads them: {{'image': X, 'label': Y}}. {example}"
        )
    if isinstance(data, Mapping):
        check_batch_dtypes(data)
    check_batch_size(batch_size)
