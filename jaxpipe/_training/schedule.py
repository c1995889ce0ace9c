"""Which calls a run makes: how many steps each, cut where periodic actions fire.

Every "each N steps" of a run (an epoch, a checkpoint's ``every``,
``eval_every``) is one :class:`Period`, and a call never runs
across one, so the action sees exactly the state at its step, however the
steps are grouped.
"""

from __future__ import annotations

import dataclasses
import math

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
        self.steps_per_epoch = steps_per_epoch
        epoch = [Period(steps_per_epoch)] if steps_per_epoch else []
        # ``.scan(k)`` fixes what a call runs; only epochs and the end cut it then.
        self.periods = [*epoch, *(periods if explicit is None else [])]
        self.log_every = 1
        self.capacity = explicit or min(steps_per_epoch or CAPACITY, total or CAPACITY, CAPACITY)

    def count(self, step: int) -> int:
        """Steps of the call that starts at ``step``."""
        n = self.k
        epoch = self.steps_per_epoch
        if self.auto and n > 1 and epoch and epoch % n == 0 and step % epoch % n:
            return 1  # after the measuring calls: single steps up to a multiple of k, then only full calls
        if self.total is not None:
            n = min(n, self.total - step)
        for period in self.periods:
            n = min(n, period.left(step))
        return max(n, 1)

    def measured(self, seconds_per_step: float, log_every: int) -> None:
        """Sets k so that a call takes about ``CALL_SECONDS``.

        Not aligned with ``log_every`` (metrics come back once per call, so the
        progress line moves every call at most): another ``log_every`` compiles
        no other program. A round number (1, 2, 5, 10, 20, 50, ...), so that the
        same k comes out run after run, then moved to a divisor of the epoch
        within a factor of 2 if there is one: every call of an epoch is then a
        full call (one program), with no remainder call at the epoch's end.
        """
        k = int(max(CALL_SECONDS / max(seconds_per_step, 1e-9), 1))
        k = min(max(v for v in _ROUND if v <= k), self.capacity)
        epoch = self.steps_per_epoch
        if epoch and 1 < k < epoch:
            near = [d for d in range(max(k // 2, 2), min(2 * k, self.capacity) + 1) if epoch % d == 0]
            if near:
                k = min(near, key=lambda d: (abs(math.log(d / k)), d))
        self.k, self.log_every = k, log_every
