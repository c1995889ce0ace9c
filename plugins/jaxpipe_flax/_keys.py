"""Per-step keys of the ``.model`` stage: the ``rng=`` schemes, key streams, and which keys a model draws from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def typed(key: jax.Array) -> jax.Array:
    """A typed key; legacy ``jax.random.PRNGKey`` arrays are wrapped."""
    return key if is_key(key) else jax.random.wrap_key_data(key)


def is_key_stream(name: str) -> bool:
    """Whether an ``input=`` name absent from the batch is a per-step key: ``key``, ``rng``, ``z_rng``, ``x_key``."""
    lower = name.lower()
    return lower in ("key", "rng", "rngs", "keys") or lower.endswith(("_key", "_rng", "_rngs", "_keys"))


def step_keys(rng: Any, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
    """``(next state key, the model's keys)`` under the ``rng=`` scheme of ``.model``."""
    if rng == "split":
        key, dropout_key = jax.random.split(key)
        return key, dropout_key
    if rng == "fold_in":
        return key, jax.random.fold_in(key, step)
    return rng(key, step)


def scheme_line(rng: Any) -> str:
    """The hand-written line of the ``rng=`` scheme, as ``explain()`` prints it in both stages."""
    if rng == "fold_in":
        return "key, dropout_key = state.key, jax.random.fold_in(state.key, state.step)"
    if callable(rng):
        return f"key, dropout_key = {getattr(rng, '__name__', 'rng')}(state.key, state.step)"
    return "key, dropout_key = jax.random.split(state.key)"


def live(jaxpr: Any, invars: Sequence[Any]) -> list[bool]:
    """For each of ``invars``, whether it reaches an output or an effect of ``jaxpr`` (backward liveness)."""
    alive = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in alive for v in eqn.outvars):
            alive.update(id(v) for v in eqn.invars)
    return [id(v) in alive for v in invars]


def share(key: jax.Array, slots: Sequence[str]) -> dict[str, jax.Array]:
    """One key per slot: the key itself for one slot, ``jax.random.split(key, n)`` in slot order for several."""
    if len(slots) == 1:
        return {slots[0]: key}
    return dict(zip(slots, jax.random.split(key, len(slots)), strict=True))
