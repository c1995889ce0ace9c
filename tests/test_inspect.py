"""jaxpr, hlo, cost, memory and timing report what the hand-written program's AOT views report."""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jaxpipe_demo.timing import paired_ratio, paired_rounds

from jaxpipe import Cost, Memory, Pipeline, PipelineError, Timing
from jaxpipe._tools.inspection import steady_state


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(x @ w) ** 2)


W, XS = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.linspace(0.0, 2.0, 32).reshape(8, 4)
PIPE = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
HAND = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))


def test_jaxpr_is_the_traced_program() -> None:
    assert str(PIPE.jaxpr(W, XS)) == str(HAND.trace(W, XS).jaxpr)
    unjitted = Pipeline(loss).grad().vmap(in_axes=(None, 0))
    assert str(unjitted.jaxpr(W, XS)) == str(jax.make_jaxpr(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(W, XS))
    assert "tanh" in str(unjitted.jaxpr(W, XS))


def instructions(compiled_text: str) -> str:
    """XLA's compiled HLO without source locations (which name the calling frames)."""
    body = compiled_text[compiled_text.index("\n%") :]
    return re.sub(r", metadata=\{[^}]*\}", "", body)


def test_hlo_is_the_lowered_text_and_optimized_is_the_compiled_text() -> None:
    assert PIPE.hlo(W, XS) == HAND.lower(W, XS).as_text()
    assert PIPE.hlo(W, XS, dialect="hlo") == HAND.lower(W, XS).as_text(dialect="hlo")
    optimized = PIPE.hlo(W, XS, optimized=True)
    assert "fusion" in optimized and "tanh" in optimized
    assert instructions(optimized) == instructions(HAND.lower(W, XS).compile().as_text())
    assert PIPE.hlo(W, XS).startswith("module @jit_loss")


def test_cost_is_the_compiled_cost_analysis() -> None:
    cost = PIPE.cost(W, XS)
    expected = HAND.lower(W, XS).compile().cost_analysis()
    assert isinstance(cost, Cost)
    assert cost.flops == expected["flops"] and cost.flops > 0
    assert cost.bytes_accessed == expected["bytes accessed"] and cost.bytes_accessed >= W.nbytes + XS.nbytes
    assert cost.transcendentals == expected.get("transcendentals", 0.0) and cost.transcendentals >= XS.shape[0] * 3
    assert cost.raw == dict(expected)
    assert str(cost).splitlines()[0] == "cost" and f"{cost.flops:,.0f}" in str(cost)
    # more work costs more
    assert Pipeline(loss).hessian().vmap(in_axes=(None, 0)).jit().cost(W, XS).flops > cost.flops


def test_memory_is_the_compiled_memory_analysis() -> None:
    memory = PIPE.memory(W, XS)
    stats = HAND.lower(W, XS).compile().memory_analysis()
    assert isinstance(memory, Memory)
    assert memory.argument_bytes == stats.argument_size_in_bytes == W.nbytes + XS.nbytes
    assert memory.output_bytes == stats.output_size_in_bytes == XS.shape[0] * W.nbytes
    assert memory.temp_bytes == stats.temp_size_in_bytes
    assert memory.total_bytes == memory.argument_bytes + memory.output_bytes + memory.temp_bytes - memory.alias_bytes
    assert "argument bytes" in str(memory)


def test_timing_fields_are_sensible() -> None:
    timing = PIPE.timing(W, XS, number=5, repeat=3)
    assert isinstance(timing, Timing)
    assert timing.trace > 0 and timing.lower > 0 and timing.compile > 0 and timing.first_call > 0
    assert timing.best > 0 and timing.median > 0
    assert (timing.number, timing.repeat) == (5, 3)
    assert [name for name, _ in timing.rows][:4] == ["trace", "lower", "compile", "first call"]
    assert str(timing).startswith("timing\n  trace") and "<table" in timing._repr_html_()


def test_timing_measures_per_call_time_over_number_times_repeat_calls() -> None:
    calls = []

    def sleepy(x: jax.Array) -> jax.Array:  # not jitted: each call runs this Python
        calls.append(1)
        time.sleep(0.002)
        return x

    timing = Pipeline(sleepy).timing(W, number=3, repeat=4)
    assert len(calls) == 1 + 3 * 4  # the first call, then repeat rounds of number calls
    assert 0.002 <= timing.best <= timing.median  # seconds per call (a sleep bounds it below; load, not above)
    assert timing.first_call >= 0.002


def test_timing_starts_from_empty_caches() -> None:
    PIPE(W, XS)  # warm this pipeline's own cache ...
    traces = []

    def counted(w: jax.Array, x: jax.Array) -> jax.Array:
        traces.append(1)
        return loss(w, x)

    pipe = Pipeline(counted).grad().jit()
    pipe(W, XS[0])
    pipe.timing(W, XS[0], number=2, repeat=2)
    assert len(traces) == 2  # ... timing traced (and so compiled) again, on a fresh copy


def test_timing_without_jit_has_no_compile_phases() -> None:
    timing = Pipeline(loss).grad().timing(W, XS[0], number=2, repeat=2)
    assert (timing.trace, timing.lower, timing.compile) == (None, None, None)
    assert timing.first_call > 0 and timing.best > 0
    assert "  trace" in str(timing) and "-" in str(timing).splitlines()[1]


def test_timing_rejects_empty_rounds() -> None:
    with pytest.raises(ValueError, match="number and repeat must be at least 1"):
        PIPE.timing(W, XS, number=0)


def test_inspection_of_a_bad_call_explains_the_error() -> None:
    with pytest.raises(PipelineError, match="return a scalar"):
        Pipeline(lambda w, x: x @ w, name="forward").grad().jit().cost(W, XS)


def test_steady_state_and_paired_rounds_count_calls() -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}

    def counter(name: str) -> Any:
        def call(x: jax.Array) -> jax.Array:
            calls[name] += 1
            return x

        return call

    assert len(steady_state(counter("a"), (W,), {}, number=4, repeat=3)) == 3
    assert calls["a"] == 12
    calls["a"] = 0
    rounds = paired_rounds({"a": counter("a"), "b": counter("b")}, (W,), number=5, repeat=4)
    assert {k: len(v) for k, v in rounds.items()} == {"a": 4, "b": 4}
    assert calls == {"a": 1 + 5 * 4, "b": 1 + 5 * 4}  # one warm-up call each, then the rounds
    assert all(t > 0 for t in rounds["a"] + rounds["b"])


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    assert paired_ratio([2.0, 3.0, 30.0], [1.0, 1.0, 10.0]) == 3.0
    assert paired_ratio([1.0, 2.0], [2.0, 2.0]) == 0.75
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
