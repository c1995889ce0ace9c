"""PartitionSpecs for parameters: from Flax's partitioning annotations, by FSDP, or both.

``.data_parallel(mesh, param_specs=...)`` takes one of these sources besides a
``(path, array) -> PartitionSpec`` function:

- ``"annotations"``: Flax's partitioning metadata on each parameter, the boxes
  that ``nn.with_logical_partitioning(init, ("embed", "mlp"))``
  (``nn.LogicallyPartitioned``: logical names, mapped through ``rules``) and
  ``nn.with_partitioning(init, (None, "model"))`` (``nn.Partitioned``: mesh
  axis names) leave in Linen's ``params``. Unannotated parameters are
  replicated (with ``strict=True`` they are an error naming them).
- ``"fsdp"``: each parameter of at least :data:`FSDP_MIN_SIZE` elements is
  split over the data axis along its largest dimension that the axis divides;
  smaller ones, and those with no such dimension, are replicated.
- ``("annotations", "fsdp")``: annotations first (the model axis), then FSDP
  over the data axis on a dimension the annotations left whole.

The optimizer state follows its parameter: an ``opt_state`` leaf whose path
ends with a parameter's path (optax states mirror the parameters: ``[0].mu``
then the parameter's path) and has its shape gets that parameter's spec; other
leaves (counts, scalars) are replicated.

``rules`` is Flax's logical axis rules format, a sequence of ``(logical name,
mesh axis or None)``. As in ``nn.logical_to_mesh_axes``, each logical name
takes the first rule whose mesh axis is free in that spec; rules naming a mesh
axis this mesh lacks are skipped, so one set of rules serves a (data, model)
mesh and a data-only one. Without ``rules``: the active
``nn.logical_axis_rules(...)`` context, else each logical name that is a mesh
axis name maps to that axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpipe._stages.mesh import check_split
from jaxpipe.errors import PipelineError

FSDP_MIN_SIZE = 2**10  # parameters smaller than this (biases, norms) stay replicated under FSDP
SOURCES = ("annotations", "fsdp")

Path = tuple[Any, ...]


def is_box(x: Any) -> bool:
    """A Flax partitioning box (``nn.Partitioned``, ``nn.LogicallyPartitioned``): it knows its spec."""
    return callable(getattr(x, "get_partition_spec", None)) and callable(getattr(x, "unbox", None))


def _key(path: Path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def _label(path: Path) -> str:
    return f"params{jax.tree_util.keystr(tuple(path))}"


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """Where parameter specs come from: ``sources`` (of :data:`SOURCES`), over the data ``axis``."""

    sources: tuple[str, ...]
    axis: str | tuple[str, ...] = "data"
    rules: tuple[tuple[str, Any], ...] | None = None
    strict: bool = False

    def describe(self) -> str:
        parts = []
        if "annotations" in self.sources:
            rules = "the active nn.logical_axis_rules" if self.rules is None else f"rules={list(self.rules)!r}"
            parts.append(f"Flax partitioning annotations through {rules}")
        if "fsdp" in self.sources:
            parts.append(
                f"FSDP over {self.axis!r} along the largest dimension it divides (>= {FSDP_MIN_SIZE} elements)"
            )
        return "; ".join(parts)

    def param_specs(self, params: Any, mesh: Mesh) -> dict[tuple[str, ...], tuple[P, tuple[int, ...]]]:
        """``{leaf path: (spec, shape)}`` for every array leaf of ``params`` (boxes' values included)."""
        rules = self._rules(mesh) if "annotations" in self.sources else ()
        table: dict[tuple[str, ...], tuple[P, tuple[int, ...]]] = {}
        missing: list[str] = []
        for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
            names: tuple[Any, ...] | None = None
            if "annotations" in self.sources and is_box(node):
                names = _mesh_names(node, rules, mesh)
            elif "annotations" in self.sources:
                missing.append(_label(path))
            inner = jax.tree_util.tree_flatten_with_path(node)[0] if is_box(node) else [((), node)]
            for sub, leaf in inner:
                shape = tuple(np.shape(leaf))
                spec = self._spec(names, shape, mesh, _label(path))
                table[_key((*path, *sub))] = (spec, shape)
        if self.strict and missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise PipelineError(
                f"`param_specs='annotations', strict=True`: {len(missing)} parameter"
                f"{'s have' if len(missing) != 1 else ' has'} no partitioning annotation: {shown}.\n"
                f"Annotate them, e.g. nn.Dense(..., kernel_init=nn.with_logical_partitioning("
                f"nn.initializers.lecun_normal(), ('embed', 'mlp'))), or leave strict=False to replicate them.",
                stage_name="data_parallel",
            )
        return table

    def _rules(self, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
        if self.rules is not None:
            return self.rules
        # Flax only when annotations are asked for: `import jaxpipe` stays light.
        from flax.linen import get_logical_axis_rules

        active = tuple(get_logical_axis_rules())
        return active or tuple((name, name) for name in mesh.axis_names)

    def _spec(self, names: tuple[Any, ...] | None, shape: tuple[int, ...], mesh: Mesh, label: str) -> P:
        entries = list(names or ())
        if len(entries) > len(shape):
            raise PipelineError(
                f"`{label}` is annotated with {len(entries)} axis names {tuple(entries)!r}, but has shape {shape}.\n"
                f"Give one name (or None) per dimension.",
                stage_name="data_parallel",
            )
        entries += [None] * (len(shape) - len(entries))
        if "fsdp" in self.sources and math.prod(shape) >= FSDP_MIN_SIZE:
            data = self.axis if isinstance(self.axis, tuple) else (self.axis,)
            ways = math.prod(mesh.shape[a] for a in data)
            used = {a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))}
            free = [d for d, e in enumerate(entries) if e is None and shape[d] % ways == 0]
            if free and ways > 1 and not used & set(data):
                dim = max(free, key=lambda d: shape[d])  # the first of the largest
                entries[dim] = self.axis
        while entries and entries[-1] is None:
            entries.pop()
        spec = P(*entries)
        check_split(mesh, spec, shape, f"`{label}`", "data_parallel(param_specs=...)", "data_parallel")
        return spec


