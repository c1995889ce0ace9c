"""Core overhead of jaxpipe against hand-written JAX, in one process.

Run: .venv/bin/python benchmarks/overhead.py [--quick]

1. Steady-state call time on a small, dispatch-bound input, in paired
   interleaved rounds with ``block_until_ready``: ``pipe.build()`` (the plain
   ``jax.jit`` object, goal <= 1.01) and ``pipe(...)`` (goal <= 1.10) against
   ``jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))``.
2. Time to construct and build a five-stage pipeline (compile excluded),
   next to the time JAX itself takes to create the same transforms.
3. Extra import time of ``import jaxpipe`` over ``import jax`` (fresh
   subprocesses, median).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import timeit

import jax
import jax.numpy as jnp
from _timing import format_seconds, paired_ratio, paired_rounds

from jaxpipe import Pipeline


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def call_overhead(number: int, repeat: int) -> dict[str, float]:
    w, x = jnp.ones((4, 2)), jnp.ones((3, 4))  # tiny: the call is all dispatch
    hand = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
    pipe = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    built = pipe.build()
    assert pipe.hlo(w, x) == hand.lower(w, x).as_text()  # the same program, so only dispatch differs
    rounds = paired_rounds({"hand": hand, "build": built, "pipe": pipe}, (w, x), number=number, repeat=repeat)
    hand_s = statistics.median(rounds["hand"])
    print(
        f"steady-state call, hand-written jax.jit(...): {format_seconds(hand_s)} per call (median of {repeat} rounds)"
    )
    ratios = {}
    for name, goal in (("build", 1.01), ("pipe", 1.10)):
        ratios[name] = paired_ratio(rounds[name], rounds["hand"])
        label = "pipe.build()(...)" if name == "build" else "pipe(...)"
        print(
            f"  {label:<18} {format_seconds(statistics.median(rounds[name]))}  ratio {ratios[name]:.3f}  "
            f"(goal <= {goal:.2f}: {'met' if ratios[name] <= goal else 'MISSED'})"
        )
    return ratios


def five_stages() -> Pipeline:
    return Pipeline(loss).remat().grad().vmap(in_axes=(None, 0)).vmap(in_axes=(None, 0)).jit()


def hand_five_stages() -> object:
    return jax.jit(jax.vmap(jax.vmap(jax.grad(jax.checkpoint(loss)), in_axes=(None, 0)), in_axes=(None, 0)))


def construction(number: int, repeat: int) -> None:
    """Paired rounds: construct; construct + build; JAX alone creating the same transforms."""
    candidates = {
        "construct": five_stages,
        "total": lambda: five_stages().build(),
        "jax": hand_five_stages,
    }
    rounds: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for index in range(repeat):
        for name in names if index % 2 == 0 else names[::-1]:
            rounds[name].append(timeit.timeit(candidates[name], number=number) / number)
    median = {name: statistics.median(times) for name, times in rounds.items()}
    ours = statistics.median(t - j for t, j in zip(rounds["total"], rounds["jax"], strict=True))
    print(f"five-stage pipeline {five_stages()!r} (median of {repeat} paired rounds):")
    print(f"  construct {format_seconds(median['construct'])}, construct + build {format_seconds(median['total'])}")
    print(f"  of which JAX creating the transforms (hand-written): {format_seconds(median['jax'])}")
    print(f"  jaxpipe's own share: {format_seconds(ours)} (goal < 100 µs: {'met' if ours < 100e-6 else 'MISSED'})")


def import_time(runs: int) -> None:
    code = (
        "import time; t0 = time.perf_counter(); import jax; t1 = time.perf_counter(); "
        "import jaxpipe; t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    extra, base = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        jax_s, jaxpipe_s = map(float, out.split())
        base.append(jax_s)
        extra.append(jaxpipe_s)
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, jaxpipe; print(*[m for m in ('flax', 'optax', 'orbax', 'IPython', "
            "'ipywidgets', 'tqdm', 'matplotlib') if m in sys.modules])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    extra_s = statistics.median(extra)
    print(
        f"import jax: {format_seconds(statistics.median(base))}; import jaxpipe on top: {format_seconds(extra_s)} "
        f"(median of {runs} fresh processes; goal < 0.15 s: {'met' if extra_s < 0.15 else 'MISSED'})"
    )
    print(f"  heavy libraries imported by `import jaxpipe`: {', '.join(heavy) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test")
    quick = parser.parse_args().quick
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    call_overhead(number=200 if quick else 500, repeat=5 if quick else 101)
    construction(number=100 if quick else 500, repeat=5 if quick else 21)
    import_time(runs=3 if quick else 9)


if __name__ == "__main__":
    main()
