"""``jaxpipe demo``: the main job, end to end, against hand-written JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._inspect import format_seconds, steady_state
from jaxpipe._pipeline import Pipeline


def _linear_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return (x @ w - y) ** 2


def per_example_gradients(quick: bool = False) -> None:
    """Per-example gradients: the pipeline, its JAX, its numbers and its speed."""
    print("== per-example gradients ==")
    pipe = Pipeline(_linear_loss, name="loss").grad().vmap(in_axes=(None, 0, 0)).jit()
    print(pipe)
    print("equivalent JAX:", pipe.explain())
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=16), jnp.float32)
    x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=256), jnp.float32)
    hand = jax.jit(jax.vmap(jax.grad(_linear_loss), in_axes=(None, 0, 0)))
    ours, theirs = pipe(w, x, y), hand(w, x, y)
    same_program = pipe.hlo(w, x, y) == hand.lower(w, x, y).as_text()
    print(f"output {ours.shape}, equal to hand-written: {bool(jnp.array_equal(ours, theirs))}, "
          f"same lowered program: {same_program}")
    number, repeat = (200, 3) if quick else (2000, 7)
    timing = pipe.timing(w, x, y, number=number, repeat=repeat)
    print(timing)
    built = pipe.build()
    a = min(steady_state(built, (w, x, y), {}, number=number, repeat=repeat))
    b = min(steady_state(hand, (w, x, y), {}, number=number, repeat=repeat))
    print(f"steady state: pipeline {format_seconds(a)}, hand-written {format_seconds(b)}, ratio {a / b:.3f}")


def main(quick: bool = False) -> int:
    per_example_gradients(quick)
    return 0
