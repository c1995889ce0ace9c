"""Turns JAX's call-time errors into the advice a JAX expert would give.

Only the error path runs here: a known error is traced again abstractly with
each stage's output marked, to learn which stage raised it. The fast path of
``Pipeline.__call__`` is untouched.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from jaxpipe._core import fold as _fold
from jaxpipe._core.stage import Stage, StageContext, StageKind
from jaxpipe._stages.builtins import BUILTIN_STAGES
from jaxpipe.errors import PipelineError, error_type

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike

_DIFF = (BUILTIN_STAGES["grad"], BUILTIN_STAGES["value_and_grad"])
_VMAP = (BUILTIN_STAGES["vmap"],)
_ARG_NAME = re.compile(r"depends on the value of the argument (\w+)")


def located(pipe: PipelineLike, err: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    """``err`` as ``pipe`` reports it: JAX's error explained as advice, a stage's own error placed at its stage.

    The one place every caller (a pipeline's call, its inspection, ``fit``'s
    compiled calls) turns an error into what the user sees; ``err`` itself
    when there is nothing to add. Raise the result ``from err``.
    """
    explained = explain_error(pipe, err, args, kwargs)
    if explained is not None:
        return explained
    return err.within(pipe) if isinstance(err, PipelineError) else err


def explain_error(
    pipe: PipelineLike, err: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Exception | None:
    """A PipelineError explaining ``err``, or None when jaxpipe has nothing to add."""
    if isinstance(err, PipelineError):
        return None
    text = str(err)
    for matches, advise in _ADVISORS:
        if matches(err, text):
            try:
                return advise(pipe, err, text, args, kwargs)
            except Exception:  # advice is a bonus: never hide JAX's own error behind a bug here
                return None
    return None


def _failing_stage(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Traces again with shapes only; the 0-based stage whose wrapped call raised first."""
    seen: list[int] = []

    def marked(fn: Callable[..., Any], index: int) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except Exception:
                seen.append(index)
                raise

        return call

    def mark(fn: Callable[..., Any], stage: Stage, ctx: StageContext) -> Callable[..., Any]:
        return marked(stage.apply(fn), len(ctx.stages))

    try:
        jax.eval_shape(_fold.fold(pipe, mark, pipe.fn, _fold.rejected), *args, **kwargs)
    except Exception:
        return seen[0] if seen else None
    return None


def _placed(message: str, pipe: PipelineLike, index: int | None, cause: Exception) -> PipelineError:
    """The advice as a PipelineError of ``cause``'s builtin kind, so ``except TypeError`` still catches it."""
    kind = error_type(cause)
    if index is None:
        return kind(message, pipeline=repr(pipe))
    return kind(message).at(index + 1, pipe.stages[index], pipe)


def _is(pipe: PipelineLike, index: int | None, kinds: tuple[StageKind, ...]) -> bool:
    return index is not None and pipe.stages[index].kind in kinds


def _first(pipe: PipelineLike, where: Callable[[StageKind], bool]) -> int | None:
    """The index of the first stage whose kind ``where`` accepts, else None."""
    return next((index for index, stage in enumerate(pipe.stages) if where(stage.kind)), None)


# --- grad of a non-scalar output ----------------------------------------------


def _is_nonscalar_grad(err: Exception, text: str) -> bool:
    return isinstance(err, TypeError) and "only defined for scalar-output functions" in text


def _advise_nonscalar_grad(pipe: PipelineLike, err: Exception, text: str, args: Any, kwargs: Any) -> PipelineError:
    index = _failing_stage(pipe, args, kwargs)
    if not _is(pipe, index, _DIFF):
        index = _first(pipe, lambda kind: kind in _DIFF)
    shape = re.search(r"Output had shape: (\([^)]*\))", text)
    got = f" but it returned an array of shape {shape.group(1)}" if shape else ""
    name = pipe.stages[index].name if index is not None else "grad"
    return _placed(
        f"`jax.{name}` needs `{pipe.name}` to return a scalar,{got}.\n"
        f"Reduce the output to one number (e.g. `jnp.mean(...)` or `jnp.sum(...)`), "
        f"use .jacrev() (or .jacfwd()) for the Jacobian of a vector output, "
        f".value_and_grad(has_aux=True) to return the vector as auxiliary data, "
        f"or, for per-example gradients, write a per-example loss and put .vmap() after .grad().",
        pipe,
        index,
        err,
    )


# --- vmap: mapped axes of different sizes -----------------------------------


def _is_vmap_sizes(err: Exception, text: str) -> bool:
    return isinstance(err, ValueError) and "inconsistent sizes for array axes to be mapped" in text


_SIZE_LINE = re.compile(r"had size (\d+): axis (\d+) of ((?:argument|kwargs)[^;\n]*?) of type (\S+?)[;\n]?$", re.M)


