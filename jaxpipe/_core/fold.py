"""The one walk over a pipeline's stages: in call order, numbered from 1, errors placed at their stage.

``build``, ``explain``, ``init``, ``fit``'s evaluator, the error advice and the
sharding hooks all walk the stages through :func:`fold`, so a stage's error
reads the same wherever it happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jaxpipe._core.signature import signature_of
from jaxpipe._core.stage import Stage, StageContext
from jaxpipe.errors import PipelineError, error_type

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike

T = TypeVar("T")


def context(fn: Callable[..., Any], before: tuple[Stage, ...]) -> StageContext:
    """What a stage placed after ``before`` sees: the signature when every stage before keeps it."""
    keeps = all(stage.kind.keeps_signature for stage in before)
    return StageContext(fn, signature_of(fn) if keeps else None, before)


def fold(
    pipe: PipelineLike,
    step: Callable[[T, Stage, StageContext], T],
    initial: T,
    failed: Callable[[Stage, Exception], str],
) -> T:
    """``step(acc, stage, context)`` over the stages in call order, from ``initial``.

    A stage's own :class:`~jaxpipe.PipelineError` is placed at that stage
    (:meth:`~jaxpipe.PipelineError.at`); any other exception becomes one whose
    message is ``failed(stage, err)``, of the same builtin kind
    (:func:`~jaxpipe.errors.error_type`), with the original chained.
    """
    __tracebackhide__ = True
    acc = initial
    stages = pipe.stages
    for number, stage in enumerate(stages, 1):
        try:
            acc = step(acc, stage, context(pipe.fn, stages[: number - 1]))
        except PipelineError as err:
            if err.stage is not None:
                raise
            raise err.at(number, stage, pipe) from err
        except Exception as err:
            raise error_type(err)(failed(stage, err)).at(number, stage, pipe) from err  # a TypeError stays one
    return acc


def rejected(stage: Stage, err: Exception) -> str:
    return f"`{stage.kind.jax_name or stage.name}` rejected its options {stage!r}: {err}"


def build(pipe: PipelineLike) -> Callable[..., Any]:
    """The composed callable: each stage's ``apply`` around the one before (no sharing; see ``Pipeline.build``)."""
    return fold(pipe, lambda fn, stage, ctx: stage.apply(fn), pipe.fn, rejected)


def explain(pipe: PipelineLike) -> str:
    """The equivalent hand-written JAX: each stage's ``explain`` around the expression so far."""
    definitions: list[str] = []

    def wrap(expression: str, stage: Stage, ctx: StageContext) -> str:
        result = stage.kind.explain_call(ctx, expression, dict(stage.options))
        if isinstance(result, tuple):
            code, expression = result
            definitions.append(code)
            return expression
        return result

    expression = fold(pipe, wrap, pipe.name, lambda stage, err: f"explaining `.{stage.name}()` failed: {err}")
    return "\n\n".join([*definitions, expression])


def last_role(pipe: PipelineLike, role: str, doing: str) -> Callable[..., Any] | None:
    """What the last training stage with role ``role`` (``"evaluate"``, ``"predict"``) makes of the function it wraps.

    Each such stage's ``Training.<role>(fn, **options)`` is given the function
    as the stages before it left it; one may return None to leave the role to
    an earlier stage. ``doing`` names the work in errors ("making the
    evaluation step").
    """
    found: Callable[..., Any] | None = None

    def note(fn: Callable[..., Any], stage: Stage, ctx: StageContext) -> Callable[..., Any]:
        nonlocal found
        make = getattr(stage.kind.training, role, None)
        if make is not None:
            found = make(fn, **stage.options) or found
        return stage.apply(fn)

    fold(pipe, note, pipe.fn, lambda stage, err: f"{doing} of `.{stage.name}()` failed: {err}")
    return found
