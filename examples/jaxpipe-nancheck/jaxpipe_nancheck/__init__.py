"""A jaxpipe plugin adding ``.check_finite()``: NaN/Inf in the outputs raise, naming the leaf.

Put the stage last, after ``.jit()``::

    step = Pipeline(loss).value_and_grad().jit().check_finite()

Added after transforms but before any compile (``.grad().check_finite()``), or
followed by another stage (``.check_finite().jit()``), it is refused when added,
with that advice; directly on a plain function it checks the eager outputs.

The check runs on the host after the compiled call: one small fused reduction
over the output leaves (NaN and Inf counts per leaf) and one transfer of those
counts, so the compiled program itself is unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxpipe

__all__ = ["NonFiniteError", "check_finite", "jaxpipe_register_stages"]


class NonFiniteError(jaxpipe.PipelineError, FloatingPointError):
    """An output leaf holds NaN or Inf.

    Attributes:
      path: the leaf's pytree path as written by ``jax.tree_util.keystr``, e.g.
        ``"['params']['w']"`` (``""`` when the output is a single array).
      nan_count: how many of its values are NaN.
      inf_count: how many are +Inf or -Inf.
    """

    def __init__(self, message: str, *, path: str, nan_count: int, inf_count: int) -> None:
        self.path, self.nan_count, self.inf_count = path, nan_count, inf_count
        super().__init__(message)


def check_finite(fn: Callable[..., Any], inf: bool = True) -> Callable[..., Any]:
    """Raises NonFiniteError when an output of ``fn`` holds NaN (or Inf, if ``inf``).

    Use as the last stage, after ``.jit()``: the outputs must be concrete arrays.
    """

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        _raise_if_nonfinite(out, getattr(fn, "__name__", "the function"), inf)
        return out

    for name in ("trace", "lower", "eval_shape"):  # the compiled program is fn's: keep its AOT API
        if hasattr(fn, name):
            setattr(checked, name, getattr(fn, name))
    return checked


@jax.jit
def _bad_counts(leaves: list[jax.Array]) -> jax.Array:
    """``[[NaN count, Inf count], ...]``, one row per leaf, in one compiled program."""
    return jnp.stack([jnp.stack([jnp.isnan(x).sum(), jnp.isinf(x).sum()]) for x in leaves])


def _raise_if_nonfinite(out: Any, fn_name: str, inf: bool) -> None:
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        if isinstance(leaf, jax.core.Tracer):
            raise jaxpipe.PipelineError(
                "`.check_finite()` needs concrete outputs, but it ran inside a JAX transform that "
                "passes abstract tracers.\nPut `.check_finite()` last, after `.jit()`, e.g. "
                "Pipeline(f).grad().jit().check_finite()."
            )
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if jnp.issubdtype(dtype, jnp.inexact):
            paths.append(path)
            leaves.append(leaf)
    if not leaves:
        return
    counts = np.array(_bad_counts(leaves))  # a writable copy on the host
    if not inf:
        counts[:, 1] = 0
    bad = np.flatnonzero(counts.sum(axis=1))
    if bad.size == 0:
        return
    first = int(bad[0])
    nans, infs = (int(c) for c in counts[first])
    leaf = jnp.asarray(leaves[first])
    path = jax.tree_util.keystr(paths[first])
    where = f"output leaf {path}" if path else "the output"
    found = " and ".join(text for count, text in ((nans, f"{nans} NaN"), (infs, f"{infs} Inf")) if count)
    others = f"; {bad.size - 1} more leaves hold some too" if bad.size > 1 else ""
    raise NonFiniteError(
        f"`{fn_name}` returned {found} in {where} ({leaf.dtype}{list(leaf.shape)}, {leaf.size} values){others}.\n"
        f"To find the operation that made it, run with jax.config.update('jax_debug_nans', True) "
        f"(or 'jax_debug_infs'), or use .debug() in place of .jit() and print intermediate values.",
        path=path,
        nan_count=nans,
        inf_count=infs,
    )


def _compiles(stage: jaxpipe.Stage) -> bool:
    """Whether the stage's outputs are concrete arrays: it compiles or places the computation on devices."""
    return stage.kind.compiles or stage.kind.distributes


def _check_options(context: jaxpipe.StageContext, options: dict[str, Any]) -> None:
    if not isinstance(options.get("inf", True), bool):
        raise TypeError(f"`inf` must be True or False, got {options['inf']!r}.")
    if context.stages and not any(_compiles(stage) for stage in context.stages):
        # transforms without a compile before it: the outputs would be tracers once a `.jit()` follows
        written = "".join(f".{stage.name}()" for stage in context.stages)
        raise ValueError(
            f"`.check_finite()` checks the concrete outputs of a compiled function, so it goes after `.jit()`, "
            f"not before: Pipeline({context.fn_name}){written}.jit().check_finite()."
        )


@jaxpipe.hookimpl
def jaxpipe_register_stages() -> list[jaxpipe.StageKind]:
    return [
        jaxpipe.StageKind(
            "check_finite",
            check_finite,
            jax_name="jaxpipe_nancheck.check_finite",
            check=_check_options,
            keeps_signature=True,
            last=True,  # a transform after it would hand it tracers
            doc="Raises NonFiniteError naming the output leaf that holds NaN/Inf; put it after `.jit()`.",
        )
    ]