def _mesh_names(box: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[Any, ...]:
    """A box's names as mesh axes: logical ones through ``rules``; unknown or taken axes become None."""
    names = tuple(box.get_partition_spec())
    if hasattr(box, "rules"):  # nn.LogicallyPartitioned, whose own rules (if given) come first
        return logical_to_mesh(names, (*(box.rules or ()), *rules), mesh)
    return tuple(_present(n, mesh) for n in names)


def _present(entry: Any, mesh: Mesh) -> Any:
    """A mesh-axis entry with the axes this mesh lacks dropped (None if none is left)."""
    if entry is None:
        return None
    axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a in mesh.axis_names)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_mesh(names: Sequence[Any], rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[Any, ...]:
    """Logical axis names to mesh axes, Flax's way: the first rule whose mesh axis is free in this spec."""
    used: set[str] = set()
    out: list[Any] = []
    for name in names:
        chosen = None
        for logical, target in rules:
            if logical != name:
                continue
            entry = _present(target, mesh)
            if target is None:
                break  # an explicit "replicate this name"
            axes = set(entry if isinstance(entry, tuple) else (entry,)) if entry is not None else set()
            if entry is not None and not axes & used:
                chosen = entry
                used |= axes
                break
        out.append(chosen)
    return tuple(out)


def check_partitioning(param_specs: Any, rules: Any, strict: Any) -> None:
    """``param_specs``: a function, a source of :data:`SOURCES`, or a tuple of them; ``rules`` pairs."""
    example = "e.g. param_specs='annotations', param_specs='fsdp' or param_specs=('annotations', 'fsdp')"
    if isinstance(param_specs, (str, tuple)) and not isinstance(param_specs, P):
        sources = (param_specs,) if isinstance(param_specs, str) else param_specs
        bad = [s for s in sources if s not in SOURCES]
        if bad or not sources or len(set(sources)) != len(sources):
            raise ValueError(
                f"`param_specs={param_specs!r}` names {bad[0] if bad else 'no source or one twice'!r}; "
                f"the sources are {SOURCES!r} ({example})."
            )
    elif param_specs is not None and not callable(param_specs):
        raise TypeError(
            f"`param_specs` must be a function (path, array) -> PartitionSpec or a source name, got "
            f"{param_specs!r}; e.g. param_specs=lambda path, x: P('data') if x.ndim == 2 else P(), or {example}."
        )
    if rules is not None:
        ok = isinstance(rules, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in rules
        )
        if not ok:
            raise TypeError(
                f"`rules` must be a sequence of (logical name, mesh axis or None) pairs, got {rules!r}; "
                f"e.g. rules=[('batch', 'data'), ('embed', None), ('mlp', 'model'), ('heads', 'model')]."
            )
    if (rules is not None or strict) and not (
        isinstance(param_specs, (str, tuple))
        and "annotations" in ((param_specs,) if isinstance(param_specs, str) else param_specs)
    ):
        raise ValueError(
            f"`rules` and `strict` apply to Flax's annotations, but param_specs={param_specs!r}.\n"
            f"Ask for them: .data_parallel(mesh, param_specs='annotations', rules=...)."
        )


def partitioning(param_specs: Any, axis: Any, rules: Any, strict: bool) -> Any:
    """The checked option as what ``state_shardings`` takes: a function, a :class:`Partitioning`, or None."""
    if isinstance(param_specs, (str, tuple)) and not isinstance(param_specs, P):
        sources = (param_specs,) if isinstance(param_specs, str) else tuple(param_specs)
        frozen = (
            None
            if rules is None
            else tuple((str(a), b if b is None or isinstance(b, str) else tuple(b)) for a, b in rules)
        )
        return Partitioning(sources, axis, frozen, bool(strict))
    return param_specs


def opt_specs(opt_state: Any, table: dict[tuple[str, ...], tuple[P, tuple[int, ...]]]) -> Any:
    """A spec per optimizer-state leaf: its parameter's, matched by path suffix and shape; else ``P()``."""

    def follow(path: Path, leaf: Any) -> P:
        key, shape = _key(path), tuple(np.shape(leaf))
        for start in range(len(key)):
            found = table.get(key[start:])
            if found is not None and found[1] == shape:
                return found[0]
        return P()

    return jax.tree.map_with_path(follow, opt_state)
