"""Meshes and PartitionSpecs: the checks and the source text shared by the sharding stages.

Meshes from ``jax.make_mesh`` have ``Explicit`` axes by default, under which
``jax.shard_map`` and sharding constraints want their inputs already placed.
``.shard`` and ``.data_parallel`` therefore run over the same devices and axis
names with ``Auto`` axes (:func:`auto_mesh`), where NumPy inputs and placed
arrays both work. The checks name the spec or mesh axis at fault before
anything is traced.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe._core.signature import positional_range
from jaxpipe.errors import PipelineError

if TYPE_CHECKING:
    from jaxpipe._core.stage import StageContext


def is_spec(x: Any) -> bool:
    return isinstance(x, P) or x is None


def spec_leaves(specs: Any) -> list[Any]:
    return jax.tree.leaves(specs, is_leaf=is_spec)


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
    return jax.tree.map(lambda s: NamedSharding(mesh, s) if isinstance(s, P) else s, specs, is_leaf=is_spec)


def check_mesh(mesh: Any, stage: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`.{stage}()` needs a `jax.sharding.Mesh` as `mesh`, got {type(mesh).__name__} {mesh!r}.\n"
            f"Make one over the devices, e.g. mesh = jax.make_mesh((jax.device_count(),), ('data',))."
        )


def check_specs(mesh: Mesh, specs: Any, key: str, allow: tuple[type, ...] = ()) -> None:
    """Every leaf is a PartitionSpec (or None/``allow``) naming only axes of ``mesh``."""
    leaves = spec_leaves(specs)
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


def check_spec_count(ctx: StageContext, specs: Any, key: str) -> None:
    """A tuple of specs needs one entry per positional argument, when the signature is known."""
    bounds = positional_range(ctx.signature)
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


def spec_code(specs: Any, wrap: bool) -> str:
    """Specs as source text; ``wrap`` writes each as ``NamedSharding(mesh, P(...))``."""
    if isinstance(specs, P):
        return f"NamedSharding(mesh, {specs!r})" if wrap else repr(specs)
    if isinstance(specs, (tuple, list)):
        inner = ", ".join(spec_code(s, wrap) for s in specs)
        return f"({inner},)" if len(specs) == 1 else f"({inner})"
    if isinstance(specs, dict):
        return "{" + ", ".join(f"{k!r}: {spec_code(v, wrap)}" for k, v in specs.items()) + "}"
    return repr(specs)


def check_split(mesh: Mesh, spec: Any, shape: tuple[int, ...], label: str, where: str, stage: str) -> None:
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
