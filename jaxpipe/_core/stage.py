"""The Stage type: what a kind of stage declares, and one use of it.

A :class:`StageKind` is the recipe (a name, a function transform, how to check
its options and how to write it as JAX, and the properties generic code asks
about); a :class:`Stage` is one use of it with concrete options. The built-in
kinds are declared in ``jaxpipe/_stages/builtins.py``, plugins' kinds by their plugins.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from jaxpipe._core.format import format_options, same_value, value_hash


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage's ``check`` and ``explain`` may look at: its place in the pipeline.

    A stage asks about its neighbours by what they are (their kinds' declared
    properties, or the callable it wraps), never by the text they explain as.

    Attributes:
      fn: the pipeline's function.
      signature: the signature of the callable this stage will wrap, when it is
        known (the stages before it all keep the function's signature).
      stages: the stages before this one.
    """

    fn: Callable[..., Any]
    signature: inspect.Signature | None
    stages: tuple[Stage, ...]

    @property
    def fn_name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def wrapped(self) -> Callable[..., Any]:
        """The callable this stage wraps: the function with the stages before it applied."""
        fn = self.fn
        for stage in self.stages:
            fn = stage.apply(fn)
        return fn


Explanation = str | tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Training:
    """A training stage's share of ``init``, evaluation and a run.

    Attributes:
      init: ``init(state, key, batch, **options) -> state``, this stage's share
        of ``Pipeline.init``.
      evaluate: ``evaluate(fn, **options)`` returns ``(state, batch) -> metrics``
        for ``fit``'s eval set, where ``fn`` is the function this stage wraps;
        None leaves evaluation to an earlier stage.
      predict: ``predict(fn, **options)`` returns ``(state, batch) -> outputs``,
        the model's outputs in evaluation mode for ``Pipeline.predict``, where
        ``fn`` is the function this stage wraps; None (or a None result) leaves
        prediction to an earlier stage.
      run_hooks: ``run_hooks(options)`` returns an object with hook
        implementations registered while ``init``/``fit`` of a pipeline with
        this stage runs (e.g. a checkpoint manager).
      outside_fit: for a stage whose run hooks do its work (nothing happens when
        the step is called by hand), what to do instead; calling such a pipeline
        directly warns once with it. Empty when a direct call loses nothing.
      period: ``period(options) -> steps`` between the run hooks' own actions
        (e.g. saves every ``every`` steps), so ``fit`` ends its many-step calls
        there; None when the hooks act at any step.
      after_step: ``after_step(state, new_state, **options) -> new_state``,
        run inside each training step after the optimizer's update, for a
        stage placed after ``.optimize()`` (e.g. an EMA of the parameters in
        ``state.extra``); :func:`jaxpipe.after_step_kind` makes such a kind.
    """

    init: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    predict: Callable[..., Any] | None = None
    run_hooks: Callable[[dict[str, Any]], object] | None = None
    outside_fit: str = ""
    period: Callable[[dict[str, Any]], int] | None = None
    after_step: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class StageKind:
    """A kind of stage, such as ``jit`` or a plugin's ``clip_grads``.

    Generic code asks a kind what it is through the declared properties below,
    never by its name.

    Attributes:
      name: the method name on :class:`~jaxpipe.Pipeline` and in specs.
      apply: ``apply(fn, **options) -> fn``, the function transform.
      jax_name: the hand-written equivalent, e.g. ``"jax.jit"``; used by the
        default :attr:`explain` and in errors.
      check: ``check(context, options)``, raises ``TypeError``/``ValueError``
        with a message that says what to change; runs when the stage is added.
      explain: ``explain(context, inner, options)`` returns the equivalent JAX
        expression wrapping ``inner``, or ``(definitions, expression)`` when it
        needs helper code above the expression; ``context`` is the
        :class:`StageContext` that ``check`` sees.
      keeps_signature: the transformed function takes the same arguments.
      plugin: the registering plugin's name; ``"jaxpipe"`` for built-ins.
      doc: help text; defaults to the first paragraph of ``apply``'s docstring.
      training: the stage's share of ``init``, evaluation and runs, for
        training stages.
      last: runs the whole pipeline in its own way, so it must be the last
        stage (``debug``).
      compiles: the result is a compiled program (``jit``, ``pmap``).
      distributes: the result places its computation on devices (``pmap``,
        ``shard``, ``data_parallel``).
      keeps_program: ``apply`` returns the function unchanged: the stage acts
        only through its run hooks (``checkpoint``), so it does not change the
        compiled step and pipelines that differ only by it share one.
      steps_per_call: ``steps_per_call(options) -> int``, training batches one
        call consumes (``scan``); ``fit`` stacks that many.
    """

    name: str
    apply: Callable[..., Callable[..., Any]]
    jax_name: str = ""
    _: dataclasses.KW_ONLY
    check: Callable[[StageContext, dict[str, Any]], None] | None = None
    explain: Callable[[StageContext, str, dict[str, Any]], Explanation] | None = None
    keeps_signature: bool = False
    plugin: str = "jaxpipe"
    doc: str = ""
    training: Training | None = None
    last: bool = False
    compiles: bool = False
    distributes: bool = False
    keeps_program: bool = False
    steps_per_call: Callable[[Mapping[str, Any]], int] | None = None

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        """The options this stage takes: ``apply``'s parameters after ``fn``."""
        params = list(inspect.signature(self.apply).parameters.values())[1:]
        return inspect.Signature(params)

    @property
    def summary(self) -> str:
        text = self.doc or inspect.getdoc(self.apply) or ""
        return text.strip().split("\n\n")[0].replace("\n", " ")

    @functools.cached_property
    def _keyword_defaults(self) -> tuple[dict[str, Any], frozenset[str]]:
        """(name -> default of options passable by keyword, names without default)."""
        P = inspect.Parameter
        params = [p for p in self.signature.parameters.values() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
        return {p.name: p.default for p in params}, frozenset(p.name for p in params if p.default is P.empty)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Binds call arguments to options, dropping those equal to defaults."""
        defaults, required = self._keyword_defaults
        if not args and kwargs.keys() <= defaults.keys() and required <= kwargs.keys():
            # the common case, keywords only: the same result as Signature.bind, several times faster
            return {k: v for k, v in kwargs.items() if not same_value(v, defaults[k])}
        bound = self.signature.bind(*args, **kwargs)
        options = {}
        for name, value in bound.arguments.items():
            param = self.signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                options.update(value)
            elif param.default is inspect.Parameter.empty or not same_value(value, param.default):
                options[name] = value
        return options

    def explain_call(self, context: StageContext, inner: str, options: dict[str, Any]) -> Explanation:
        if self.explain is not None:
            return self.explain(context, inner, options)
        args = format_options(options)
        return f"{self.jax_name or self.name}({inner}{', ' + args if args else ''})"


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a pipeline: a kind and its options (defaults left out)."""

    kind: StageKind
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.kind.name

    def apply(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.kind.apply(fn, **self.options)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stage):
            return NotImplemented
        return (
            self.kind.name == other.kind.name
            and self.kind.plugin == other.kind.plugin
            and self.options.keys() == other.options.keys()
            and all(same_value(v, other.options[k]) for k, v in self.options.items())
        )

    def __hash__(self) -> int:
        return hash((self.kind.name, self.kind.plugin, value_hash(dict(self.options))))

    def __repr__(self) -> str:
        return f"{self.name}({format_options(self.options)})"