def _advise_vmap_sizes(pipe: PipelineLike, err: Exception, text: str, args: Any, kwargs: Any) -> PipelineError:
    index = _failing_stage(pipe, args, kwargs)
    if not _is(pipe, index, _VMAP):
        index = _first(pipe, lambda kind: kind in _VMAP)
    lines = [f"  * {who}: axis {axis} has size {size} ({kind})" for size, axis, who, kind in _SIZE_LINE.findall(text)]
    found = "\n".join(lines) if lines else text
    in_axes = pipe.stages[index].options.get("in_axes", 0) if index is not None else 0
    return _placed(
        f"`jax.vmap` maps over one axis of each argument, and those axes must have the same size:\n"
        f"{found}\n"
        f"Give every mapped argument the same batch size, or mark an argument that is shared by "
        f"the whole batch with None in in_axes (now in_axes={in_axes!r}; e.g. in_axes=(None, 0)).",
        pipe,
        index,
        err,
    )


# --- a traced value used where Python needs a concrete one ------------------


def _is_concretization(err: Exception, text: str) -> bool:
    return (
        isinstance(err, jax.errors.ConcretizationTypeError)
        or bool(_ARG_NAME.search(text))
        or (isinstance(err, IndexError) and "must be static integers" in text)  # x[:n] with a traced n
    )


def _advise_concretization(pipe: PipelineLike, err: Exception, text: str, args: Any, kwargs: Any) -> PipelineError:
    batched = "BatchTracer" in text
    if batched:  # under a batching transform
        index = _first(pipe, lambda kind: kind in _VMAP or kind is BUILTIN_STAGES["pmap"])
    else:  # under a transform that traces the whole function
        index = _first(pipe, lambda kind: kind.compiles or kind.steps_per_call is not None)
    if index is None:
        index = _failing_stage(pipe, args, kwargs)
    arg = _ARG_NAME.search(text)
    name = arg.group(1) if arg else None
    position = _position(pipe.fn, name)
    what = f"the value of argument `{name}`" if name else "the value of a traced array"
    kind = pipe.stages[index].kind if index is not None else BUILTIN_STAGES["jit"]
    stage = kind.name
    fixes = ["`jnp.where(cond, a, b)` for a value-dependent choice", "`jax.lax.cond` / `jax.lax.switch` for branches"]
    if kind is BUILTIN_STAGES["jit"]:
        static = f".jit(static_argnames=({name!r},))" if name else ".jit(static_argnums=(i,))"
        if position is not None:
            static += f" or .jit(static_argnums=({position},))"
        fixes.append(f"if it is a setting such as a flag or a size, mark it static: {static}")
    elif kind in _VMAP:
        fixes.append("in_axes=None for that argument if it is the same for the whole batch")
    return _placed(
        f"`{pipe.name}` needs {what} in Python (an `if`, `bool()`, `int()`, an array shape or a slice bound), "
        f"but under `{stage}` it is an abstract tracer without a value.\n"
        f"Use " + "; ".join(fixes) + ".",
        pipe,
        index,
        err,
    )


def _position(fn: Callable[..., Any], name: str | None) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


# --- x[i] = v on a JAX array -------------------------------------------------


def _is_inplace(err: Exception, text: str) -> bool:
    return isinstance(err, TypeError) and "immutable and do not support in-place item assignment" in text


def _advise_inplace(pipe: PipelineLike, err: Exception, text: str, args: Any, kwargs: Any) -> PipelineError:
    index = _failing_stage(pipe, args, kwargs) if pipe.stages else None
    return _placed(
        f"`{pipe.name}` assigns into a JAX array in place (`x[i] = v`), but JAX arrays are immutable.\n"
        f"Write `x = x.at[i].set(v)` instead (or `.add`, `.multiply`, `.min`, `.max`); "
        f"under jit XLA turns it into an in-place update anyway.",
        pipe,
        index,
        err,
    )


# --- vmap: in_axes of another length than the call's arguments -------------


def _is_vmap_arity(err: Exception, text: str) -> bool:
    return isinstance(err, ValueError) and "vmap in_axes must be" in text and "len(args)" in text


def _advise_vmap_arity(pipe: PipelineLike, err: Exception, text: str, args: Any, kwargs: Any) -> PipelineError:
    index = _failing_stage(pipe, args, kwargs)
    if not _is(pipe, index, _VMAP):
        index = _first(pipe, lambda kind: kind in _VMAP)
    in_axes = pipe.stages[index].options.get("in_axes", 0) if index is not None else None
    count = re.search(r"len\(args\)=(\d+)", text)
    passed = int(count.group(1)) if count else len(args)
    return _placed(
        f"in_axes={in_axes!r} has {len(in_axes) if isinstance(in_axes, (tuple, list)) else 1} entries, "
        f"but the call passed {passed} positional argument{'s' if passed != 1 else ''}.\n"
        f"Give one entry per positional argument (None for one that is not mapped), "
        f"or in_axes=0 to map every argument over axis 0.",
        pipe,
        index,
        err,
    )


_ADVISORS = (
    (_is_nonscalar_grad, _advise_nonscalar_grad),
    (_is_vmap_sizes, _advise_vmap_sizes),
    (_is_vmap_arity, _advise_vmap_arity),
    (_is_concretization, _advise_concretization),
    (_is_inplace, _advise_inplace),
)
