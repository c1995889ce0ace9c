"""``.data_parallel``: a training step split along a mesh axis, and placing state and batches (also across hosts).

JAX is the distributed engine: XLA's partitioner splits the step along the
mesh axis (GSPMD), so the loss and the model stay unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe._core.state import TrainState
from jaxpipe._core.steps import stacks_batches
from jaxpipe._stages.mesh import auto_mesh, check_mesh, check_split, mesh_code, named
from jaxpipe._stages.partition import Partitioning, check_partitioning, opt_specs, partitioning
from jaxpipe.errors import PipelineError
from jaxpipe.hookspecs import hookimpl

if TYPE_CHECKING:
    from jaxpipe._core.stage import StageContext


# --- .data_parallel(): the batch split along a mesh axis --------------------------


def _axis_names(axis: str | tuple[str, ...]) -> tuple[str, ...]:
    return axis if isinstance(axis, tuple) else (axis,)


def state_shardings(state: Any, mesh: Mesh, param_specs: Any) -> Any:
    """NamedShardings for a training state: ``param_specs`` for params and optimizer state, the rest replicated.

    ``param_specs`` is a function ``(path, array) -> PartitionSpec`` (applied
    to params and optimizer state alike), a :class:`Partitioning` (annotations,
    FSDP: the optimizer state follows its parameter), or None (replicated).
    Works on arrays, tracers and ``jax.eval_shape``'s shapes alike.
    """
    replicated = NamedSharding(mesh, P())
    if param_specs is None or not isinstance(state, TrainState):
        return jax.tree.map(lambda _: replicated, state)
    if isinstance(param_specs, Partitioning):
        table = param_specs.param_specs(state.params, mesh)

        def by_path(path: Any, leaf: Any) -> NamedSharding:
            del leaf  # every params leaf is in the table
            return NamedSharding(mesh, table[tuple(str(k) for k in path)][0])

        params = jax.tree.map_with_path(by_path, state.params)
        opt_state = named(mesh, opt_specs(state.opt_state, table))
    else:

        def by_rule(path: Any, leaf: Any) -> NamedSharding:
            return NamedSharding(mesh, param_specs(path, leaf))

        params = jax.tree.map_with_path(by_rule, state.params)
        opt_state = jax.tree.map_with_path(by_rule, state.opt_state)
    return state.replace(
        **{
            field: jax.tree.map(lambda _: replicated, getattr(state, field))
            for field in ("step", "key", "model_state", "data_key")
        },
        params=params,
        opt_state=opt_state,
    )


def data_parallel(
    step: Callable[..., Any],
    mesh: Mesh,
    axis: str | tuple[str, ...] = "data",
    param_specs: Any = None,
    rules: Any = None,
    strict: bool = False,
) -> Callable[..., Any]:
    """Splits each batch along the mesh axis ``axis`` and keeps the state replicated.

    Wraps a training step ``(state, batch) -> (state, metrics)``: XLA then runs
    each device on its slice of the batch and sums the gradients across devices,
    so the loss and the model are unchanged and the result matches one device.
    ``param_specs`` shards parameters and optimizer state instead of
    replicating them: a function ``(path, array) -> PartitionSpec``,
    ``"annotations"`` (Flax's partitioning metadata through ``rules``),
    ``"fsdp"``, or ``("annotations", "fsdp")``; see :mod:`.partition`.
    ``init`` makes the state on the mesh and ``fit`` places each batch
    (per-process data across hosts).
    """
    mesh = auto_mesh(mesh)
    param_specs = partitioning(param_specs, axis, rules, strict)
    batch_sharding = NamedSharding(mesh, P(axis))
    replicated = NamedSharding(mesh, P())
    where = f".data_parallel(axis={axis!r})"

    @functools.wraps(step)
    def step_on_mesh(state: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        check_batch(mesh, axis, batch, where, stacked=False)
        state = jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, param_specs))
        batch = jax.lax.with_sharding_constraint(batch, jax.tree.map(lambda _: batch_sharding, batch))
        new_state, metrics = step(state, batch, *args, **kwargs)
        new_state = jax.lax.with_sharding_constraint(new_state, state_shardings(new_state, mesh, param_specs))
        return new_state, jax.lax.with_sharding_constraint(metrics, jax.tree.map(lambda _: replicated, metrics))

    return step_on_mesh


def check_batch(mesh: Mesh, axis: str | tuple[str, ...], batch: Any, where: str, *, stacked: bool) -> None:
    """Every batch leaf splits evenly over ``axis`` (its dimension 1 for ``.scan`` stacks, else 0)."""
    spec = P(None, axis) if stacked else P(axis)
    for path, leaf in jax.tree.leaves_with_path(batch):
        label = f"the batch's `{jax.tree_util.keystr(path) or 'array'}`"
        check_split(mesh, spec, np.shape(leaf), label, where, "data_parallel")


def place(tree: Any, shardings: Any) -> Any:
    """Each leaf on its sharding; the value must be the same on every process.

    One process: ``jax.device_put``. Several: each process fills its own
    devices from its host copy (``jax.make_array_from_callback``), which needs
    no communication; typed PRNG keys go through their key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(leaf: Any, sharding: NamedSharding) -> Any:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def place_batch(batch: Any, mesh: Mesh, axis: str | tuple[str, ...], *, stacked: bool, whole: bool) -> Any:
    """A host batch as arrays split over ``axis``; across processes, each host supplies its rows.

    ``whole``: every process holds the entire global batch (``fit`` over a dict
    of arrays) and keeps only its own rows; otherwise each process's batch is
    its share and the global batch is their concatenation.
    """
    sharding = NamedSharding(mesh, P(None, axis) if stacked else P(axis))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def assemble(leaf: Any) -> jax.Array:
        local = np.asarray(leaf)
        return jax.make_array_from_process_local_data(sharding, local, local.shape if whole else None)

    return jax.tree.map(assemble, batch)


class OnMesh:
    """``init``/``fit`` hooks of one ``.data_parallel`` stage: place the state and the batches."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.mesh = auto_mesh(options["mesh"])
        self.axis = options.get("axis", "data")
        self.param_specs = partitioning(
            options.get("param_specs"), self.axis, options.get("rules"), options.get("strict", False)
        )

    @hookimpl
    def jaxpipe_state_shardings(self, pipeline: Any, state: Any) -> Any:
        del pipeline  # one stage per run
        return state_shardings(state, self.mesh, self.param_specs)

    @hookimpl
    def jaxpipe_place_state(self, pipeline: Any, state: Any) -> Any:
        del pipeline  # one stage per run
        return place(state, state_shardings(state, self.mesh, self.param_specs))

    @hookimpl
    def jaxpipe_place_batch(self, run: Any, batch: Any, whole: bool) -> Any:
        stacked = stacks_batches(run.pipeline)  # as fit stacks them, also for .scan(1)
        if jax.process_count() == 1 or whole:
            try:
                check_batch(self.mesh, self.axis, batch, f".data_parallel(axis={self.axis!r})", stacked=stacked)
            except PipelineError as err:
                advice = err.detail + " With `fit`, choose a batch_size the mesh axis divides."
                raise PipelineError(advice, stage_name="data_parallel").within(run.pipeline) from None
        return place_batch(batch, self.mesh, self.axis, stacked=stacked, whole=whole)

    @hookimpl
    def jaxpipe_batch_shards(self, run: Any) -> int:
        del run  # one stage per run
        return math.prod(self.mesh.shape[a] for a in _axis_names(self.axis))

    @hookimpl
    def jaxpipe_place_data(self, run: Any, data: Any) -> Any:
        del run  # every process holds the whole data set: each keeps its rows
        return place_batch(data, self.mesh, self.axis, stacked=False, whole=True)


def check_data_parallel(ctx: StageContext, options: dict[str, Any]) -> None:
    mesh = options["mesh"]
    check_mesh(mesh, "data_parallel")
    axis = options.get("axis", "data")
    names = _axis_names(axis)
    if not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"`axis` must be a mesh axis name or a tuple of them, got {axis!r}; e.g. axis='data'.")
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"`axis={axis!r}` is not an axis of the mesh, whose axes are {mesh.axis_names!r}.\n"
            f"Use one of them, e.g. .data_parallel(mesh, axis={mesh.axis_names[0]!r}), or make the mesh with "
            f"that name: jax.make_mesh(({mesh.size},), ({unknown[0]!r},))."
        )
    check_partitioning(options.get("param_specs"), options.get("rules"), options.get("strict", False))
    # it wraps one step on one program: nothing before it may compile, distribute or batch several steps
    late = [s.name for s in ctx.stages if s.kind.compiles or s.kind.distributes or s.kind.steps_per_call]
    if late:
        raise ValueError(
            f"`.data_parallel()` wraps one training step, but it comes after `.{late[0]}()`.\n"
            f"Put it right after the training stages and before `.scan()`/`.jit()`, e.g. "
            f"Pipeline(loss).model(m).optimize(tx).data_parallel(mesh).jit()."
        )


def explain_data_parallel(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the same constraints whatever the step
    axis = options.get("axis", "data")
    rule = partitioning(options.get("param_specs"), axis, options.get("rules"), options.get("strict", False))
    state, note = "replicated", ""
    if isinstance(rule, Partitioning):
        state = "state_shardings(state)"
        note = f"  # params: {rule.describe()}; opt_state: its parameter's; the rest P()"
    elif rule is not None:
        state = "state_shardings(state)"
        note = f"  # params, opt_state: {getattr(rule, '__name__', 'param_specs')}(path, x); the rest P()"
    code = (
        f"{mesh_code(options['mesh'], auto=True)}  # the mesh's devices with Auto axes\n"
        f"replicated = NamedSharding(mesh, P())\n\n"
        f"def step_on_mesh(state, batch):  # XLA splits the step along mesh axis {axis!r}\n"
        f"    state = jax.lax.with_sharding_constraint(state, {state}){note}\n"
        f"    batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, {P(axis)!r}))\n"
        f"    state, metrics = {inner}(state, batch)\n"
        f"    state = jax.lax.with_sharding_constraint(state, {state})\n"
        f"    return state, jax.lax.with_sharding_constraint(metrics, replicated)"
    )
    return code, "step_on_mesh"
