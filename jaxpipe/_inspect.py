"""What a pipeline compiles to and costs: jaxpr, lowered text, cost, memory, timings.

Everything goes through JAX's ahead-of-time API (``trace -> lower -> compile``)
on the built callable; a pipeline that does not end in ``.jit()`` is wrapped in
``jax.jit`` for these views only.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from jaxpipe import _diagnose

if TYPE_CHECKING:
    from jaxpipe._pipeline import Pipeline


def _explained(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
    __tracebackhide__ = True
    try:
        return run()
    except Exception as err:
        explained = _diagnose.explain_error(pipe, err, args, kwargs)
        if explained is None:
            raise
        raise explained from err


def _lowerable(fn: Callable[..., Any]) -> Any:
    return fn if hasattr(fn, "lower") else jax.jit(fn)


def jaxpr(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    built = pipe.build()
    if hasattr(built, "trace"):
        return _explained(pipe, args, kwargs, lambda: built.trace(*args, **kwargs).jaxpr)
    return _explained(pipe, args, kwargs, lambda: jax.make_jaxpr(built)(*args, **kwargs))


def lower(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target = _lowerable(pipe.build())
    return _explained(pipe, args, kwargs, lambda: target.lower(*args, **kwargs))


def hlo(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], *, dialect: str, optimized: bool) -> str:
    lowered = lower(pipe, args, kwargs)
    if optimized:
        return lowered.compile().as_text()
    return lowered.as_text(dialect=dialect)


@dataclasses.dataclass(frozen=True)
class Cost:
    """XLA's cost estimate of the compiled program (None where the backend gives none)."""

    flops: float | None
    bytes_accessed: float | None
    transcendentals: float | None
    raw: dict[str, float]

    def __str__(self) -> str:
        return _table("cost", [("flops", self.flops), ("bytes accessed", self.bytes_accessed),
                               ("transcendentals", self.transcendentals)], _number)


def cost(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    analysis = lower(pipe, args, kwargs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device
        analysis = analysis[0] if analysis else None
    raw = dict(analysis or {})
    return Cost(raw.get("flops"), raw.get("bytes accessed"), raw.get("transcendentals", 0.0 if raw else None), raw)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Sizes in bytes of the compiled program's buffers (None where unknown)."""

    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    alias_bytes: int | None
    generated_code_bytes: int | None

    @property
    def total_bytes(self) -> int | None:
        parts = (self.argument_bytes, self.output_bytes, self.temp_bytes)
        if any(p is None for p in parts):
            return None
        return sum(parts) - (self.alias_bytes or 0)  # type: ignore[arg-type]

    def __str__(self) -> str:
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in dataclasses.fields(self)]
        return _table("memory", [*rows, ("total bytes", self.total_bytes)], _number)


def memory(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Memory:
    stats = lower(pipe, args, kwargs).compile().memory_analysis()

    def read(name: str) -> int | None:
        return getattr(stats, name, None) if stats is not None else None

    return Memory(
        read("argument_size_in_bytes"),
        read("output_size_in_bytes"),
        read("temp_size_in_bytes"),
        read("alias_size_in_bytes"),
        read("generated_code_size_in_bytes"),
    )


@dataclasses.dataclass(frozen=True)
class Timing:
    """Where the time of a call goes, in seconds.

    ``trace``, ``lower`` and ``compile`` are None for a pipeline that is not
    compiled as a whole (no ``.jit()``/``.pmap()`` stage at the end).
    ``first_call`` is the first run of the compiled program; ``best`` and
    ``median`` are per-call times over ``repeat`` rounds of ``number`` calls.
    """

    trace: float | None
    lower: float | None
    compile: float | None
    first_call: float
    best: float
    median: float
    number: int
    repeat: int

    @property
    def rows(self) -> list[tuple[str, float | None]]:
        return [
            ("trace", self.trace),
            ("lower", self.lower),
            ("compile", self.compile),
            ("first call", self.first_call),
            (f"steady best of {self.repeat}x{self.number}", self.best),
            ("steady median", self.median),
        ]

    def __str__(self) -> str:
        return _table("timing", self.rows, format_seconds)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{format_seconds(v)}</td></tr>"
            for k, v in self.rows
        )
        return f"<table class='jaxpipe-timing'>{cells}</table>"


def fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function under a new identity, so JAX's caches start empty."""

    @functools.wraps(fn)
    def fresh(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return fresh


def timing(pipe: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int, repeat: int) -> Timing:
    from jaxpipe._pipeline import Pipeline

    if number < 1 or repeat < 1:
        raise ValueError(f"number and repeat must be at least 1, got number={number}, repeat={repeat}")
    target = Pipeline._make(fresh_copy(pipe.fn), pipe._name, pipe.stages).build()
    trace = lower_time = compile_time = None
    if hasattr(target, "trace"):
        start = time.perf_counter()
        traced = _explained(pipe, args, kwargs, lambda: target.trace(*args, **kwargs))
        traced_at = time.perf_counter()
        lowered = traced.lower()
        lowered_at = time.perf_counter()
        lowered.compile()  # fills target's cache, so the next call runs this executable
        compiled_at = time.perf_counter()
        trace, lower_time, compile_time = traced_at - start, lowered_at - traced_at, compiled_at - lowered_at
    start = time.perf_counter()
    jax.block_until_ready(_explained(pipe, args, kwargs, lambda: target(*args, **kwargs)))
    first_call = time.perf_counter() - start
    rounds = steady_state(target, args, kwargs, number=number, repeat=repeat)
    return Timing(trace, lower_time, compile_time, first_call, min(rounds), statistics.median(rounds), number, repeat)


def steady_state(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int, repeat: int
) -> list[float]:
    """Per-call seconds of ``repeat`` rounds of ``number`` synchronised calls."""
    block = jax.block_until_ready
    clock = time.perf_counter
    rounds = []
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            block(fn(*args, **kwargs))
        rounds.append((clock() - start) / number)
    return rounds


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(title: str, rows: list[tuple[str, Any]], fmt: Callable[[Any], str]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {fmt(v):>12}" for k, v in rows)])
