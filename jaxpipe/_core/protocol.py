"""``PipelineLike``: what the layers below ``Pipeline`` may ask of one, so none of them imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from jaxpipe._core.stage import Stage


@runtime_checkable
class PipelineLike(Protocol):
    """A function and its stages in call order; ``jaxpipe.Pipeline`` is the one implementation.

    Lower layers (the fold, training, tools) type against this protocol, so
    the package's imports only go down: ``_pipeline`` imports them, never the
    other way round.
    """

    @property
    def fn(self) -> Callable[..., Any]: ...

    @property
    def name(self) -> str: ...

    @property
    def stages(self) -> tuple[Stage, ...]: ...

    def build(self) -> Callable[..., Any]: ...

    def explain(self) -> str: ...

    def with_fn(self, fn: Callable[..., Any]) -> PipelineLike: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __hash__(self) -> int: ...  # equal pipelines share caches (builds, compiled programs)
