"""``.shard`` (``jax.shard_map``) and ``.jit(mesh=...)`` (``jax.jit`` with ``NamedSharding``s)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpipe._core.format import format_options, format_value
from jaxpipe._core.signature import signature_of
from jaxpipe._stages.mesh import (
    auto_mesh,
    check_mesh,
    check_spec_count,
    check_specs,
    check_split,
    is_spec,
    mesh_code,
    named,
    spec_code,
    spec_leaves,
)
from jaxpipe.errors import PipelineError

if TYPE_CHECKING:
    from jaxpipe._core.stage import StageContext


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
    signature = signature_of(fn)
    arg_names = list(signature.parameters) if signature is not None else []

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
            pairs = jax.tree.leaves_with_path(jax.tree.broadcast(spec, arg, is_leaf=is_spec), is_leaf=is_spec)
        except ValueError as err:
            raise PipelineError(
                f"`{where}`: the spec for `{name}` does not match its structure: {err}\n"
                f"Give one PartitionSpec for the whole argument, or a tree of them shaped like it.",
                stage_name="shard",
            ) from err
        leaves = jax.tree.leaves(arg)
        for (path, leaf_spec), leaf in zip(pairs, leaves, strict=False):
            label = f"`{name}{jax.tree_util.keystr(path)}`"
            check_split(mesh, leaf_spec, np.shape(leaf), label, where, "shard")


def check_shard(ctx: StageContext, options: dict[str, Any]) -> None:
    mesh = options["mesh"]
    check_mesh(mesh, "shard")
    check_specs(mesh, options.get("in_specs"), "in_specs")
    check_specs(mesh, options.get("out_specs"), "out_specs")
    check_spec_count(ctx, options.get("in_specs"), "in_specs")
    unknown = [a for a in options.get("axis_names", ()) if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"`axis_names` names {unknown[0]!r}, which is not an axis of the mesh {mesh.axis_names!r}.\n"
            f"List the mesh axes to map over manually, or leave axis_names out for all of them."
        )


def explain_shard(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the same call whatever it wraps
    mesh = options["mesh"]
    extra = "".join(f", {k}={v!r}" for k, v in options.items() if k in ("axis_names", "check_vma"))
    code = f"{mesh_code(mesh, auto=True)}  # the mesh's devices with Auto axes"
    call = (
        f"jax.shard_map({inner}, mesh=mesh, in_specs={spec_code(options['in_specs'], False)}, "
        f"out_specs={spec_code(options['out_specs'], False)}{extra})"
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
        check_mesh(mesh, "jit")
    for key in ("in_shardings", "out_shardings"):
        if key not in options:
            continue
        if mesh is not None:
            check_specs(mesh, options[key], key, allow=(jax.sharding.Sharding,))
        elif any(isinstance(leaf, P) for leaf in spec_leaves(options[key])):
            raise ValueError(
                f"`{key}` holds PartitionSpecs, which name axes of a mesh, but `.jit()` got no mesh.\n"
                f"Pass it too: .jit(mesh=mesh, {key}=...), or give NamedSharding(mesh, spec) values."
            )
    if "in_shardings" in options and not ({"static_argnums", "static_argnames"} & options.keys()):
        check_spec_count(ctx, options["in_shardings"], "in_shardings")


def explain_jit(ctx: StageContext, inner: str, options: dict[str, Any]) -> str | tuple[str, str]:
    del ctx  # the same call whatever it wraps
    mesh = options.get("mesh")
    if mesh is None:
        args = format_options(options)
        return f"jax.jit({inner}{', ' + args if args else ''})"
    parts = [
        f"{k}={spec_code(v, True) if k in ('in_shardings', 'out_shardings') else format_value(v)}"
        for k, v in options.items()
        if k != "mesh"
    ]
    return mesh_code(mesh), f"jax.jit({inner}{', ' + ', '.join(parts) if parts else ''})"
