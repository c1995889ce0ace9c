"""The Stage type and the built-in JAX stages.

A :class:`StageKind` is the recipe (a name, a function transform, how to check
its options and how to write it as JAX); a :class:`Stage` is one use of it with
concrete options. Built-in kinds use the JAX function itself as the transform,
so a stage's options are exactly that function's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxpipe import _sharding
from jaxpipe._format import format_options, format_signature, same_value, value_hash


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage's ``check`` may look at when the stage is added.

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


Explanation = str | tuple[str, str]


@dataclasses.dataclass(frozen=True, eq=False)
class StageKind:
    """A kind of stage, such as ``jit`` or a plugin's ``clip_grads``.

    Attributes:
      name: the method name on :class:`~jaxpipe.Pipeline` and in specs.
      apply: ``apply(fn, **options) -> fn``, the function transform.
      jax_name: the hand-written equivalent, e.g. ``"jax.jit"``; used by the
        default :attr:`explain`.
      check: ``check(context, options)``, raises ``TypeError``/``ValueError``
        with a message that says what to change; runs when the stage is added.
      explain: ``explain(inner, options)`` returns the equivalent JAX expression
        wrapping ``inner``, or ``(definitions, expression)`` when it needs
        helper code above the expression.
      keeps_signature: the transformed function takes the same arguments.
      init: training stages only: ``init(state, key, batch, **options) ->
        state``, this stage's share of ``Pipeline.init``.
      evaluate: training stages only: ``evaluate(fn, **options)`` returns
        ``(state, batch) -> metrics`` for ``fit``'s eval set, where ``fn`` is
        the function this stage wraps.
      run_hooks: ``run_hooks(options)`` returns an object with hook
        implementations registered while ``init``/``fit`` of a pipeline with
        this stage runs (e.g. a checkpoint manager).
      plugin: the registering plugin's name; ``"jaxpipe"`` for built-ins.
      doc: help text; defaults to the first paragraph of ``apply``'s docstring.
    """

    name: str
    apply: Callable[..., Callable[..., Any]]
    jax_name: str = ""
    check: Callable[[StageContext, dict[str, Any]], None] | None = None
    explain: Callable[[str, dict[str, Any]], Explanation] | None = None
    keeps_signature: bool = False
    init: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    run_hooks: Callable[[dict[str, Any]], object] | None = None
    plugin: str = "jaxpipe"
    doc: str = ""

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

    def explain_call(self, inner: str, options: dict[str, Any]) -> Explanation:
        if self.explain is not None:
            return self.explain(inner, options)
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


# --- checks shared by the built-in stages -------------------------------------


@functools.lru_cache(maxsize=256)
def _positional_range(sig: inspect.Signature | None) -> tuple[int, int | None] | None:
    """(required, maximum or None for *args) positional arguments, if known."""
    if sig is None:
        return None
    P = inspect.Parameter
    positional = [p for p in sig.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is P.empty for p in positional)
    varargs = any(p.kind is P.VAR_POSITIONAL for p in sig.parameters.values())
    return required, None if varargs else len(positional)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_argnums(ctx: StageContext, options: dict[str, Any], key: str, default: Any = 0) -> None:
    value = options.get(key, default)
    nums = _as_tuple(value)
    bad = [n for n in nums if not isinstance(n, int) or isinstance(n, bool)]
    if bad:
        raise TypeError(
            f"`{key}` must be an int or a tuple of ints, got {value!r}.\n"
            f"Use positions of `{ctx.fn_name}`'s positional arguments, e.g. {key}=0."
        )
    bounds = _positional_range(ctx.signature)
    if bounds is None or bounds[1] is None:
        return
    count = bounds[1]
    out = [n for n in nums if not -count <= n < count]
    if out:
        names = [p for p in ctx.signature.parameters][:count] if ctx.signature else []
        raise ValueError(
            f"`{key}={value!r}` refers to argument {out[0]}, but `{ctx.fn_name}` takes "
            f"{count} positional argument{'s' if count != 1 else ''} {tuple(names)}.\n"
            f"Use a number from 0 to {count - 1}."
        )


def _check_argnames(ctx: StageContext, options: dict[str, Any], key: str) -> None:
    value = options.get(key)
    names = (value,) if isinstance(value, str) else _as_tuple(value)
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"`{key}` must be a string or a tuple of strings, got {value!r}.")
    sig = ctx.signature
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    unknown = [n for n in names if n not in sig.parameters]
    if unknown:
        raise ValueError(
            f"`{key}` names {unknown[0]!r}, which is not a parameter of `{ctx.fn_name}{format_signature(sig)}`.\n"
            f"Use one of {tuple(sig.parameters)}."
        )


def _check_axes_leaves(value: Any, key: str) -> None:
    flat = value if isinstance(value, tuple) else (value,)
    if all(x is None or type(x) is int for x in flat):  # the usual 0 or (None, 0): no tree walk
        return
    leaves = jax.tree.leaves(value, is_leaf=lambda x: x is None)
    bad = [x for x in leaves if x is not None and (not isinstance(x, int) or isinstance(x, bool))]
    if bad:
        raise TypeError(
            f"`{key}` entries must be ints or None, got {bad[0]!r} in {key}={value!r}.\n"
            f"Give an axis number to map over, or None for an argument that is not mapped."
        )


def _check_in_axes(ctx: StageContext, options: dict[str, Any]) -> None:
    in_axes = options.get("in_axes", 0)
    if not (in_axes is None or isinstance(in_axes, (int, tuple, list))) or isinstance(in_axes, bool):
        raise TypeError(
            f"`in_axes` must be an int, None, or a tuple with one entry per positional "
            f"argument, got {type(in_axes).__name__} {in_axes!r}.\n"
            f"For example in_axes=0 maps every argument over axis 0; in_axes=(None, 0) "
            f"maps only the second."
        )
    _check_axes_leaves(in_axes, "in_axes")
    _check_axes_leaves(options.get("out_axes", 0), "out_axes")
    bounds = _positional_range(ctx.signature)
    if not isinstance(in_axes, (tuple, list)) or bounds is None:
        return
    required, maximum = bounds
    if len(in_axes) < required or (maximum is not None and len(in_axes) > maximum):
        takes = f"{required}" if required == maximum else f"{required} to {maximum}"
        example = tuple(list(in_axes[:required]) + [0] * (required - len(in_axes)))
        raise ValueError(
            f"in_axes has {len(in_axes)} entr{'y' if len(in_axes) == 1 else 'ies'} but "
            f"`{ctx.fn_name}` takes {takes} positional argument{'s' if maximum != 1 else ''}.\n"
            f"Give one entry per positional argument, e.g. in_axes={example!r}."
        )


def _check_jit(ctx: StageContext, options: dict[str, Any]) -> None:
    for key in ("static_argnums", "donate_argnums"):
        if key in options:
            _check_argnums(ctx, options, key)
    for key in ("static_argnames", "donate_argnames"):
        if key in options:
            _check_argnames(ctx, options, key)
    _sharding.check_jit_shardings(ctx, options)


def _check_diff(ctx: StageContext, options: dict[str, Any]) -> None:
    _check_argnums(ctx, options, "argnums")


def _check_pmap(ctx: StageContext, options: dict[str, Any]) -> None:
    _check_in_axes(ctx, options)
    for key in ("static_broadcasted_argnums", "donate_argnums"):
        if key in options:
            _check_argnums(ctx, options, key)


def _check_remat(ctx: StageContext, options: dict[str, Any]) -> None:
    if "static_argnums" in options:
        _check_argnums(ctx, options, "static_argnums")
    policy = options.get("policy")
    if policy is not None and not callable(policy):
        raise TypeError(f"`policy` must be a callable such as jax.checkpoint_policies.dots_saveable, got {policy!r}.")


# --- the debug stage ----------------------------------------------------------


def debug(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the pipeline eagerly with jit disabled, so breakpoints and print work."""

    @functools.wraps(fn)
    def run_eagerly(*args: Any, **kwargs: Any) -> Any:
        with jax.disable_jit():
            return fn(*args, **kwargs)

    return run_eagerly


