"""Which calls a run makes: how many steps each, cut where periodic actions fire.

Every "each N steps" of a run (an epoch, a checkpoint's ``every``,
``log_every``, ``eval_every``) is one :class:`Period`, and a call never runs
across one, so the action sees exactly the state at its step, however the
steps are grouped.
"""

from __future__ import annotations

import dataclasses

CALL_SECONDS = 0.2  # a call's target length: Ctrl-C and Stop act within about two calls
CAPACITY = 4096  # most steps in one call (the metrics buffer's rows)
_ROUND = [m * 10**e for e in range(7) for m in (1, 2, 5)]


@dataclasses.dataclass(frozen=True)
class Period:
    """Every ``steps`` steps, counted from step 0."""

    steps: int

    def left(self, step: int) -> int:
        """Steps from ``step`` to the next multiple."""
        return self.steps - step % self.steps

    def crossed(self, first: int, last: int) -> bool:
        """Whether a call from step ``first`` to ``last`` reached a multiple."""
        return last // self.steps > first // self.steps


class Schedule:
    """How many steps the next call runs: k, cut at the end and at every period.

    ``k`` is given (``.scan(k)``, a hook that sees every step) or measured:
    :meth:`measured` sets it so that a call takes about ``CALL_SECONDS``.
    """

    def __init__(self, explicit: int | None, steps_per_epoch: int | None, total: int | None, periods: list[Period]):
        self.k = explicit or 1
        self.auto = explicit is None
        self.total = total
        epoch = [Period(steps_per_epoch)] if steps_per_epoch else []
        # ``.scan(k)`` fixes what a call runs; only epochs and the end cut it then.
        self.periods = [*epoch, *(periods if explicit is None else [])]
        self.log_every = 1
        self.capacity = explicit or min(steps_per_epoch or CAPACITY, total or CAPACITY, CAPACITY)

    def count(self, step: int) -> int:
        """Steps of the call that starts at ``step``."""
        n = self.k
        if self.auto and self.log_every <= n < self.capacity:  # calls end on multiples of log_every, unless whole
            # epochs (or the whole run): then the metrics of every step come back at the epoch's end anyway
            end = (step + n) // self.log_every * self.log_every
            n = end - step if end > step else n
        if self.total is not None:
            n = min(n, self.total - step)
        for period in self.periods:
            n = min(n, period.left(step))
        return max(n, 1)

    def measured(self, seconds_per_step: float, log_every: int) -> None:
        """Sets k so that a call takes about ``CALL_SECONDS``, aligned with ``log_every``."""
        k = int(max(CALL_SECONDS / max(seconds_per_step, 1e-9), 1))
        # A round number (1, 2, 5, 10, 20, 50, ...): the same k run after run, so streamed calls,
        # whose stacked batches have k rows, reuse one compiled program.
        k = min(max(v for v in _ROUND if v <= k), self.capacity)
        if log_every <= k < self.capacity:
            k -= k % log_every
        elif k < self.capacity:  # a whole epoch per call needs no rounding
            k = max(d for d in range(1, k + 1) if log_every % d == 0)
        self.k, self.log_every = k, log_every
