"""Public exception classes.

Every message says what went wrong, where (the stage, numbered from 1 as in
``explain()``), and how to fix it; the original JAX exception stays chained as
``__cause__``.
"""

from __future__ import annotations

import copy
from typing import Any


class PipelineError(ValueError):
    """A pipeline was given bad input, or JAX rejected it at call time.

    Attributes:
      stage: the 1-based number of the stage at fault, or ``None`` when the
        problem is not tied to one stage.
      stage_name: that stage's name (``"vmap"``), or ``None``.
      pipeline: the pipeline's fluent form, e.g. ``"Pipeline(loss).grad().jit()"``.

    Examples:
      Failing::

          Pipeline(loss).grad().vmap(in_axes=(None, 0, 0))   # loss takes 2 args

      raises ``PipelineError: stage 2 (vmap) of Pipeline(loss).grad(): in_axes
      has 3 entries but `loss` takes 2 positional arguments...``; fixed::

          Pipeline(loss).grad().vmap(in_axes=(None, 0))
    """

    def __init__(
        self,
        message: str,
        *,
        stage: int | None = None,
        stage_name: str | None = None,
        pipeline: str | None = None,
    ) -> None:
        self.stage = stage
        self.stage_name = stage_name
        self.pipeline = pipeline
        self.detail = message
        super().__init__(_located(message, stage, stage_name, pipeline))

    def at(self, number: int, stage: Any, pipeline: object) -> PipelineError:
        """A copy of this error placed at stage ``number`` of ``pipeline``.

        A stage raises its errors knowing only its own name; the walk over the
        stages knows the number and the pipeline, and places them here.

        Args:
          number: the stage's 1-based number.
          stage: the stage (anything with a ``name``) or its name.
          pipeline: the pipeline, or its fluent form as a string.
        """
        located = copy.copy(self)  # keeps the subclass and its own attributes (e.g. PluginError.plugins)
        located.stage = number
        located.stage_name = stage if isinstance(stage, str) else stage.name
        located.pipeline = pipeline if isinstance(pipeline, str) else repr(pipeline)
        located.args = (_located(self.detail, located.stage, located.stage_name, located.pipeline),)
        return located

    def within(self, pipeline: Any) -> PipelineError:
        """This error placed at the first stage of ``pipeline`` named ``stage_name``; itself if none or placed.

        For a stage (or its run hooks) that raises knowing only its own name.
        """
        if self.stage is not None or self.stage_name is None:
            return self
        number = next((n for n, stage in enumerate(pipeline.stages, 1) if stage.name == self.stage_name), None)
        return self if number is None else self.at(number, self.stage_name, pipeline)


def _located(message: str, stage: int | None, stage_name: str | None, pipeline: str | None) -> str:
    where = []
    if stage is not None:
        where.append(f"stage {stage} ({stage_name})")
    if pipeline is not None:
        where.append(f"of {pipeline}" if where else f"in {pipeline}")
    return f"{' '.join(where)}:\n{message}" if where else message


class PipelineTypeError(PipelineError, TypeError):
    """A :class:`PipelineError` for a mistake that JAX reports as a ``TypeError``.

    Also a ``TypeError`` (and, as every PipelineError, a ``ValueError``), so
    ``except TypeError`` written against JAX keeps working:
    ``Pipeline(3).jit()`` raises it where ``jax.jit(3)`` raises ``TypeError``,
    as do an ``in_axes`` of the wrong type, a generator function or a
    ``staticmethod`` object given to a transform, and an unknown option.

    Examples:
      Failing::

          Pipeline(loss).vmap(in_axes="batch")   # jax.vmap: TypeError

      fixed::

          Pipeline(loss).vmap(in_axes=(None, 0))
    """


class PipelineIndexError(PipelineError, IndexError):
    """A :class:`PipelineError` for a mistake that JAX reports as an ``IndexError``.

    E.g. a traced slice bound (``x[:n]`` under ``jit``); also an ``IndexError``.
    """


def error_type(cause: BaseException | type[BaseException]) -> type[PipelineError]:
    """The PipelineError class to raise for ``cause``: one that is also ``cause``'s builtin kind.

    An error that explains or replaces a ``TypeError`` (JAX's, or a check's)
    is a :class:`PipelineTypeError`, so code that catches what JAX raises
    still catches it; a ``ValueError`` or anything else a plain PipelineError.
    """
    kind = cause if isinstance(cause, type) else type(cause)
    if issubclass(kind, TypeError):
        return PipelineTypeError
    if issubclass(kind, IndexError):
        return PipelineIndexError
    return PipelineError


class UnknownStageError(PipelineError, AttributeError):
    """A stage name that no built-in and no loaded plugin provides.

    Also an ``AttributeError`` so that ``hasattr`` and tab completion behave.
    """


class PluginError(PipelineError):
    """A plugin conflicts with another plugin or breaks the plugin contract.

    Attributes:
      plugins: the names of the plugins involved.
    """

    def __init__(self, message: str, *, plugins: tuple[str, ...] = (), **where: Any) -> None:
        self.plugins = plugins
        super().__init__(message, **where)


class PluginWarning(UserWarning):
    """A plugin failed to load or its hook raised; it was skipped."""


class NonFiniteError(PipelineError):
    """A training step gave a metric (loss, grad norm, ...) that is NaN or infinite.

    ``fit(..., on_nonfinite="raise")`` ends the run with it; nothing later than
    the last finite state is kept or checkpointed.

    Attributes:
      state: the training state from before the non-finite step (or from
        before the call that held it, for a pipeline ``fit`` calls as built),
        to inspect or to train on from with a lower learning rate.
      step: the non-finite step, counted from 1.
    """

    def __init__(self, message: str, *, state: Any, step: int, **where: Any) -> None:
        self.state = state
        self.step = step
        super().__init__(message, **where)
