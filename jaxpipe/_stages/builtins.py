"""The built-in stages: JAX's transforms, ``debug``, ``scan`` and the sharding stages.

Built-in kinds use the JAX function itself as the transform, so a stage's
options are exactly that function's keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxpipe._core.after_step import after_step_kind
from jaxpipe._core.signature import TypeAndValueError, check_argnames, check_argnums, positional_range
from jaxpipe._core.stage import StageContext, StageKind, Training
from jaxpipe._core.steps import in_fit_call
from jaxpipe._stages import data_parallel as _data_parallel
from jaxpipe._stages import shard as _shard
from jaxpipe.errors import PipelineError

# --- checks of the built-in stages ---------------------------------------------


def _probe(*args: Any, **kwargs: Any) -> None:
    """A stand-in function: ``jax.vmap``/``jax.pmap`` check their axes when called, before any tracing."""
    del args, kwargs  # never called


def _jax_rejects(transform: Callable[..., Any], **axes: Any) -> TypeError | ValueError | None:
    """The error ``transform(_probe, **axes)`` raises, or None: JAX itself decides what it accepts.

    So custom pytree nodes, negative axes and spec types registered with JAX's
    vmappable protocol pass exactly where they pass ``jax.vmap``.
    """
    try:
        transform(_probe, **axes)
    except (TypeError, ValueError) as err:
        return err
    return None


def _plain_axes(value: Any) -> bool:
    """The usual ``0`` or ``(None, 0)``: accepted without asking JAX."""
    flat = value if type(value) is tuple else (value,)
    return all(x is None or type(x) is int for x in flat)


def _check_axes(transform: Callable[..., Any], options: dict[str, Any]) -> None:
    in_axes, out_axes = options.get("in_axes", 0), options.get("out_axes", 0)
    if _plain_axes(in_axes) and _plain_axes(out_axes):
        return
    for key, value in (("in_axes", in_axes), ("out_axes", out_axes)):
        err = _jax_rejects(transform, **{key: value})
        if err is None:
            continue
        bad = _bad_leaf(transform, key, value)
        if bad is not None:
            raise TypeError(
                f"`{key}` entries must be ints or None, got {bad!r} in {key}={value!r}.\n"
                f"Give an axis number to map over, or None for an argument that is not mapped."
            ) from err
        raise TypeError(
            f"`{key}` must be an int, None, or a tuple with one entry per positional "
            f"argument, got {type(value).__name__} {value!r}.\n"
            f"For example in_axes=0 maps every argument over axis 0; in_axes=(None, 0) "
            f"maps only the second."
        ) from err


def _bad_leaf(transform: Callable[..., Any], key: str, value: Any) -> Any:
    """The first leaf of ``value`` that JAX refuses as an axis, or None when the container is the fault."""
    if type(value) is not tuple and type(value) is not list:
        return None
    for leaf in jax.tree.leaves(value):
        if _jax_rejects(transform, **{key: (leaf,)}) is not None:
            return leaf
    return None


def _check_arity(ctx: StageContext, in_axes: Any, *, too_few: bool) -> None:
    """A tuple ``in_axes`` longer than the positional arguments (or, with ``too_few``, shorter)."""
    bounds = positional_range(ctx.signature)
    if not isinstance(in_axes, (tuple, list)) or bounds is None:
        return
    required, maximum = bounds
    if (too_few and len(in_axes) < required) or (maximum is not None and len(in_axes) > maximum):
        takes = f"{required}" if required == maximum else f"{required} to {maximum}"
        example = tuple(list(in_axes[:required]) + [0] * (required - len(in_axes)))
        raise ValueError(
            f"in_axes has {len(in_axes)} entr{'y' if len(in_axes) == 1 else 'ies'} but "
            f"`{ctx.fn_name}` takes {takes} positional argument{'s' if maximum != 1 else ''}.\n"
            f"Give one entry per positional argument, e.g. in_axes={example!r}."
        )


def _check_function(ctx: StageContext, jax_name: str) -> None:
    """What ``jax.jit``, ``jax.grad``, ``jax.vmap`` ... refuse as the function (a TypeError there too)."""
    if ctx.stages:  # the stages before turned it into a JAX function
        return
    fn = ctx.fn
    if type(fn) is staticmethod:
        raise TypeError(
            f"`{jax_name}` does not take a staticmethod object, got {fn!r}.\n"
            f"Pass the function: Pipeline(MyClass.{getattr(fn.__func__, '__name__', 'method')}), "
            f"not the class's __dict__ entry."
        )
    plain = type(fn) in (types.FunctionType, types.MethodType, functools.partial)  # type(): no __class__ read
    if plain and (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
        raise TypeError(
            f"`{jax_name}` needs a function that returns arrays, but `{ctx.fn_name}` is a generator "
            f"function (it uses `yield`).\nReturn the values instead, e.g. `return jnp.stack(values)`."
        )


def _check_vmap(ctx: StageContext, options: dict[str, Any]) -> None:
    _check_function(ctx, "jax.vmap")
    _check_axes(jax.vmap, options)
    # Arguments may also be passed by keyword (jax.vmap maps those over axis 0), so only
    # more entries than positional arguments is certainly wrong; JAX checks the rest per call.
    _check_arity(ctx, options.get("in_axes", 0), too_few=False)


def _check_jit(ctx: StageContext, options: dict[str, Any]) -> None:
    _check_function(ctx, "jax.jit")
    for key in ("static_argnums", "donate_argnums"):
        if key in options:
            check_argnums(ctx, options, key)
    for key in ("static_argnames", "donate_argnames"):
        if key in options:
            check_argnames(ctx, options, key)
    _shard.check_jit_shardings(ctx, options)


def _check_diff(jax_name: str) -> Callable[[StageContext, dict[str, Any]], None]:
    """The check of a differentiation stage: its function, and ``argnums`` within its arguments.

    ``jax.grad`` and ``jax.value_and_grad`` report an ``argnums`` beyond the
    arguments as a TypeError, ``jax.hessian``/``jacfwd``/``jacrev`` as a ValueError.
    """
    grad_like = jax_name in ("jax.grad", "jax.value_and_grad")

    def check(ctx: StageContext, options: dict[str, Any]) -> None:
        _check_function(ctx, jax_name)
        check_argnums(ctx, options, "argnums", out_of_range=TypeAndValueError if grad_like else ValueError)

    return check


def _check_pmap(ctx: StageContext, options: dict[str, Any]) -> None:
    _check_function(ctx, "jax.pmap")
    _check_axes(jax.pmap, options)
    _check_arity(ctx, options.get("in_axes", 0), too_few=True)
    for key in ("static_broadcasted_argnums", "donate_argnums"):
        if key in options:
            check_argnums(ctx, options, key)


def _check_remat(ctx: StageContext, options: dict[str, Any]) -> None:
    if "static_argnums" in options:
        check_argnums(ctx, options, "static_argnums")
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


def _explain_debug(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx, options  # debug takes none
    code = (
        "def run_eagerly(*args, **kwargs):\n"
        "    with jax.disable_jit():  # breakpoints and print see real values\n"
        f"        return {inner}(*args, **kwargs)"
    )
    return code, "run_eagerly"


# --- the scan stage ------------------------------------------------------------


def scan(step: Callable[..., Any], steps: int, unroll: int | bool = 1) -> Callable[..., Any]:
    """Runs several training steps per call with ``jax.lax.scan``.

    ``steps`` is how many batches ``fit`` stacks per call. Called by hand, every
    leaf of ``batches`` must have leading axis ``steps`` (checked from the shapes,
    so under ``jit`` only while tracing); ``fit``'s own calls may hold fewer (a
    shorter last group recompiles once). ``unroll`` is ``jax.lax.scan``'s: steps
    per loop iteration, which lets XLA overlap consecutive small steps.
    """

    @functools.wraps(step)
    def scanned(state: Any, batches: Any) -> Any:
        if not in_fit_call():
            _check_stacked(batches, steps)
        return jax.lax.scan(step, state, batches, unroll=unroll)

    return scanned


def _check_stacked(batches: Any, steps: int) -> None:
    """Every leaf of ``batches`` is ``steps`` stacked batches: a batch's own leading axis would run that many steps."""
    leaves = jax.tree_util.tree_leaves_with_path(batches)
    shapes = [(jax.tree_util.keystr(path), np.shape(leaf)) for path, leaf in leaves]
    if all(shape[:1] == (steps,) for _, shape in shapes):
        return
    got = ", ".join(f"batches{path} of shape {shape}" for path, shape in shapes[:4])
    got += ", ..." if len(shapes) > 4 else ""
    lengths = sorted({shape[0] for _, shape in shapes if shape})
    runs = f"it would run {lengths[0]} steps, not {steps}" if len(lengths) == 1 else "lax.scan cannot run it"
    raise PipelineError(
        f"`.scan({steps})` takes {steps} stacked batches (every leaf with leading axis {steps}), got {got}: "
        f"{runs}.\nStack {steps} batches: `jax.tree.map(lambda *xs: jnp.stack(xs), *batches)` with "
        f"len(batches) == {steps}, or let `fit` stack them (fit(state, data, batch_size=...)).",
        stage_name="scan",
    )


