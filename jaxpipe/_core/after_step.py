"""Post-step stages: a ``Training.after_step`` role that updates the state inside each compiled step.

A stage placed after ``.optimize()`` (and before ``.scan()``/``.jit()``) may
declare ``after_step(state, new_state, **options) -> new_state``: the step
``(state, batch) -> (new_state, metrics)`` it wraps then returns
``(after_step(state, new_state, **options), metrics)``, so the update is
traced into the same program as the optimizer's, once per step. Its share of
``init`` (``Training.init``) usually puts the field it keeps into
``state.extra``. :func:`after_step_kind` makes such a kind from the hook; the
built-in ``.after_step(fn)`` and the Optax plugin's ``.ema(decay)`` are two.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from jaxpipe._core.stage import Explanation, StageContext, StageKind, Training
from jaxpipe._core.state import TrainLoss, TrainState, not_a_state
from jaxpipe.errors import PipelineError

AfterStep = Callable[..., TrainState]


def with_after_step(
    step: Callable[..., Any], hook: AfterStep, options: dict[str, Any], name: str
) -> Callable[..., Any]:
    """``step`` followed by ``hook(state, new_state, **options)`` on its new state, in the same trace."""

    def stepped(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        result = step(state, batch)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], TrainState)):
            raise PipelineError(
                f"`.{name}()` updates the state after each training step, but the function it wraps returned "
                f"{type(result).__name__}, not (state, metrics).\nPlace it after `.optimize()`: "
                f"Pipeline(loss).model(module, input='x').optimize(tx).{name}(...).jit().",
                stage_name=name,
            )
        new_state, metrics = result
        updated = hook(state, new_state, **options)
        why = not_a_state(updated)
        if why is not None:
            raise PipelineError(
                f"`.{name}()`'s after_step must return the new TrainState, got {why}.\n"
                f"Return new_state.replace(extra={{**new_state.extra, 'name': value}}).",
                stage_name=name,
            )
        return updated, metrics

    return stepped


def check_place(ctx: StageContext, name: str) -> None:
    """Inside each step: after the stage that makes the step, before those that compile or group steps."""
    late = [s.name for s in ctx.stages if s.kind.compiles or s.kind.steps_per_call is not None]
    if late:
        raise ValueError(
            f"`.{name}()` updates the state inside each training step, so it goes before `.{late[0]}()` "
            f"(after it, it would run once per call, outside the compiled step).\n"
            f"Write .optimize(tx).{name}(...).{late[0]}()."
        )
    if ctx.stages and isinstance(ctx.wrapped(), TrainLoss):
        raise ValueError(
            f"`.{name}()` updates the state after each training step, so it goes after `.optimize()`, "
            f"which makes the step.\nWrite .model(module, input='x').optimize(tx).{name}(...)."
        )


def _default_explain(hook: AfterStep) -> Callable[[StageContext, str, dict[str, Any]], Explanation]:
    hook_name = getattr(hook, "__name__", "after_step")

    def explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> Explanation:
        del ctx  # the same code wherever it is placed
        args = "".join(f", {k}={v!r}" for k, v in options.items())
        code = (
            f"def step_then_{hook_name}(state, batch):\n"
            f"    new_state, metrics = {inner}(state, batch)\n"
            f"    return {hook_name}(state, new_state{args}), metrics"
        )
        return code, f"step_then_{hook_name}"

    return explain


def after_step_kind(
    name: str,
    after_step: AfterStep,
    *,
    init: Callable[..., Any] | None = None,
    check: Callable[[StageContext, dict[str, Any]], None] | None = None,
    explain: Callable[[StageContext, str, dict[str, Any]], Explanation] | None = None,
    jax_name: str = "",
    doc: str = "",
) -> StageKind:
    """A :class:`~jaxpipe.StageKind` whose stage runs ``after_step`` inside each training step.

    Args:
      name: the stage's method name (``.ema`` for ``"ema"``).
      after_step: ``after_step(state, new_state, **options) -> new_state``,
        traced into the step after the optimizer's update; its parameters
        after the first two are the stage's options.
      init: ``init(state, key, batch, **options) -> state``, the stage's share
        of ``init`` (e.g. its field of ``state.extra``).
      check: a further check of the options, when the stage is added.
      explain: the hand-written equivalent (default: a step that calls ``after_step``).
      jax_name: the hand-written function it stands for, in errors.
      doc: help text (default: ``after_step``'s docstring).

    Examples:
      >>> import jaxpipe
      >>> def count(state, new_state):
      ...     return new_state.replace(extra={**new_state.extra, "seen": new_state.extra["seen"] + 1})
      >>> kind = jaxpipe.after_step_kind("count", count)
      >>> kind.training.after_step is count
      True
    """

    def apply(wrapped: Callable[..., Any], /, **options: Any) -> Callable[..., Any]:
        return with_after_step(wrapped, after_step, options, name)

    P = inspect.Parameter
    options = list(inspect.signature(after_step).parameters.values())[2:]
    apply.__signature__ = inspect.Signature([P("wrapped", P.POSITIONAL_ONLY), *options])  # type: ignore[attr-defined]

    def full_check(ctx: StageContext, given: dict[str, Any]) -> None:
        check_place(ctx, name)
        if check is not None:
            check(ctx, given)

    return StageKind(
        name,
        apply,
        jax_name,
        check=full_check,
        explain=explain or _default_explain(after_step),
        keeps_signature=True,
        doc=doc or inspect.getdoc(after_step) or "",
        training=Training(init=init, after_step=after_step),
    )
