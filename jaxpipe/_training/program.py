"""The compiled program ``fit`` calls: up to ``capacity`` training steps in one call.

One call runs a ``jax.lax.while_loop`` over steps, so the number of steps is an
argument, not part of the program: any call length compiles once. Each step
either gathers its batch on the device from data placed there once (the epoch's
permutation is an argument; the position comes from ``state.step``, exactly as
``fit`` on the host chose batches), or takes the next of a stack of batches
streamed from the host. The metrics of all steps come back as one
``[capacity, n_metrics]`` array. No program checks its steps for non-finite
values: a check per step costs a copy of the state per step inside XLA (a
``cond`` between the new and the old state: 1.6x the step of a 4x1024 MLP on
the CPU). ``fit`` pays for the guard per call instead: it keeps a state known
to be finite and the calls launched since, and replays them should a row come
back non-finite (``Loop._replay``).

Typed PRNG keys travel as their raw key data between calls (wrapped again inside
the program), and the state is donated: nothing is allocated or re-wrapped per
step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core.fold import fold, rejected
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.stage import Stage, StageContext


def _probe(*args: Any) -> Any:  # a function to see whether a stage leaves its input alone
    return args


# ``.jit()`` options that change neither how the step is called nor where it runs: ``fit`` compiles
# its own program with them. Any other (shardings, donation, static arguments, a device or backend)
# makes ``fit`` call the pipeline as built, one call per ``.scan(k)`` group or step.
PASSED_JIT_OPTIONS = frozenset({"keep_unused", "inline", "compiler_options"})


@functools.lru_cache(maxsize=32)  # one wrapped step per pipeline, as the compiled program is
def step_function(pipe: PipelineLike) -> Callable[..., Any] | None:
    """The pipeline's one training step, not jitted: all stages but ``.scan`` and ``.jit``.

    None when ``fit`` should call the pipeline as built: no ``.jit()`` (an
    eager pipeline), a jit with options beyond :data:`PASSED_JIT_OPTIONS`
    (its own shardings or donation), or a stage after ``.jit()`` that changes
    the function.
    """
    compiling = [i for i, stage in enumerate(pipe.stages) if stage.kind.compiles]
    if len(compiling) != 1:
        return None
    at = compiling[0]
    jit = pipe.stages[at]
    if jit.kind.distributes or not set(jit.options) <= PASSED_JIT_OPTIONS:
        return None
    for stage in pipe.stages[at + 1 :]:
        try:
            if stage.apply(_probe) is not _probe:
                return None
        except Exception:
            return None
    seen = 0

    def apply(fn: Callable[..., Any], stage: Stage, ctx: StageContext) -> Callable[..., Any]:
        nonlocal seen
        seen += 1
        if seen > at or stage.kind.steps_per_call is not None:  # fit runs the steps of a call itself
            return fn
        return stage.apply(fn)

    return fold(pipe, apply, pipe.fn, rejected)


def jit_options(pipe: PipelineLike) -> dict[str, Any]:
    """The pipeline's own ``.jit()`` options that ``fit``'s program keeps (see :data:`PASSED_JIT_OPTIONS`)."""
    return next((dict(stage.options) for stage in pipe.stages if stage.kind.compiles), {})


# --- raw keys ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyCodec:
    """Which leaves of a state are typed PRNG keys, to pass them as raw data and back."""

    impls: tuple[Any, ...]  # per leaf: the key's impl, or None for a plain array

    @classmethod
    def of(cls, state: Any) -> KeyCodec:
        return cls(tuple(_key_impl(leaf) for leaf in jax.tree.leaves(state)))

    def raw(self, state: Any) -> Any:
        if not any(self.impls):
            return state
        leaves, tree = jax.tree_util.tree_flatten(state)
        return jax.tree_util.tree_unflatten(
            tree, [x if impl is None else jax.random.key_data(x) for x, impl in zip(leaves, self.impls, strict=True)]
        )

    def typed(self, state: Any) -> Any:
        if not any(self.impls):
            return state
        leaves, tree = jax.tree_util.tree_flatten(state)
        return jax.tree_util.tree_unflatten(
            tree,
            [
                x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                for x, impl in zip(leaves, self.impls, strict=True)
            ],
        )


def _key_impl(leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key_impl(leaf)
    return None


# --- the program ----------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """One compiled many-step call and what it learned while tracing (the metric names)."""

    call: Callable[..., Any]
    names: list[str]


def _row(metrics: dict[str, Any], names: list[str]) -> tuple[jax.Array, jax.Array]:
    """The step's metrics as one float vector, and whether all are finite.

    A non-scalar metric is shown by its first element, or NaN when any of its
    elements is not finite: the guard sees a NaN anywhere in it.
    """
    if not names:
        names.extend(sorted(metrics))
    values = []
    for name in names:
        metric = jnp.asarray(metrics[name])
        first = jnp.ravel(metric)[0]
        if metric.ndim and jnp.issubdtype(metric.dtype, jnp.inexact):
            first = jnp.where(jnp.isfinite(metric).all(), first, jnp.nan)
        values.append(first)
    floats = [v for v in values if jnp.issubdtype(v.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in floats])) if floats else jnp.bool_(True)
    dtype = jnp.result_type(jnp.float32, *[v.dtype for v in floats]) if floats else jnp.float32
    row = jnp.stack([v.astype(dtype) for v in values]) if values else jnp.zeros((0,), dtype)
    return row, finite


@functools.lru_cache(maxsize=32)
def program(
    pipe: PipelineLike,
    codec: KeyCodec,
    *,
    gather: bool,
    batch_size: int,
    steps_per_epoch: int,
    capacity: int,
    static: bool = False,
    single: bool = False,
) -> Program:
    """The jitted ``(state, ok, n, source...) -> (state, ok, metrics)`` for ``pipe``.

    ``gather``: the source is ``(data, order)``: the data set on the device and
    this epoch's permutation; otherwise it is ``batches``, stacked on axis 0.
    ``static``: exactly ``capacity`` steps in a ``jax.lax.scan`` (``n`` unused),
    for the full calls: a loop whose length XLA knows needs no host round trip
    per step on a GPU. ``single``: one step at the program's top level, no loop
    (``n`` unused): the plain jitted step, for calls of one step (XLA:CPU runs
    some steps, convolutions above all, far slower inside a loop). Otherwise a
    ``while_loop`` of ``n <= capacity`` steps (remainders, replays). ``ok`` is
    passed through (the scan ands its steps' finiteness in; ``fit`` reads the rows).
    """
    step = step_function(pipe)
    assert step is not None
    names: list[str] = []

    def one_step(state: Any, batch: Any) -> tuple[Any, jax.Array, jax.Array]:
        new, metrics = step(codec.typed(state), batch)
        row, finite = _row(metrics, names)
        return codec.raw(new), row, finite

    def run(state: Any, ok: jax.Array, n: jax.Array, *source: Any) -> tuple[Any, jax.Array, jax.Array]:
        if gather:
            data, order = source

            def batch_at(state: Any, i: jax.Array) -> Any:
                # The position in the epoch comes from the state's step, as on the host.
                offset = (state.step % steps_per_epoch) * batch_size
                index = jax.lax.dynamic_slice_in_dim(order, offset, batch_size)
                return jax.tree.map(lambda x: jnp.take(x, index, axis=0), data)
        else:
            (batches,) = source

            def batch_at(state: Any, i: jax.Array) -> Any:
                return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batches)

        if single:
            new, row, _ = one_step(state, batch_at(state, jnp.int32(0)))
            return new, ok, row[None]

        if static:

            def scan_body(carry: Any, i: jax.Array) -> Any:
                ok, state = carry
                new, row, finite = one_step(state, batch_at(state, i))
                return (ok & finite, new), row

            (ok, state), rows = jax.lax.scan(scan_body, (ok, state), jnp.arange(capacity, dtype=jnp.int32))
            return state, ok, rows

        _, row_shape, _ = jax.eval_shape(one_step, state, batch_at(state, jnp.int32(0)))
        rows = jnp.zeros((capacity, *row_shape.shape), row_shape.dtype)

        def cond(carry: Any) -> jax.Array:
            i, _, _, _ = carry
            return i < n  # every step runs, finite or not: fit replays up to the last finite one

        def body(carry: Any) -> Any:
            i, ok, state, rows = carry
            new, row, _ = one_step(state, batch_at(state, i))
            return i + 1, ok, new, rows.at[i].set(row)

        _, ok, state, rows = jax.lax.while_loop(cond, body, (jnp.int32(0), ok, state, rows))
        return state, ok, rows

    return Program(jax.jit(run, donate_argnums=(0,), **jit_options(pipe)), names)


@functools.lru_cache(maxsize=8)
def _order_fn(size: int, impl: Any) -> Callable[[Any, Any], jax.Array]:
    def order(key_data: Any, epoch: Any) -> jax.Array:
        key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
        return jax.random.permutation(jax.random.fold_in(key, epoch), size)

    return jax.jit(order)


def host_key(data_key: jax.Array) -> tuple[Any, Any]:
    """The data key as host data and its impl (None for a raw legacy key): kept by ``fit`` without a device
    copy (the state's own key is donated with each call), and wrapped again inside the order's program."""
    impl = _key_impl(data_key)
    raw = data_key if impl is None else jax.random.key_data(data_key)
    if not getattr(raw, "is_fully_addressable", True):  # across processes: a device copy, as sharded
        return jnp.copy(raw), impl
    return np.asarray(raw), impl


def epoch_order_on_device(data_key: tuple[Any, Any], epoch: int, size: int) -> jax.Array:
    """The permutation of ``epoch`` (``fold_in(data_key, epoch)``), computed and kept on the device.

    ``data_key``: :func:`host_key`'s pair.
    """
    key_data, impl = data_key
    return _order_fn(size, impl)(key_data, np.int32(epoch))
