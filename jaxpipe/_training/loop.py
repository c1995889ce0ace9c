"""The training loop: one loop over planned calls, made of the run's parts.

Each call: the :mod:`schedule` says how many steps; the data source
(:mod:`sources`) gives its input; a compiled program (:mod:`program`) runs it
on the donated state; the :mod:`readback` takes its metrics one call late;
the :mod:`callbacks` see it. Modes: ``"device"`` (the data set on the device),
``"stream"`` (host batches copied a call ahead into the same kind of program)
and ``"host"`` (a pipeline ``fit`` cannot re-compile, e.g. without ``.jit()``:
called as built).

How many steps a call runs is measured, not assumed: the first calls run
one step each at the program's top level (the plain jitted step) and are
timed; a many-step call is kept only if, timed in turn, its steps are faster.
(XLA:CPU runs some steps, convolutions above all, far slower inside a loop.)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core import caches
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.run import FitRun, metrics_of
from jaxpipe._core.steps import fit_calls, scan_steps, stacks_batches
from jaxpipe._tools import diagnose
from jaxpipe._training import data as host_data
from jaxpipe._training import program as compiled
from jaxpipe._training.callbacks import Callbacks
from jaxpipe._training.evaluate import evaluate
from jaxpipe._training.plan import Plan
from jaxpipe._training.readback import NonFinite, PendingCall, Readback, Rows
from jaxpipe._training.schedule import Period, Schedule
from jaxpipe._training.sources import Call, DeviceArrays, Streamed, call_input, pad
from jaxpipe.errors import NonFiniteError

_LOOP_MARGIN = 0.97  # a many-step call is kept when its steps take under 97% of a single step's time
# A step at least this long gains under about 1% from a loop (what a loop saves is the call's dispatch and
# fit's bookkeeping, ~0.1 ms): such a run keeps one step per call and never compiles or times a loop.
_LOOP_WORTH = 0.01
# The non-finite guard's snapshot: a copy of a state known finite, taken at most this often (and when the
# streamed batches kept for replaying the calls since the last one pass _SNAPSHOT_BYTES).
_SNAPSHOT_SECONDS = 5.0
_SNAPSHOT_BYTES = 256 * 2**20


class Measured:
    """Step times measured by earlier runs of a pipeline on batches like these (a notebook's next run, a sweep).

    A run that finds them sets its steps per call at once: no synchronous
    measuring calls. Bounded: the oldest are forgotten.
    """

    def __init__(self, size: int = 64) -> None:
        self.single: collections.OrderedDict[Any, float] = collections.OrderedDict()
        self.loop: dict[Any, float] = {}
        self.full_calls: collections.Counter[Any] = collections.Counter()  # full calls run, by key, until timed
        self.loop_times: collections.defaultdict[Any, list[float]] = collections.defaultdict(list)
        self.size = size
        caches.register(self.clear)

    def remember_single(self, key: Any, seconds: float) -> None:
        self.single[key] = seconds
        while len(self.single) > self.size:
            old, _ = self.single.popitem(last=False)
            self.loop.pop(old, None)
            self.full_calls.pop(old, None)
            self.loop_times.pop(old, None)

    def clear(self) -> None:
        self.single.clear()
        self.loop.clear()
        self.full_calls.clear()
        self.loop_times.clear()


MEASURED = Measured()


class Loop:
    """One run's calls, from the plan to the last readback."""

    def __init__(self, pipe: PipelineLike, run: FitRun, callbacks: Callbacks, bar: Any, own_bar: bool, plan: Plan):
        self.pipe, self.run, self.callbacks, self.bar, self.own_bar, self.plan = (
            pipe,
            run,
            callbacks,
            bar,
            own_bar,
            plan,
        )
        self.readback = Readback(run, plan.guard)
        self.nonfinite: NonFinite | None = None
        self.stacked = stacks_batches(pipe)  # e.g. .scan(k): the pipeline itself takes stacked batches
        explicit = scan_steps(pipe) if self.stacked else plan.steps_per_call
        self.k_reason = "set by .scan" if self.stacked else ("steps_per_call" if explicit else "auto")
        self.k_note = ""  # why the measured k is what it is, when that is not obvious
        if explicit is None and callbacks.wants_every_step():
            explicit, self.k_reason = 1, "a hook sees every step"
        self.stage_periods = [
            Period(stage.kind.training.period(dict(stage.options)))
            for stage in pipe.stages
            if stage.kind.training is not None and stage.kind.training.period is not None
        ]
        periods = [*self.stage_periods, *([Period(plan.eval_every)] if plan.eval_every else [])]
        if explicit is not None and plan.total is not None:
            explicit = min(explicit, plan.total)  # .scan(10**9) for a 5-step run stacks 5 batches, not 10**9
        self.schedule = Schedule(explicit, run.steps_per_epoch, run.total_steps, periods)
        self.step_hooks = callbacks.has_step_hooks()
        self.mode, self.why = "host", "the pipeline called as built (no plain `.jit()`)"
        if compiled.step_function(pipe) is not None:
            self.mode, self.why = "stream", "batches streamed from the host"
            if isinstance(plan.data, Mapping):
                on_device, self.why = host_data.choose_device_data(
                    plan.device_data, plan.data, callbacks.batch_shards()
                )
                self.mode = "device" if on_device else "stream"
        self.calls = 0
        self.measure_key = (pipe, self.mode, run.batch_size, host_data.batch_signature(plan.data))
        self.timed: list[float] = []
        self.source: DeviceArrays | Streamed | None = None
        self._state: Any = None  # typed; in "device"/"stream" mode replaced by raw, donated copies
        self._before: Any = None  # host mode: the state before the latest call (the guard goes back to it)
        self.message = ""  # the non-finite step's message, once found
        self._raw: Any = None
        self.ok: Any = None
        # The non-finite guard, paid per call, not per step: no program checks its steps; a raw state known to
        # be finite (the caller's own, then a copy every _SNAPSHOT_SECONDS) and the calls launched since are
        # kept, and a call found non-finite is redone from it, up to its last finite step (see _replay).
        self._snapshot: Any = None
        self._snapshot_time = 0.0
        self._since: list[tuple[compiled.Program, int, tuple[Any, ...], int]] = []
        self._since_bytes = 0
        self.codec: compiled.KeyCodec | None = None
        if self.schedule.auto and self.mode != "host" and self.measure_key in MEASURED.single:
            self._choose_k()

    # --- the state --------------------------------------------------------------------------

    def state(self) -> Any:
        """The state as the caller and hooks see it: typed keys."""
        if self._raw is None:
            return self._state
        assert self.codec is not None
        try:
            return self.codec.typed(self._raw)
        except RuntimeError:  # a call failed after its input was donated: the caller's state is what is left
            return self._state

    # --- the loop ---------------------------------------------------------------------------

    def train(self, state: Any) -> None:
        run = self.run
        self._state = state
        if run.total_steps is not None and run.step >= run.total_steps:
            return
        if self.mode != "host":
            # One copy of the caller's state; every call then donates its input (nothing allocated per step).
            self.codec = compiled.KeyCodec.of(state)
            self._snapshot = self.codec.raw(state)  # the caller's state: never donated, so no copy is kept
            self._snapshot_time = time.perf_counter()
            self._raw = _copy(self._snapshot)
            self.ok = np.bool_(True)
        self.source = self._source(state)
        for call in self.source.calls(self.schedule.count):
            started = time.perf_counter()
            pending = self._launch(call)
            if not self._after_call(call, pending, started):
                break
        self._read(keep_last=False)
        if not run.per_call:  # a run shorter than the measuring calls
            self._describe()
        ended = not run.stop_requested and self.nonfinite is None
        if ended and run.total_steps is None and run.step > run.start_step:  # the end of data of unknown length
            evaluated = bool(run.eval_history) and run.eval_history[-1]["step"] == run.step
            self._evaluate_and_end_epoch(epoch_end=True, evaluating=not evaluated)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def _source(self, state: Any) -> DeviceArrays | Streamed:
        run, plan = self.run, self.plan
        if self.mode == "device":
            source = DeviceArrays(run, plan.data, state.data_key, self.callbacks)
            source.check_placement(self.stacked)
            return source
        if isinstance(plan.data, Mapping):
            assert run.steps_per_epoch is not None and run.total_steps is not None and run.batch_size is not None
            groups = host_data.array_groups(
                plan.data,
                state.data_key,
                run.batch_size,
                run.steps_per_epoch,
                run.step,
                run.total_steps,
                self.schedule.count,
            )
        else:
            resumable = host_data.ResumableSource(plan.data, run.steps_per_epoch, plan.epochs)
            saved = run.resumed_data_state if run.resume else None
            groups = resumable.groups(run.step, run.total_steps, saved, self.schedule.count)
        return Streamed(self.mode, groups, self._place)

    # --- one call ---------------------------------------------------------------------------

    def _launch(self, call: Call) -> PendingCall:
        run, n = self.run, call.n
        first = run.step
        if self.mode == "host":
            self._before = self._state
            try:
                with fit_calls():  # its groups of stacked batches may be shorter than .scan's k
                    self._state, metrics = self.pipe(self._state, *call.inputs)
            except Exception:
                run.error_in_step = True
                raise
            return PendingCall(first, Rows.as_returned(metrics, n), whole=n > 1)
        rows = n if self.mode == "device" else jax.tree.leaves(call.inputs)[0].shape[0]
        program = self._program(n, rows)
        try:
            self._raw, self.ok, metric_rows = program.call(self._raw, self.ok, n, *call.inputs)
        except Exception as err:
            run.error_in_step = True
            self._explain(err)
            raise
        pending = PendingCall(first, Rows.of_call(metric_rows, n, program.names))
        if self.plan.guard:
            self._since.append((program, n, call.inputs, self._capacity(rows)))
            if self.mode == "stream":  # the placed batches stay alive until the next snapshot
                self._since_bytes += sum(x.nbytes for x in jax.tree.leaves(call.inputs))
            pending.replay = self._replay(len(self._since) - 1)
        return pending

    def _program(self, n: int, rows: int) -> compiled.Program:
        """The program for a call of ``n`` steps (``rows`` stacked batches when streamed).

        A full call of k steps is one ``scan``; a call of one step is the plain
        jitted step (no loop); other calls (remainders) a ``while_loop`` of ``n``
        steps. None checks its steps for non-finite values (see ``_replay``).
        """
        k, device = self.schedule.k, self.mode == "device"
        known = not (self.schedule.auto and self.measure_key not in MEASURED.single)
        if n == k > 1 and known and (device or rows == k):
            return self._compiled(k, static=True)
        if n == 1 and (device or rows == 1):
            return self._compiled(1, single=True)
        return self._compiled(self._capacity(rows))

    def _capacity(self, rows: int) -> int:
        """Steps the guarded loop has room for: the run's capacity on the device, the stacked batches streamed."""
        return self.schedule.capacity if self.mode == "device" else rows

    def _compiled(self, capacity: int, static: bool = False, single: bool = False) -> compiled.Program:
        run = self.run
        assert self.codec is not None
        return compiled.program(
            self.pipe,
            self.codec,
            gather=self.mode == "device",
            batch_size=run.batch_size or 0,
            steps_per_epoch=run.steps_per_epoch or 0,
            capacity=1 if single else capacity,
            static=static,
            single=single,
        )

    def _replay(self, index: int) -> Callable[[int], None]:
        """How to go back to the last finite step of the ``index``-th call since the snapshot, should it go non-finite.

        No program checks its steps (a check per step costs a copy of the
        state per step inside XLA: 1.6x a 4x1024 MLP's step on the CPU), so the
        guard is paid per call instead: the calls launched since the snapshot
        run again from a copy of it, the same programs on the same inputs (the
        same bits), then the ``good`` finite steps of the call that went wrong
        through the ``while_loop`` program (a step there gives the bits it gives
        in the ``scan``: ``tests/test_fit_loop.py``).
        """

        def replay(good: int) -> None:
            state, ok = _copy(self._snapshot), np.bool_(True)
            for program, n, inputs, _ in self._since[:index]:
                state, ok, _ = program.call(state, ok, n, *inputs)
            if good:
                _, _, inputs, capacity = self._since[index]
                state, ok, _ = self._compiled(capacity).call(state, ok, good, *inputs)
            self._raw, self.ok = state, ok

        return replay

    def _snapshot_due(self) -> bool:
        if not self.plan.guard or self.mode == "host" or not self._since:
            return False
        return self._since_bytes > _SNAPSHOT_BYTES or time.perf_counter() - self._snapshot_time > _SNAPSHOT_SECONDS

    def _take_snapshot(self) -> None:
        """Every call launched was read back finite: a copy of the state now is the new point to replay from."""
        assert not self.readback.pending
        self._snapshot = _copy(self._raw)
        self._snapshot_time = time.perf_counter()
        self._since.clear()
        self._since_bytes = 0

    # --- after each call --------------------------------------------------------------------

    def _after_call(self, call: Call, pending: PendingCall, started: float) -> bool:
        """Books a launched call; False when the run must stop."""
        run = self.run
        first, n = run.step, call.n
        run.step += n
        self.calls += 1
        if call.data_state is not None:
            run.data_state = call.data_state
        self.readback.add(pending)
        self.bar.update(n)
        epoch_end = bool(run.steps_per_epoch and run.step % run.steps_per_epoch == 0) or run.step == run.total_steps
        evaluating = self._evaluation_due(first)
        crossing = self.step_hooks and any(p.crossed(first, run.step) for p in self.stage_periods)
        measuring = self._measuring(n)
        sync = self.mode == "host" and self.plan.guard
        snapshot = self._snapshot_due()
        # A call whose hooks may save, or that ends an epoch, is read back now: a non-finite step is
        # found before any hook sees the state. Otherwise metrics come back one call late.
        if sync or measuring or crossing or epoch_end or evaluating or snapshot:
            self._read(keep_last=False)
        elif sum(p.rows.n for p in self.readback.pending[:-1]) >= self.plan.log_every:
            # Metrics come back every ``log_every`` steps, one call late: reading them waits for the device,
            # and waiting after every short call (one step per call) left the device idle between steps.
            self._read(keep_last=True)
        if self.nonfinite is not None:
            return False
        if snapshot:
            self._take_snapshot()
        if measuring:
            self._measured(n, time.perf_counter() - started)
        if self.calls == 1 and not (self.schedule.auto and self.measure_key not in MEASURED.single):
            self._describe()  # k is known from the start (given, or measured by an earlier run)
        if self.step_hooks:
            per_step = self.k_reason == "a hook sees every step"  # as before: each metric a scalar
            self.callbacks.step(self.state(), pending.rows.for_hooks(per_step))
        if epoch_end or evaluating:
            self._evaluate_and_end_epoch(epoch_end, evaluating)
        if run.stop_requested:
            run.interrupted = True
            return False
        return True

    def _measuring(self, n: int) -> bool:
        """Whether this call is timed: the first single steps, then the first full calls of k steps."""
        if not self.schedule.auto or self.mode == "host":
            return False
        if self.measure_key not in MEASURED.single:
            return self.calls <= 3 and n == 1
        return self.schedule.k > 1 and n == self.schedule.k and self.measure_key not in MEASURED.loop

    def _measured(self, n: int, seconds: float) -> None:
        """Times the single steps (calls 2 and 3), then full calls of k (their 2nd and 3rd), and chooses k.

        Each is the fastest of two: load from other processes only ever slows a
        call, so the minimum is the program's own speed.
        """
        if self.measure_key not in MEASURED.single:
            if self.calls >= 2:
                self.timed.append(seconds / n)
            if self.calls == 3:
                MEASURED.remember_single(self.measure_key, _agreed(min(self.timed)))
                self._choose_k()
                self._describe()
            return
        MEASURED.full_calls[self.measure_key] += 1  # the first compiles; the next two (this run or later) are timed
        if MEASURED.full_calls[self.measure_key] >= 2:
            MEASURED.loop_times[self.measure_key].append(seconds / n)
        if len(MEASURED.loop_times[self.measure_key]) >= 2:
            MEASURED.loop[self.measure_key] = _agreed(min(MEASURED.loop_times[self.measure_key]))
            self._choose_k()
            self._describe()

    def _choose_k(self) -> None:
        single = MEASURED.single[self.measure_key]
        loop = MEASURED.loop.get(self.measure_key)
        if single >= _LOOP_WORTH:
            self.schedule.k, self.schedule.log_every = 1, 1
            self.k_reason = f"auto: one step per call, as a step of {_ms(single)} gains under 1% from a loop"
            return
        if loop is not None and loop > _LOOP_MARGIN * single:
            self.schedule.k, self.schedule.log_every = 1, 1
            cause = " (XLA:CPU runs e.g. convolutions slower in a loop body)" if jax.default_backend() == "cpu" else ""
            self.k_note = f": one step per call, faster here than {_ms(loop)} a step inside a loop{cause}"
            return
        self.schedule.measured(single, self.plan.log_every)

    def _describe(self) -> None:
        k = self.schedule.k
        per = "step" if k == 1 else "steps"
        self.run.per_call = f"{k} {per} per call ({self.k_reason}){self.k_note}, {self.why}"
        if self.own_bar and not getattr(self.bar, "disable", False):  # a supplied display shows run.per_call itself
            self.bar.write(f"fit: {self.run.per_call}")

    def _read(self, keep_last: bool) -> None:
        waiting = len(self.readback.pending)
        found = self.readback.read(keep_last=keep_last)
        if found is not None:
            self._stop_at(found)
        elif len(self.readback.pending) < waiting and self.run.history:
            latest = metrics_of(self.run.history[-1])
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in latest.items()}, refresh=False)

    def _stop_at(self, found: NonFinite) -> None:
        """A step gave a non-finite metric: the state goes back to before it (or to its call's start)."""
        run = self.run
        run.step = found.kept
        if self.mode == "host":
            self._state = self._before
        bad = ", ".join(f"{k}={v}" for k, v in found.metrics.items())
        kept = (
            f"the state is the one from before the call that held it (step {found.kept}: the pipeline "
            f"runs its steps as one call)"
            if found.call_start
            else f"the state is the one from before that step (step {found.kept})"
        )
        message = (
            f"`fit` stopped at {run.where(found.step)}: the step gave non-finite {bad}; "
            f"{kept}, and no checkpoint holds a later one.\n"
            f"Lower the learning rate, clip gradients (optax.clip_by_global_norm), or check that batch's data; "
            f'fit(..., on_nonfinite="ignore") trains on regardless.'
        )
        self.nonfinite = found
        self.message = message
        run.interrupted = True
        run.stop()
        if self.plan.on_nonfinite == "raise":
            run.error_in_step = True
            raise NonFiniteError(message, state=self.state(), step=found.step, pipeline=repr(self.pipe))

    # --- evaluation and epochs --------------------------------------------------------------

    def _evaluation_due(self, first: int) -> bool:
        if self.plan.eval_data is None or self.plan.eval_every is None:
            return False
        return Period(self.plan.eval_every).crossed(first, self.run.step) or self.run.step == self.run.total_steps

    def _evaluate_and_end_epoch(self, epoch_end: bool, evaluating: bool) -> None:
        """Evaluates when due (every ``eval_every`` steps, else at each epoch's end), then ends the epoch."""
        run, plan = self.run, self.plan
        self._read(keep_last=False)
        if self.nonfinite is not None:
            return
        state = self.state()
        metrics: dict[str, float] = {}
        if plan.eval_data is not None and (evaluating or (epoch_end and plan.eval_every is None)):
            params = None if plan.eval_params is None else plan.eval_params(state)  # e.g. an EMA (.ema())
            scores = evaluate(self.pipe, state, plan.eval_data, plan.eval_batch_size, params=params)
            metrics = {f"eval_{k}": v for k, v in scores.items()}
            epoch = run.step // run.steps_per_epoch if run.steps_per_epoch else len(run.eval_history) + 1
            run.eval_history.append({"step": run.step, "epoch": epoch, **metrics})
            if not getattr(self.bar, "disable", False):
                label = f"epoch {epoch}" if plan.eval_every is None else f"step {run.step}"
                self.bar.write(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            self.callbacks.evaluated(state, metrics)
        if epoch_end:
            self.callbacks.epoch_end(state, metrics)

    # --- placing host batches (in the prefetch thread) --------------------------------------

    def _place(self, group: tuple[int, Any, Any]) -> Call:
        """A call's host batches, shaped by :func:`call_input` and placed on the device."""
        n, batches, data_state = group
        hook, run = self.callbacks.hook, self.run
        whole = isinstance(self.plan.data, Mapping)  # every process holds the whole data set
        if self.mode == "host":
            batch = call_input(batches, stacked=self.stacked)
            placed = hook.jaxpipe_place_batch(run=run, batch=batch, whole=whole)
            return Call(n, (batch if placed is None else placed,), data_state)
        stacked = pad(call_input(batches, stacked=True), max(n, self.schedule.k))  # one program for every call
        if self.stacked:
            placed = hook.jaxpipe_place_batch(run=run, batch=stacked, whole=whole)
            return Call(n, (stacked if placed is None else placed,), data_state)
        if hook.jaxpipe_place_batch.get_hookimpls():  # one batch at a time, as the hooks expect, then stacked
            rows = len(jax.tree.leaves(stacked)[0])
            single = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(rows)]
            placed_each = [hook.jaxpipe_place_batch(run=run, batch=b, whole=whole) for b in single]
            if all(p is not None for p in placed_each):
                return Call(n, (jax.tree.map(lambda *xs: jnp.stack(xs), *placed_each),), data_state)
        return Call(n, (jax.device_put(stacked),), data_state)

    def _explain(self, err: Exception) -> None:
        """Re-raises a failed call as the pipeline itself would explain it; returns if there is nothing to add."""
        located = diagnose.located(self.pipe, err, (self.state(), None), {})
        if located is not err:
            raise located from err


def _copy(tree: Any) -> Any:
    """A fresh copy of every array, where it is (the caller keeps the originals; fit donates the copy).

    ``device_put(..., may_alias=False)`` copies the buffers without compiling a program; a jitted copy
    where it cannot (an array it refuses, e.g. across processes).
    """
    try:
        return jax.device_put(tree, may_alias=False)
    except Exception:
        return _copy_program(tree)


@jax.jit
def _copy_program(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _agreed(seconds: float) -> float:
    """Every process must run calls of the same length: process 0's measurement."""
    if jax.process_count() == 1:
        return seconds
    from jax.experimental import multihost_utils  # only across processes

    return float(multihost_utils.broadcast_one_to_all(np.float64(seconds)))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