def _explain_debug(inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del options  # debug takes none
    code = (
        "def run_eagerly(*args, **kwargs):\n"
        "    with jax.disable_jit():  # breakpoints and print see real values\n"
        f"        return {inner}(*args, **kwargs)"
    )
    return code, "run_eagerly"


# --- the scan stage ------------------------------------------------------------


def scan(step: Callable[..., Any], steps: int, unroll: int | bool = 1) -> Callable[..., Any]:
    """Runs several training steps per call with ``jax.lax.scan``.

    ``steps`` is how many batches ``fit`` stacks per call; the scanned function
    accepts any number of stacked batches (a shorter last group recompiles once).
    ``unroll`` is ``jax.lax.scan``'s: steps per loop iteration, which lets XLA
    overlap consecutive small steps.
    """
    del steps  # used by fit to stack batches; lax.scan reads the length from them

    @functools.wraps(step)
    def scanned(state: Any, batches: Any) -> Any:
        return jax.lax.scan(step, state, batches, unroll=unroll)

    return scanned


def _check_scan(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # any step function (state, batch) -> (state, metrics) will do
    steps = options.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int (batches per call), got {steps!r}; e.g. .scan(50).")
    unroll = options.get("unroll", 1)
    if not isinstance(unroll, int) or (not isinstance(unroll, bool) and unroll < 1):
        raise ValueError(f"`unroll` must be a positive int or a bool, as for jax.lax.scan, got {unroll!r}.")


def _explain_scan(inner: str, options: dict[str, Any]) -> tuple[str, str]:
    code = (
        "def scanned(state, batches):  # each leaf of batches: "
        f"[{options['steps']}, ...] stacked batches\n"
        f"    return jax.lax.scan({inner}, state, batches"
        + (f", unroll={options['unroll']!r})" if "unroll" in options else ")")
    )
    return code, "scanned"


def _builtin(name: str, apply: Callable[..., Any], jax_name: str, check: Any = None, **kw: Any) -> StageKind:
    return StageKind(name, apply, jax_name, check=check, keeps_signature=True, **kw)


BUILTIN_STAGES: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        _builtin(
            "jit",
            _sharding.jit,  # jax.jit, plus mesh= to write shardings as PartitionSpecs
            "jax.jit",
            _check_jit,
            explain=_sharding.explain_jit,
            doc="Compiles with XLA (`jax.jit`).",
        ),
        _builtin("grad", jax.grad, "jax.grad", _check_diff, doc="Gradient (`jax.grad`)."),
        _builtin(
            "value_and_grad",
            jax.value_and_grad,
            "jax.value_and_grad",
            _check_diff,
            doc="Value and gradient in one pass (`jax.value_and_grad`).",
        ),
        _builtin("hessian", jax.hessian, "jax.hessian", _check_diff, doc="Hessian (`jax.hessian`)."),
        _builtin("jacfwd", jax.jacfwd, "jax.jacfwd", _check_diff, doc="Forward-mode Jacobian (`jax.jacfwd`)."),
        _builtin("jacrev", jax.jacrev, "jax.jacrev", _check_diff, doc="Reverse-mode Jacobian (`jax.jacrev`)."),
        _builtin("vmap", jax.vmap, "jax.vmap", _check_in_axes, doc="Vectorizes over a batch axis (`jax.vmap`)."),
        _builtin(
            "pmap", jax.pmap, "jax.pmap", _check_pmap, doc="Maps over devices (`jax.pmap`, maintenance mode in JAX)."
        ),
        _builtin(
            "remat",
            jax.checkpoint,
            "jax.checkpoint",
            _check_remat,
            doc="Recomputes activations in the backward pass to save memory (`jax.checkpoint`).",
        ),
        _builtin(
            "debug",
            debug,
            "",
            explain=_explain_debug,
            doc="Runs eagerly under `jax.disable_jit()` so breakpoints and print work; the last stage.",
        ),
        _builtin(
            "scan",
            scan,
            "jax.lax.scan",
            _check_scan,
            explain=_explain_scan,
            doc="Runs `steps` training steps per call with `jax.lax.scan`.",
        ),
        *_sharding.stage_kinds(),  # shard, data_parallel
    )
}
