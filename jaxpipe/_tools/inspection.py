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

from jaxpipe._core import fold as _fold
from jaxpipe._tools import diagnose as _diagnose
from jaxpipe._tools.compile_cache import CompileEvents

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike


def _explained(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
    __tracebackhide__ = True
    try:
        return run()
    except Exception as err:
        located = _diagnose.located(pipe, err, args, kwargs)
        if located is err:
            raise
        raise located from err


def _lowerable(fn: Callable[..., Any]) -> Any:
    return fn if hasattr(fn, "lower") else jax.jit(fn)


def jaxpr(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    built = pipe.build()
    if hasattr(built, "trace"):
        return _explained(pipe, args, kwargs, lambda: built.trace(*args, **kwargs).jaxpr)
    return _explained(pipe, args, kwargs, lambda: jax.make_jaxpr(built)(*args, **kwargs))


def lower(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target = _lowerable(pipe.build())
    return _explained(pipe, args, kwargs, lambda: target.lower(*args, **kwargs))


def hlo(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any], *, dialect: str, optimized: bool) -> str:
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
        return _table(
            "cost",
            [("flops", self.flops), ("bytes accessed", self.bytes_accessed), ("transcendentals", self.transcendentals)],
            _number,
        )


def cost(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
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


def memory(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Memory:
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
    ``notes`` say where times came from a cache, or why JAX recompiled.
    """

    trace: float | None
    lower: float | None
    compile: float | None
    first_call: float
    best: float
    median: float
    number: int
    repeat: int
    notes: tuple[str, ...] = ()

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
        return "\n".join([_table("timing", self.rows, format_seconds), *self.notes])

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{format_seconds(v)}</td></tr>"
            for k, v in self.rows
        )
        notes = "".join(f"<pre>{html.escape(note)}</pre>" for note in self.notes)
        return f"<table class='jaxpipe-timing'>{cells}</table>{notes}"


def fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function under a new identity, so JAX's caches start empty."""

    @functools.wraps(fn)
    def fresh(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return fresh


def timing(pipe: PipelineLike, args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int, repeat: int) -> Timing:
    target = fresh_build(pipe)
    return _explained(pipe, args, kwargs, lambda: time_call(target, args, kwargs, number=number, repeat=repeat))


def fresh_build(pipe: PipelineLike) -> Callable[..., Any]:
    """The pipeline built around a fresh copy of its function: nothing cached yet, nothing shared."""
    return _fold.build(pipe.with_fn(fresh_copy(pipe.fn)))


def time_call(
    target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int | None, repeat: int
) -> Timing:
    """Times ``target(*args, **kwargs)``: the ahead-of-time stages of a jit object, then calls.

    ``number=None`` picks the calls per round to take about 0.1 s. When JAX's
    caches already held the traced program (``target`` ran on such arguments
    before), the times are those of the cache lookups, and a note says so.
    """
    if (number is not None and number < 1) or repeat < 1:
        raise ValueError(f"number and repeat must be at least 1, got number={number}, repeat={repeat}")
    trace = lower_time = compile_time = None
    notes = []
    if hasattr(target, "trace"):
        with CompileEvents() as events:
            start = time.perf_counter()
            traced = target.trace(*args, **kwargs)
            traced_at = time.perf_counter()
            lowered = traced.lower()
            lowered_at = time.perf_counter()
            lowered.compile()  # fills target's cache, so the next call runs this executable
            compiled_at = time.perf_counter()
        trace, lower_time, compile_time = traced_at - start, lowered_at - traced_at, compiled_at - lowered_at
        name = getattr(target, "__name__", "the function")
        if events.traces == 0:
            notes.append(
                f"trace, lower and compile came from JAX's caches: `{name}` had already been compiled for "
                f"arguments like these."
            )
        elif events.persistent_hits:
            notes.append("compile loaded the executable from the persistent compilation cache.")
    start = time.perf_counter()
    jax.block_until_ready(target(*args, **kwargs))
    first_call = time.perf_counter() - start
    if number is None:
        start = time.perf_counter()
        jax.block_until_ready(target(*args, **kwargs))
        number = max(1, min(10_000, int(0.1 / max(time.perf_counter() - start, 1e-7))))
    rounds = steady_state(target, args, kwargs, number=number, repeat=repeat)
    best, median = min(rounds), statistics.median(rounds)
    return Timing(trace, lower_time, compile_time, first_call, best, median, number, repeat, tuple(notes))


def steady_state(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int, repeat: int
) -> list[float]:
    """Per-call seconds of ``repeat`` rounds of ``number`` synchronised calls.

    A single array output syncs through its own ``block_until_ready()``, as a
    hand-written loop would: ``jax.block_until_ready`` walks a pytree, which
    costs microseconds per call, up to a quarter of a small jitted call's time.
    """
    block = jax.block_until_ready
    clock = time.perf_counter
    array_type: Any = None  # the concrete array class, once seen
    rounds = []
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            out = fn(*args, **kwargs)
            if type(out) is array_type:
                out.block_until_ready()
            elif isinstance(out, jax.Array):
                array_type = type(out)
                out.block_until_ready()
            else:
                block(out)
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
