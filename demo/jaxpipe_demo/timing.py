"""Paired timing for the demo's table and the benchmarks: candidates timed in interleaved rounds.

Not library code (``Pipeline.timing`` and ``%jit_timing`` use ``jaxpipe._tools.inspection``). It ships with the demo,
which prints the same comparison the benchmark scripts do; they import it through ``benchmarks/_timing.py``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax

from jaxpipe._tools.inspection import format_seconds as format_seconds
from jaxpipe._tools.inspection import steady_state


def paired_rounds(
    candidates: dict[str, Callable[..., Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    number: int,
    repeat: int,
) -> dict[str, list[float]]:
    """Per-call seconds of each candidate, timed in interleaved rounds.

    Each round times every candidate once (``number`` synchronised calls), in
    an order that flips every round, so that load from other processes and
    clock drift fall on all candidates alike; compare them round by round with
    :func:`paired_ratio`. Every candidate is called once first, to compile.
    """
    kwargs = kwargs or {}
    names = list(candidates)
    for name in names:
        jax.block_until_ready(candidates[name](*args, **kwargs))
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(repeat):
        for name in names if index % 2 == 0 else names[::-1]:
            rounds[name] += steady_state(candidates[name], args, kwargs, number=number, repeat=1)
    return rounds


def paired_ratio(rounds: list[float], baseline: list[float]) -> float:
    """The median over rounds of ``rounds[i] / baseline[i]``: robust to load that comes and goes."""
    return statistics.median(a / b for a, b in zip(rounds, baseline, strict=True))
