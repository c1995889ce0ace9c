"""Stages that spread a pipeline over devices: ``.shard``, ``.data_parallel``, and meshes for ``.jit``.

JAX is the distributed engine: ``.shard`` is ``jax.shard_map``, ``.jit(mesh=...)``
is ``jax.jit`` with ``NamedSharding``s, and ``.data_parallel`` lets XLA's
partitioner split a training step along a mesh axis (GSPMD), so the loss and the
model stay unchanged. ``explain()`` prints the JAX each stage stands for. The
checks here name the spec or mesh axis at fault before anything is traced.

Meshes from ``jax.make_mesh`` have ``Explicit`` axes by default, under which
``jax.shard_map`` and sharding constraints want their inputs already placed.
``.shard`` and ``.data_parallel`` therefore run over the same devices and axis
names with ``Auto`` axes, where NumPy inputs and placed arrays both work.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe._format import format_options, format_value
from jaxpipe.errors import PipelineError
from jaxpipe.hookspecs import hookimpl

if TYPE_CHECKING:
    from jaxpipe._stages import StageContext, StageKind


# --- meshes and specs -------------------------------------------------------------


def _is_spec(x: Any) -> bool:
    return isinstance(x, P) or x is None


def _spec_leaves(specs: Any) -> list[Any]:
    return jax.tree.leaves(specs, is_leaf=_is_spec)


def _spec_axes(spec: P) -> list[str]:
    """The mesh axis names a PartitionSpec mentions, in order."""
    names: list[str] = []
    for entry in spec:
        if entry is None or entry is P.UNCONSTRAINED:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return names


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis of type ``Auto``."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def named(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for each PartitionSpec in ``specs``; other leaves unchanged."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s) if isinstance(s, P) else s, specs, is_leaf=_is_spec)


def _check_mesh(mesh: Any, stage: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`.{stage}()` needs a `jax.sharding.Mesh` as `mesh`, got {type(mesh).__name__} {mesh!r}.\n"
            f"Make one over the devices, e.g. mesh = jax.make_mesh((jax.device_count(),), ('data',))."
        )


def _check_specs(mesh: Mesh, specs: Any, key: str, allow: tuple[type, ...] = ()) -> None:
    """Every leaf is a PartitionSpec (or None/``allow``) naming only axes of ``mesh``."""
    leaves = _spec_leaves(specs)
    for leaf in leaves:
        if leaf is None or isinstance(leaf, allow):
            continue
        if not isinstance(leaf, P):
            raise TypeError(
                f"`{key}` must hold jax.sharding.PartitionSpec values, got {type(leaf).__name__} {leaf!r} "
                f"in {key}={specs!r}.\nWrite P('data') to split axis 0 over mesh axis 'data', P() to replicate "
                f"(P = jax.sharding.PartitionSpec)."
            )
        axes = _spec_axes(leaf)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"`{key}` names mesh axis {unknown[0]!r} in {leaf!r}, but the mesh has axes {mesh.axis_names!r}.\n"
                f"Use one of {mesh.axis_names!r}, or make a mesh with that axis, "
                f"e.g. jax.make_mesh(({mesh.size},), ({unknown[0]!r},))."
            )
        repeated = {a for a in axes if axes.count(a) > 1}
        if repeated:
            raise ValueError(
                f"`{key}` uses mesh axis {sorted(repeated)[0]!r} twice in {leaf!r}; an axis can split only one "
                f"array dimension.\nName each mesh axis at most once per spec."
            )


def _check_spec_count(ctx: StageContext, specs: Any, key: str) -> None:
    """A tuple of specs needs one entry per positional argument, when the signature is known."""
    from jaxpipe._stages import _positional_range

    bounds = _positional_range(ctx.signature)
    if not isinstance(specs, (tuple, list)) or isinstance(specs, P) or bounds is None:
        return
    required, maximum = bounds
    if len(specs) < required or (maximum is not None and len(specs) > maximum):
        params = tuple(ctx.signature.parameters)[: maximum or len(specs)] if ctx.signature else ()
        raise ValueError(
            f"`{key}` has {len(specs)} entr{'y' if len(specs) == 1 else 'ies'} but `{ctx.fn_name}` takes "
            f"{required if required == maximum else f'{required} or more'} positional argument"
            f"{'s' if maximum != 1 else ''} {params}.\nGive one PartitionSpec per argument, e.g. "
            f"{key}=({', '.join(['P()'] * max(required, 1))})."
        )


def mesh_code(mesh: Mesh, *, auto: bool = False) -> str:
    """The ``jax.make_mesh`` call that builds ``mesh`` (with Auto axes when ``auto``)."""
    types = (AxisType.Auto,) * len(mesh.axis_names) if auto else tuple(mesh.axis_types)
    text = f"mesh = jax.make_mesh({tuple(mesh.axis_sizes)!r}, {tuple(mesh.axis_names)!r}"
    if any(t != AxisType.Explicit for t in types):
        text += ", axis_types=(" + ", ".join(f"AxisType.{t.name}" for t in types) + ("," if len(types) == 1 else "")
        text += ")"
    return text + ")"


def _spec_code(specs: Any, wrap: bool) -> str:
    """Specs as source text; ``wrap`` writes each as ``NamedSharding(mesh, P(...))``."""
    if isinstance(specs, P):
        return f"NamedSharding(mesh, {specs!r})" if wrap else repr(specs)
    if isinstance(specs, (tuple, list)):
        inner = ", ".join(_spec_code(s, wrap) for s in specs)
        return f"({inner},)" if len(specs) == 1 else f"({inner})"
    if isinstance(specs, dict):
        return "{" + ", ".join(f"{k!r}: {_spec_code(v, wrap)}" for k, v in specs.items()) + "}"
    return repr(specs)


# --- .shard(): jax.shard_map --------------------------------------------------------


def shard(
    fn: Callable[..., Any],
    mesh: Mesh,
    in_specs: Any,
    out_specs: Any,
    axis_names: Any = frozenset(),
    check_vma: bool = True,
) -> Callable[..., Any]:
    """Runs the function once per device on its block of each argument (``jax.shard_map``).

    ``in_specs`` gives one PartitionSpec per positional argument (``P()`` for an
    argument every device sees whole, ``P('data')`` to split axis 0 over mesh
    axis ``'data'``); inside, use ``jax.lax.pmean``/``psum`` over the axis name.
    The mesh's axes run as ``Auto``, so NumPy inputs need no placing. With
    ``check_vma=True`` (JAX's default), ``jax.grad`` sums the gradient of a
    replicated argument over the devices; for per-example gradients pass
    ``check_vma=False``.
    """
    mapped = jax.shard_map(
        fn,
        mesh=auto_mesh(mesh),
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=frozenset(axis_names),
        check_vma=check_vma,
    )
    where = f".shard(in_specs={in_specs!r})"
    try:
        arg_names = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        arg_names = []

    @functools.wraps(fn)
    def sharded(*args: Any) -> Any:
        _check_blocks(mesh, in_specs, args, arg_names, where)
        return mapped(*args)

    return sharded


def _check_blocks(mesh: Mesh, in_specs: Any, args: tuple[Any, ...], arg_names: list[str], where: str) -> None:
    """Each argument has the dimensions its spec splits, in sizes the mesh axes divide."""
    if isinstance(in_specs, (tuple, list)) and not isinstance(in_specs, P) and len(in_specs) != len(args):
        raise PipelineError(
            f"`{where}` has {len(in_specs)} spec{'s' if len(in_specs) != 1 else ''} but the function was called "
            f"with {len(args)} argument{'s' if len(args) != 1 else ''}.\nGive one PartitionSpec per positional "
            f"argument, in order (P() for an argument every device sees whole).",
            stage_name="shard",
        )
    specs = in_specs if isinstance(in_specs, (tuple, list)) and not isinstance(in_specs, P) else (in_specs,) * len(args)
    for position, (spec, arg) in enumerate(zip(specs, args, strict=True)):
        name = arg_names[position] if position < len(arg_names) else f"argument {position}"
        try:
            pairs = jax.tree.leaves_with_path(jax.tree.broadcast(spec, arg, is_leaf=_is_spec), is_leaf=_is_spec)
        except ValueError as err:
            raise PipelineError(
                f"`{where}`: the spec for `{name}` does not match its structure: {err}\n"
                f"Give one PartitionSpec for the whole argument, or a tree of them shaped like it.",
                stage_name="shard",
            ) from err
        leaves = jax.tree.leaves(arg)
        for (path, leaf_spec), leaf in zip(pairs, leaves, strict=False):
            label = f"`{name}{jax.tree_util.keystr(path)}`"
            _check_split(mesh, leaf_spec, np.shape(leaf), label, where, "shard")


def _check_split(mesh: Mesh, spec: Any, shape: tuple[int, ...], label: str, where: str, stage: str) -> None:
    if not isinstance(spec, P):
        return
    if len(spec) > len(shape):
        raise PipelineError(
            f"`{where}`: {spec!r} splits {len(spec)} dimensions, but {label} has shape {shape} "
            f"({len(shape)} dimension{'s' if len(shape) != 1 else ''}).\nUse at most one entry per dimension, "
            f"e.g. P() for a scalar.",
            stage_name=stage,
        )
    for dim, entry in enumerate(spec):
        axes = (
            [] if entry is None or entry is P.UNCONSTRAINED else list(entry if isinstance(entry, tuple) else (entry,))
        )
        ways = math.prod(mesh.shape[a] for a in axes)
        if ways > 1 and shape[dim] % ways:
            over = " x ".join(f"{a!r} ({mesh.shape[a]})" for a in axes)
            raise PipelineError(
                f"`{where}`: dimension {dim} of {label} has size {shape[dim]}, which mesh axis {over} "
                f"cannot split evenly into {ways} blocks.\nUse a size that is a multiple of {ways} "
                f"(e.g. {ways * max(1, shape[dim] // ways)}), or do not split that dimension.",
                stage_name=stage,
            )


def _check_shard(ctx: StageContext, options: dict[str, Any]) -> None:
    mesh = options["mesh"]
    _check_mesh(mesh, "shard")
    _check_specs(mesh, options.get("in_specs"), "in_specs")
    _check_specs(mesh, options.get("out_specs"), "out_specs")
    _check_spec_count(ctx, options.get("in_specs"), "in_specs")
    unknown = [a for a in options.get("axis_names", ()) if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"`axis_names` names {unknown[0]!r}, which is not an axis of the mesh {mesh.axis_names!r}.\n"
            f"List the mesh axes to map over manually, or leave axis_names out for all of them."
        )


def _explain_shard(inner: str, options: dict[str, Any]) -> tuple[str, str]:
    mesh = options["mesh"]
    extra = "".join(f", {k}={v!r}" for k, v in options.items() if k in ("axis_names", "check_vma"))
    code = f"{mesh_code(mesh, auto=True)}  # the mesh's devices with Auto axes"
    call = (
        f"jax.shard_map({inner}, mesh=mesh, in_specs={_spec_code(options['in_specs'], False)}, "
        f"out_specs={_spec_code(options['out_specs'], False)}{extra})"
    )
    return code, call


# --- .jit(mesh=...): NamedShardings from PartitionSpecs ---------------------------


def jit(fun: Callable[..., Any], /, *, mesh: Mesh | None = None, **options: Any) -> Any:
    """``jax.jit``; with ``mesh``, PartitionSpecs in ``in_shardings``/``out_shardings`` become ``NamedSharding``s."""
    if mesh is not None:
        for key in ("in_shardings", "out_shardings"):
            if key in options:
                options[key] = named(mesh, options[key])
    return jax.jit(fun, **options)


def _jit_signature() -> inspect.Signature:
    params = list(inspect.signature(jax.jit).parameters.values())
    mesh = inspect.Parameter("mesh", inspect.Parameter.KEYWORD_ONLY, default=None)
    return inspect.Signature([params[0], mesh, *params[1:]])


jit.__signature__ = _jit_signature()  # type: ignore[attr-defined]


def check_jit_shardings(ctx: StageContext, options: dict[str, Any]) -> None:
    """``.jit()``'s mesh and shardings: specs name the mesh's axes, one per positional argument."""
    mesh = options.get("mesh")
    if mesh is not None:
        _check_mesh(mesh, "jit")
    for key in ("in_shardings", "out_shardings"):
        if key not in options:
            continue
        if mesh is not None:
            _check_specs(mesh, options[key], key, allow=(jax.sharding.Sharding,))
        elif any(isinstance(leaf, P) for leaf in _spec_leaves(options[key])):
            raise ValueError(
                f"`{key}` holds PartitionSpecs, which name axes of a mesh, but `.jit()` got no mesh.\n"
                f"Pass it too: .jit(mesh=mesh, {key}=...), or give NamedSharding(mesh, spec) values."
            )
    if "in_shardings" in options and not ({"static_argnums", "static_argnames"} & options.keys()):
        _check_spec_count(ctx, options["in_shardings"], "in_shardings")


def explain_jit(inner: str, options: dict[str, Any]) -> str | tuple[str, str]:
    mesh = options.get("mesh")
    if mesh is None:
        args = format_options(options)
        return f"jax.jit({inner}{', ' + args if args else ''})"
    parts = [
        f"{k}={_spec_code(v, True) if k in ('in_shardings', 'out_shardings') else format_value(v)}"
        for k, v in options.items()
        if k != "mesh"
    ]
    return mesh_code(mesh), f"jax.jit({inner}{', ' + ', '.join(parts) if parts else ''})"


# --- .data_parallel(): the batch split along a mesh axis --------------------------


def _axis_names(axis: str | tuple[str, ...]) -> tuple[str, ...]:
    return axis if isinstance(axis, tuple) else (axis,)


def state_shardings(state: Any, mesh: Mesh, param_specs: Callable[..., P] | None) -> Any:
    """NamedShardings for a training state: ``param_specs`` for params and optimizer state, the rest replicated."""
    from jaxpipe._train import TrainState

    replicated = NamedSharding(mesh, P())
    if param_specs is None or not isinstance(state, TrainState):
        return jax.tree.map(lambda _: replicated, state)

    def by_rule(path: Any, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, param_specs(path, leaf))

    return state.replace(
        **{
            field: jax.tree.map(lambda _: replicated, getattr(state, field))
            for field in ("step", "key", "model_state", "data_key")
        },
        params=jax.tree.map_with_path(by_rule, state.params),
        opt_state=jax.tree.map_with_path(by_rule, state.opt_state),
    )


def data_parallel(
    step: Callable[..., Any],
    mesh: Mesh,
    axis: str | tuple[str, ...] = "data",
    param_specs: Callable[..., P] | None = None,
) -> Callable[..., Any]:
    """Splits each batch along the mesh axis ``axis`` and keeps the state replicated.

    Wraps a training step ``(state, batch) -> (state, metrics)``: XLA then runs
    each device on its slice of the batch and sums the gradients across devices,
    so the loss and the model are unchanged and the result matches one device.
    ``param_specs(path, array) -> PartitionSpec``, if given, shards parameters
    and optimizer state instead of replicating them. ``init`` places the state
    on the mesh and ``fit`` places each batch (per-process data across hosts).
    """
    mesh = auto_mesh(mesh)
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
        _check_split(mesh, spec, np.shape(leaf), label, where, "data_parallel")


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


class _OnMesh:
    """``init``/``fit`` hooks of one ``.data_parallel`` stage: place the state and the batches."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.mesh = auto_mesh(options["mesh"])
        self.axis = options.get("axis", "data")
        self.param_specs = options.get("param_specs")

    @hookimpl
    def jaxpipe_place_state(self, pipeline: Any, state: Any) -> Any:
        del pipeline  # one stage per run
        return place(state, state_shardings(state, self.mesh, self.param_specs))

    @hookimpl
    def jaxpipe_place_batch(self, run: Any, batch: Any, whole: bool) -> Any:
        from jaxpipe._train import scan_steps

        stacked = scan_steps(run.pipeline) > 1
        index = next(i for i, s in enumerate(run.pipeline.stages) if s.name == "data_parallel")
        if jax.process_count() == 1 or whole:
            try:
                check_batch(self.mesh, self.axis, batch, f".data_parallel(axis={self.axis!r})", stacked=stacked)
            except PipelineError as err:
                raise PipelineError(
                    err.detail + " With `fit`, choose a batch_size the mesh axis divides.",
                    stage=index + 1,
                    stage_name="data_parallel",
                    pipeline=repr(run.pipeline),
                ) from None
        return place_batch(batch, self.mesh, self.axis, stacked=stacked, whole=whole)


def _init_data_parallel(state: Any, key: Any, batch: Any, **options: Any) -> Any:
    del key, batch  # placing needs only the state
    mesh = auto_mesh(options["mesh"])
    return place(state, state_shardings(state, mesh, options.get("param_specs")))


def _check_data_parallel(ctx: StageContext, options: dict[str, Any]) -> None:
    mesh = options["mesh"]
    _check_mesh(mesh, "data_parallel")
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
    specs = options.get("param_specs")
    if specs is not None and not callable(specs):
        raise TypeError(
            f"`param_specs` must be a function (path, array) -> PartitionSpec, got {specs!r}; "
            f"e.g. param_specs=lambda path, x: P('data') if x.ndim == 2 else P()."
        )
    late = [s.name for s in ctx.stages if s.name in ("jit", "scan", "pmap", "shard", "data_parallel")]
    if late:
        raise ValueError(
            f"`.data_parallel()` wraps one training step, but it comes after `.{late[0]}()`.\n"
            f"Put it right after the training stages and before `.scan()`/`.jit()`, e.g. "
            f"Pipeline(loss).model(m).optimize(tx).data_parallel(mesh).jit()."
        )


def _explain_data_parallel(inner: str, options: dict[str, Any]) -> tuple[str, str]:
    axis = options.get("axis", "data")
    rule = options.get("param_specs")
    state, note = "replicated", ""
    if rule is not None:
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


def stage_kinds() -> list[StageKind]:
    """The sharding stage kinds, for ``BUILTIN_STAGES``."""
    from jaxpipe._stages import StageKind

    return [
        StageKind(
            "shard",
            shard,
            "jax.shard_map",
            check=_check_shard,
            explain=_explain_shard,
            keeps_signature=True,
            doc="Runs once per device on its block of each argument (`jax.shard_map`).",
        ),
        StageKind(
            "data_parallel",
            data_parallel,
            "",
            check=_check_data_parallel,
            explain=_explain_data_parallel,
            keeps_signature=True,
            init=_init_data_parallel,
            run_hooks=_OnMesh,
            doc="Splits each training batch along a mesh axis; the state stays replicated.",
        ),
    ]
