"""A run's plan: every argument of ``fit`` checked once, and the sizes the loop needs.

Each error names the argument, what was given and a correct call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.state import TrainState
from jaxpipe._training import checks
from jaxpipe._training import data as host_data
from jaxpipe.errors import PipelineError

ON_NONFINITE = ("raise", "stop", "ignore")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains on and how, after every check.

    Attributes:
      epochs: the run's total of epochs (from ``steps`` when steps are given).
      total: the step the run ends at, if known.
      steps_per_epoch: steps in one pass over the data, if it has a length.
      eval_data: evaluated at ``eval_every`` steps, or at each epoch's end.
      eval_every: steps between evaluations; None: at the end of each epoch.
      eval_params: ``eval_params(state)``, the parameters to evaluate; None: ``state.params``.
      steps_per_call: steps per compiled call, or None to measure (``fit``'s own choice).
    """

    data: Any
    batch_size: int | None
    epochs: int
    total: int | None
    steps_per_epoch: int | None
    eval_data: Any
    eval_batch_size: int | None
    eval_every: int | None
    eval_params: Callable[[TrainState], Any] | None
    log_every: int
    device_data: bool | str
    on_nonfinite: str
    steps_per_call: int | None
    hooks: tuple[object, ...]

    @property
    def guard(self) -> bool:
        return self.on_nonfinite != "ignore"


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def make_plan(
    pipe: PipelineLike,
    state: Any,
    data: Any,
    *,
    epochs: Any,
    steps: Any,
    batch_size: Any,
    eval_data: Any,
    eval_batch_size: Any,
    eval_every: Any,
    eval_params: Any,
    log_every: Any,
    hooks: Any,
    device_data: Any,
    on_nonfinite: Any,
    steps_per_call: Any,
) -> Plan:
    """Checks every argument; the run's sizes."""
    where: dict[str, Any] = {"pipeline": repr(pipe)}

    def fail(message: str) -> PipelineError:
        return PipelineError(message, **where)

    if not isinstance(state, TrainState):
        raise fail(
            f"`fit` needs the TrainState from `init`, got {type(state).__name__}.\n"
            f"Call state = trainer.init(jax.random.key(0), sample_batch) first."
        )
    checks.check_state(state)
    if steps is not None and epochs is not None:
        raise fail(
            f"`fit` takes `epochs` or `steps`, not both (got epochs={epochs!r}, steps={steps!r}).\n"
            f"For example trainer.fit(state, data, steps=300, batch_size=128)."
        )
    if epochs is not None and not positive_int(epochs):
        raise fail(f"`epochs` must be a positive int, got {epochs!r}.\nFor example epochs=10.")
    if steps is not None and not positive_int(steps):
        raise fail(f"`steps` must be a positive int, got {steps!r}.\nFor example steps=300.")
    for name, value, example, optional in (
        ("log_every", log_every, 10, False),
        ("eval_batch_size", eval_batch_size, 256, True),
        ("eval_every", eval_every, 100, True),
        ("steps_per_call", steps_per_call, 1, True),
    ):
        if not (positive_int(value) or (optional and value is None)):
            raise fail(
                f"`{name}` must be a positive int{' or None' if optional else ''}, got {value!r}.\n"
                f"For example {name}={example}."
            )
    if device_data not in (True, False, "auto"):
        raise fail(f'`device_data` must be True, False or "auto", got {device_data!r}.')
    if on_nonfinite not in ON_NONFINITE:
        raise fail(
            f'`on_nonfinite` must be "raise", "stop" or "ignore", got {on_nonfinite!r}.\n'
            f'For example on_nonfinite="stop" returns the last finite state with a warning.'
        )
    hooks = _check_hooks(hooks, fail)
    if eval_params is not None and not callable(eval_params):
        raise fail(
            f"`eval_params` is a function of the state that returns the parameters to evaluate, got "
            f"{type(eval_params).__name__}.\nFor example eval_params=lambda state: state.extra['ema_params']."
        )
    eval_data = _check_eval_data(eval_data, fail)
    try:
        host_data.check_data(data)
    except PipelineError as err:
        raise fail(err.detail) from None
    if isinstance(data, Mapping):
        try:
            size = host_data.check_arrays(data, "training data")
        except PipelineError as err:
            raise fail(err.detail) from None
        checks.check_batch_dtypes(data)
        if not positive_int(batch_size) or batch_size > size:
            raise fail(
                f"`fit` on a dict of arrays needs `batch_size`, an int from 1 to the {size} examples in "
                f"the data; got {batch_size!r}.\nFor example batch_size={min(128, size)}."
            )
        steps_per_epoch: int | None = size // batch_size
    else:
        if device_data is True:
            raise fail(
                "`device_data=True` puts a dict of arrays on the device, but `data` is an iterable of batches "
                "(streamed from the host a call ahead).\nPass the arrays as a dict, or leave device_data out."
            )
        if batch_size is not None:
            if not positive_int(batch_size):
                raise fail(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
            data = host_data.collated(data, batch_size)  # an iterable of examples, batched here
        else:
            host_data.check_not_examples(data)
        steps_per_epoch = len(data) if hasattr(data, "__len__") else None
        if steps_per_epoch == 0:
            raise fail(
                f"`data` has no batches (an empty {type(data).__name__}).\n"
                f"Give at least one batch, e.g. trainer.fit(state, [batch], epochs=1)."
            )
    if steps is not None:
        total: int | None = steps
        epochs = math.ceil(steps / steps_per_epoch) if steps_per_epoch else 1
    else:
        epochs = 1 if epochs is None else epochs
        total = epochs * steps_per_epoch if steps_per_epoch is not None else None
    return Plan(
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        total=total,
        steps_per_epoch=steps_per_epoch,
        eval_data=eval_data,
        eval_batch_size=eval_batch_size,
        eval_every=eval_every,
        eval_params=eval_params,
        log_every=log_every,
        device_data=device_data,
        on_nonfinite=on_nonfinite,
        steps_per_call=steps_per_call,
        hooks=hooks,
    )


def _check_hooks(hooks: Any, fail: Callable[[str], PipelineError]) -> tuple[object, ...]:
    example = "For example hooks=[jaxpipe.History()]."
    if hooks is None or isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
        raise fail(f"`hooks` must be a list of hook objects, got {type(hooks).__name__} {hooks!r:.60}.\n{example}")
    hooks = tuple(hooks)
    for obj in hooks:
        if isinstance(obj, type):
            raise fail(f"`hooks` holds the class {obj.__name__}, not an object of it.\nPass {obj.__name__}().")
        if obj is None or isinstance(obj, (str, bytes, int, float)):
            raise fail(f"`hooks` holds {obj!r}, not an object with @jaxpipe.hookimpl methods.\n{example}")
    return hooks


def _check_eval_data(eval_data: Any, fail: Callable[[str], PipelineError]) -> Any:
    """A dict of arrays, a re-iterable of batches, a function returning one, or a Grain dataset."""
    if eval_data is None:
        return None
    if isinstance(eval_data, Mapping):
        try:
            host_data.check_arrays(eval_data, "eval data", argument="eval_data")
        except PipelineError as err:
            raise fail(err.detail) from None
        checks.check_batch_dtypes(eval_data, argument="eval_data")
        return eval_data
    if callable(eval_data) or isinstance(eval_data, Iterable) and not isinstance(eval_data, (str, bytes)):
        if iter(eval_data) is eval_data if not callable(eval_data) else False:
            raise fail(
                "`eval_data` is an iterator, which one evaluation would use up.\n"
                "Give a list of batches, a Grain dataset, or a function that returns a fresh iterator: "
                "eval_data=lambda: iter(test_batches)."
            )
        return eval_data
    raise fail(
        f"`eval_data` must be a dict of arrays, an iterable of batches or a function returning one, "
        f"got {type(eval_data).__name__}.\nGive e.g. eval_data={{'image': x_test, 'label': y_test}}."
    )