def _check_scan(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # any step function (state, batch) -> (state, metrics) will do
    steps = options.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int (batches per call), got {steps!r}; e.g. .scan(50).")
    unroll = options.get("unroll", 1)
    if not isinstance(unroll, int) or (not isinstance(unroll, bool) and unroll < 1):
        raise ValueError(f"`unroll` must be a positive int or a bool, as for jax.lax.scan, got {unroll!r}.")


def _explain_scan(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the same loop whatever it wraps
    code = (
        "def scanned(state, batches):  # each leaf of batches: "
        f"[{options['steps']}, ...] stacked batches\n"
        f"    return jax.lax.scan({inner}, state, batches"
        + (f", unroll={options['unroll']!r})" if "unroll" in options else ")")
    )
    return code, "scanned"


def call_after_step(state: Any, new_state: Any, fn: Callable[..., Any]) -> Any:
    """Runs ``fn(state, new_state) -> new_state`` inside each training step, after the optimizer's update.

    For state of your own in ``state.extra``, updated in the compiled step
    (a running statistic, an EMA): place it after ``.optimize()`` and before
    ``.scan()``/``.jit()``; ``state`` is the state the step started from.
    """
    return fn(state, new_state)


def _check_after_step(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # placement is checked by after_step_kind
    if not callable(options["fn"]):
        raise TypeError(
            f"`.after_step()` takes a function (state, new_state) -> new_state, got {options['fn']!r}.\n"
            f"For example .after_step(lambda old, new: new.replace(extra={{**new.extra, 'seen': new.step}}))."
        )


def _explain_after_step(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the same code wherever it is placed
    name = getattr(options["fn"], "__name__", "fn").replace("<lambda>", "fn")
    code = (
        f"def step_then_{name}(state, batch):\n"
        f"    new_state, metrics = {inner}(state, batch)\n"
        f"    return {name}(state, new_state), metrics"
    )
    return code, f"step_then_{name}"


def _builtin(name: str, apply: Callable[..., Any], jax_name: str, check: Any = None, **kw: Any) -> StageKind:
    return StageKind(name, apply, jax_name, check=check, keeps_signature=True, **kw)


BUILTIN_STAGES: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        _builtin(
            "jit",
            _shard.jit,  # jax.jit, plus mesh= to write shardings as PartitionSpecs
            "jax.jit",
            _check_jit,
            explain=_shard.explain_jit,
            compiles=True,
            doc="Compiles with XLA (`jax.jit`).",
        ),
        _builtin("grad", jax.grad, "jax.grad", _check_diff("jax.grad"), doc="Gradient (`jax.grad`)."),
        _builtin(
            "value_and_grad",
            jax.value_and_grad,
            "jax.value_and_grad",
            _check_diff("jax.value_and_grad"),
            doc="Value and gradient in one pass (`jax.value_and_grad`).",
        ),
        _builtin("hessian", jax.hessian, "jax.hessian", _check_diff("jax.hessian"), doc="Hessian (`jax.hessian`)."),
        _builtin(
            "jacfwd", jax.jacfwd, "jax.jacfwd", _check_diff("jax.jacfwd"), doc="Forward-mode Jacobian (`jax.jacfwd`)."
        ),
        _builtin(
            "jacrev", jax.jacrev, "jax.jacrev", _check_diff("jax.jacrev"), doc="Reverse-mode Jacobian (`jax.jacrev`)."
        ),
        _builtin("vmap", jax.vmap, "jax.vmap", _check_vmap, doc="Vectorizes over a batch axis (`jax.vmap`)."),
        _builtin(
            "pmap",
            jax.pmap,
            "jax.pmap",
            _check_pmap,
            compiles=True,
            distributes=True,
            doc="Maps over devices (`jax.pmap`, maintenance mode in JAX).",
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
            last=True,
            doc="Runs eagerly under `jax.disable_jit()` so breakpoints and print work; the last stage.",
        ),
        after_step_kind("after_step", call_after_step, check=_check_after_step, explain=_explain_after_step),
        _builtin(
            "scan",
            scan,
            "jax.lax.scan",
            _check_scan,
            explain=_explain_scan,
            steps_per_call=lambda options: options["steps"],
            doc="Runs `steps` training steps per call with `jax.lax.scan`.",
        ),
        _builtin(
            "shard",
            _shard.shard,
            "jax.shard_map",
            _shard.check_shard,
            explain=_shard.explain_shard,
            distributes=True,
            doc="Runs once per device on its block of each argument (`jax.shard_map`).",
        ),
        _builtin(
            "data_parallel",
            _data_parallel.data_parallel,
            "",
            _data_parallel.check_data_parallel,
            explain=_data_parallel.explain_data_parallel,
            distributes=True,
            training=Training(run_hooks=_data_parallel.OnMesh),  # its hook places the (fresh or restored) state
            doc="Splits each training batch along a mesh axis; the state stays replicated.",
        ),
    )
}
