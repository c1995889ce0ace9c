"""``jaxpipe.sharding_report``: where a sharded step's state lives, and what it sends between devices.

Bytes per device are read from each array's sharding (its shard's shape), the
activations from XLA's memory analysis of the compiled step, and the
collectives from the compiled HLO text: the operations XLA's partitioner put
in (``all-gather``, ``reduce-scatter``, ``all-reduce``, ...), each counted
once with the bytes of its result.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from jaxpipe._core.protocol import PipelineLike
from jaxpipe._tools.inspection import lower

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4}


def _hlo_bytes(shapes: str) -> int:
    """Bytes of an HLO result type, e.g. ``f32[32,64]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(shapes):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """``{operation: (count, bytes)}`` of the collectives in a compiled HLO module's text."""
    found: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for line in hlo.splitlines():
        match = _OP.search(line)
        if match is None:
            continue
        shapes, op, start = match.groups()
        if start and shapes.startswith("("):  # an async start's (operands, result): the result is last
            shapes = shapes.rsplit("[", 1)[0].rsplit(" ", 1)[-1] + "[" + shapes.rsplit("[", 1)[1]
        found[op][0] += 1
        found[op][1] += _hlo_bytes(shapes)
    return {op: (count, size) for op, (count, size) in found.items()}


def _per_device(tree: Any) -> tuple[int, int]:
    """(bytes on the fullest device, bytes of the whole arrays) for the arrays of ``tree``."""
    on_device: dict[Any, int] = collections.Counter()
    whole = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        itemsize = np.dtype(leaf.dtype).itemsize
        whole += leaf.size * itemsize
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
        for device in leaf.sharding.device_set:
            on_device[device] += shard
    return max(on_device.values(), default=0), whole


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    """Per-device bytes of a training step's state and activations, its parameters' specs and its collectives.

    Attributes:
      specs: ``{parameter path: PartitionSpec}`` (``None`` for a leaf not on a mesh).
      param_bytes, opt_state_bytes: on the fullest device.
      param_total_bytes, opt_state_total_bytes: of the whole (replicated) arrays, for the 1/N comparison.
      activation_bytes: XLA's temporaries of the compiled step on one device (None if unknown).
      collectives: ``{operation: (count, bytes of its results)}`` in the compiled step.
    """

    specs: dict[str, Any]
    param_bytes: int
    param_total_bytes: int
    opt_state_bytes: int
    opt_state_total_bytes: int
    activation_bytes: int | None
    collectives: dict[str, tuple[int, int]]

    def __str__(self) -> str:
        def share(part: int, whole: int) -> str:
            return f"{_size(part)} of {_size(whole)}" + (f" (1/{whole / part:.3g})" if part else "")

        lines = [
            "per device:",
            f"  params       {share(self.param_bytes, self.param_total_bytes)}",
            f"  opt_state    {share(self.opt_state_bytes, self.opt_state_total_bytes)}",
            f"  activations  {_size(self.activation_bytes)} (XLA temporaries of the compiled step)",
            "params (as jax.jit(step, in_shardings=...) would place them, NamedSharding(mesh, spec)):",
            *(f"  {path}: {spec!r}" for path, spec in self.specs.items()),
            "collectives in the compiled step:",
            *(f"  {op:<20} {count:>3} x, {_size(size)}" for op, (count, size) in self.collectives.items()),
        ]
        if not self.collectives:
            lines.append("  none")
        return "\n".join(lines)


def sharding_report(pipe: PipelineLike, state: Any, batch: Any) -> ShardingReport:
    """Where ``state`` lives and what the compiled step ``pipe(state, batch)`` communicates.

    Args:
      pipe: a training pipeline, e.g. ``trainer.data_parallel(mesh, param_specs="fsdp").jit()``.
      state: its state, as ``pipe.init`` made it (placed).
      batch: one batch, as the step is called with.

    Returns:
      A :class:`ShardingReport`; ``print`` it for a table.
    """
    compiled = lower(pipe, (state, batch), {}).compile()
    stats = compiled.memory_analysis()
    params, opt_state = getattr(state, "params", state), getattr(state, "opt_state", None)
    specs = {
        jax.tree_util.keystr(path): getattr(leaf.sharding, "spec", None)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    param_bytes, param_total = _per_device(params)
    opt_bytes, opt_total = _per_device(opt_state)
    return ShardingReport(
        specs=specs,
        param_bytes=param_bytes,
        param_total_bytes=param_total,
        opt_state_bytes=opt_bytes,
        opt_state_total_bytes=opt_total,
        activation_bytes=getattr(stats, "temp_size_in_bytes", None) if stats is not None else None,
        collectives=collectives(compiled.as_text()),
    )
