"""``Pipeline.fit``: the training loop and its hooks.

``fit`` is a data plan (``_fit_data``: where batches come from) feeding a small
loop (:class:`_Loop`: launch a call, read metrics back one call late, end
epochs, stop) that calls one compiled many-step program (``_fit_program``).

The loop is exactly resumable: the batches of epoch ``e`` come from a
permutation keyed by ``fold_in(state.data_key, e)``, and the position in the
data is a function of ``state.step``; so a run restored from a checkpoint at
step ``s`` sees the batches an uninterrupted run would have seen, bit for bit,
however many steps each call runs.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.run import FitRun, metrics_of
from jaxpipe._core.state import TrainState
from jaxpipe._core.steps import scan_steps, stacks_batches
from jaxpipe._plugins.manager import installed_plugins, run_hooks
from jaxpipe._tools import diagnose
from jaxpipe._training import data as _fit_data
from jaxpipe._training import grain as _grain
from jaxpipe._training import program as _fit_program
from jaxpipe._training.data import check_arrays
from jaxpipe._training.evaluate import evaluate
from jaxpipe.errors import PipelineError

_CALL_SECONDS = 0.2  # a call's target length: Ctrl-C and Stop act within about two calls
_CAPACITY = 4096  # most steps in one call (the metrics buffer's rows)
ON_NONFINITE = ("raise", "stop", "ignore")
_ROUND = [m * 10**e for e in range(7) for m in (1, 2, 5)]
_STEP_SECONDS: dict[Any, float] = {}  # measured seconds per step, by pipeline, mode and batch shapes


# --- the loop ----------------------------------------------------------------------


@contextlib.contextmanager
def _graceful_interrupt(run: FitRun) -> Iterator[None]:
    """First Ctrl-C: stop after the current call. Second: interrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        del signum, frame  # any SIGINT
        run.interrupt()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(enabled: bool | Callable[..., Any], total: int | None, initial: int) -> Any:
    if callable(enabled):
        return enabled(total=total, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)


def fit(
    pipe: PipelineLike,
    state: TrainState,
    data: Mapping[str, Any] | Iterable[Any],
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    eval_data: Mapping[str, Any] | None = None,
    eval_batch_size: int | None = None,
    progress: bool | Callable[..., Any] = True,
    log_every: int = 10,
    hooks: Sequence[object] = (),
    device_data: bool | str = "auto",
    on_nonfinite: str = "raise",
    resume: bool = True,
) -> TrainState:
    """Trains ``state`` until the run's total of ``epochs`` epochs.

    A pipeline ending in a plain ``.jit()`` runs several steps per compiled
    call (``.scan(k)``'s k, else as many as take about 0.2 s, measured on the
    first calls; calls end at epoch ends, at multiples of a stage's ``every``
    such as ``.checkpoint(every=...)``, and at multiples of ``log_every``), with
    the state donated from call to call (the caller's ``state`` stays valid).
    The batches, and so the result, are the same bit for bit however the steps
    are grouped into calls.

    Args:
      pipe: a pipeline whose built function is a step ``(state, batch) ->
        (state, metrics)`` (``.model(...).optimize(...)``, optionally
        ``.scan(k)`` and ``.jit()``).
      state: the state to start from; a ``.checkpoint()`` stage may resume a
        newer one from disk.
      data: a dict of arrays, shuffled each epoch, or an iterable of batches
        (taken in order; a resumed run skips those already trained on, or
        restores the iterator's position when it has ``get_state``/``set_state``).
      epochs: the run's total: a run resumed at step ``s`` continues to the
        same end rather than adding epochs.
      batch_size: examples per step (needed for a dict of arrays; the last
        partial batch of each epoch is dropped).
      eval_data: a dict of arrays evaluated at the end of every epoch.
      eval_batch_size: examples per evaluation call; None evaluates the whole
        eval set in one call (one compile, no partial last batch).
      progress: show a progress bar (text in a terminal, a widget in Jupyter),
        or a ``tqdm``-like factory.
      log_every: steps between updates of the progress line and
        ``run.history``, at least (metrics come back once per call).
      hooks: objects with ``@jaxpipe.hookimpl`` methods (a logger, a
        dashboard, :class:`jaxpipe.History`) called during this run only, like
        plugins. The state a hook receives is donated to the next call: copy
        what you keep (``jax.device_get``).
      device_data: put a dict of arrays on the device(s) once and gather the
        batches there (True), stream them from the host a call ahead (False),
        or decide from the data's size and the device's free memory ("auto").
      on_nonfinite: what a step whose metrics (loss, grad norm, ...) are not
        all finite does. ``"raise"`` (default): the run ends, the end hooks see
        the state from before that step (a checkpointer does not save after an
        error), and a PipelineError names the step and the metric; the state
        from before the step is its ``state`` attribute. ``"stop"``: the run
        ends like a Ctrl-C (the end hooks may save that finite state) and
        ``fit`` warns and returns it. ``"ignore"``: train on.
      resume: False starts over: a checkpointer does not restore (``run.resume``).

    Returns:
      The final state; after Ctrl-C, the state after the last completed call.
    """
    try:
        data = _grain.as_batches(data)  # Grain datasets and loaders: iterables whose position can be saved
    except PipelineError as err:
        raise PipelineError(err.detail, pipeline=repr(pipe)) from None
    plan = _plan(
        pipe, state, data, epochs, batch_size, eval_data, eval_batch_size, log_every, device_data, on_nonfinite
    )
    plan["hooks"] = tuple(hooks)
    steps_per_epoch, total = plan["steps_per_epoch"], plan["total"]
    run = FitRun(pipe, epochs, batch_size, steps_per_epoch, total, resume=bool(resume))
    with run_hooks(pipe, hooks) as hook:
        resumed = hook.jaxpipe_fit_resume(run=run, state=state)
        state = state if resumed is None else resumed
        placed = hook.jaxpipe_place_state(pipeline=pipe, state=state)
        state = state if placed is None else placed
        run.start_step = run.step = int(state.step)
        if total is not None and run.step >= total:
            _say_complete(run, resumed is not None)
        supplied = hook.jaxpipe_fit_progress(run=run) if progress is True else None  # e.g. the dashboard
        bar = supplied if supplied is not None else _progress(progress, total, run.step)
        loop = _Loop(pipe, run, hook, bar, state, data, plan)
        loop.own_bar = supplied is None
        hook.jaxpipe_fit_start(run=run, state=state)
        # Ctrl-C (or the kernel's interrupt button) stays "stop after this call" until the end hooks
        # have saved: a late one must not cut a checkpoint short. The dashboard's Stop calls run.stop().
        with _graceful_interrupt(run):
            try:
                loop.train()
            except BaseException as err:
                run.error = err
                if isinstance(err, PipelineError) and loop.nonfinite is not None:
                    err.state = loop.state()  # type: ignore[attr-defined]
                raise
            finally:
                loop.close()
                bar.close()
                hook.jaxpipe_fit_end(run=run, state=loop.state())
    if loop.nonfinite is not None:
        warnings.warn(loop.nonfinite, RuntimeWarning, stacklevel=3)
    return loop.state()


def _plan(
    pipe: PipelineLike,
    state: Any,
    data: Any,
    epochs: Any,
    batch_size: Any,
    eval_data: Any,
    eval_batch_size: Any,
    log_every: Any,
    device_data: Any,
    on_nonfinite: Any,
) -> dict[str, Any]:
    """Checks every argument (each error names it, with what was given and a correct call); the run's sizes."""
    where: dict[str, Any] = {"pipeline": repr(pipe)}
    if not isinstance(state, TrainState):
        raise PipelineError(
            f"`fit` needs the TrainState from `init`, got {type(state).__name__}.\n"
            f"Call state = trainer.init(jax.random.key(0), sample_batch) first.",
            **where,
        )
    if not _positive_int(epochs):
        raise PipelineError(f"`epochs` must be a positive int, got {epochs!r}.", **where)
    try:
        _fit_data.check_data(data)
    except PipelineError as err:
        raise PipelineError(err.detail, **where) from None
    for name, value, example in (("log_every", log_every, 10), ("eval_batch_size", eval_batch_size, 256)):
        if not (_positive_int(value) or (name == "eval_batch_size" and value is None)):
            raise PipelineError(
                f"`{name}` must be a positive int{' or None' if name == 'eval_batch_size' else ''}, got {value!r}.\n"
                f"For example {name}={example}.",
                **where,
            )
    if device_data not in (True, False, "auto"):
        raise PipelineError(f'`device_data` must be True, False or "auto", got {device_data!r}.', **where)
    if on_nonfinite not in ON_NONFINITE:
        raise PipelineError(
            f'`on_nonfinite` must be "raise", "stop" or "ignore", got {on_nonfinite!r}.\n'
            f'For example on_nonfinite="stop" returns the last finite state with a warning.',
            **where,
        )
    if eval_data is not None:
        if not isinstance(eval_data, Mapping):
            raise PipelineError(
                f"`eval_data` must be a dict of arrays, got {type(eval_data).__name__}.\n"
                f"Give e.g. eval_data={{'image': x_test, 'label': y_test}}.",
                **where,
            )
        try:
            check_arrays(eval_data, "eval data", argument="eval_data")
        except PipelineError as err:
            raise PipelineError(err.detail, **where) from None
    if isinstance(data, Mapping):
        try:
            size = check_arrays(data, "training data")
        except PipelineError as err:
            raise PipelineError(err.detail, **where) from None
        if not _positive_int(batch_size) or batch_size > size:
            raise PipelineError(
                f"`fit` on a dict of arrays needs `batch_size`, an int from 1 to the {size} examples in "
                f"the data; got {batch_size!r}.\nFor example batch_size={min(128, size)}.",
                **where,
            )
        steps_per_epoch: int | None = size // batch_size
    else:
        if device_data is True:
            raise PipelineError(
                "`device_data=True` puts a dict of arrays on the device, but `data` is an iterable of batches "
                "(streamed from the host a call ahead).\nPass the arrays as a dict, or leave device_data out.",
                **where,
            )
        steps_per_epoch = len(data) if hasattr(data, "__len__") else None
    total = epochs * steps_per_epoch if steps_per_epoch is not None else None
    return {
        "steps_per_epoch": steps_per_epoch,
        "total": total,
        "eval_data": eval_data,
        "eval_batch_size": eval_batch_size,
        "log_every": log_every,
        "device_data": device_data,
        "guard": on_nonfinite != "ignore",
        "on_nonfinite": on_nonfinite,
        "epochs": epochs,
    }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _say_complete(run: FitRun, resumed: bool) -> None:
    source = "the newest checkpoint" if resumed else "the state"
    print(
        f"fit: the run is already complete: {source} is at step {run.step} of {run.total_steps} "
        f"({run.epochs} epochs); nothing to train. To train more, raise `epochs` (e.g. epochs={run.epochs * 2}); "
        f"to start over, use a new directory, or trainer.init(key, batch, resume=False) and fit(..., resume=False).",
        file=sys.stderr,
    )


def _every(pipe: PipelineLike) -> list[int]:
    """Step periods the stages' run hooks act on (``Training.period``, e.g. ``.checkpoint(every=...)``)."""
    return [
        stage.kind.training.period(dict(stage.options))
        for stage in pipe.stages
        if stage.kind.training is not None and stage.kind.training.period is not None
    ]


def _wants_every_step(hook: Any, hooks: Sequence[object]) -> bool:
    """Whether a ``jaxpipe_fit_step`` of a plugin or of ``hooks=`` expects to run after every step.

    Such a hook (written when ``fit`` ran one step per call) keeps one step per
    call, unless it says ``accepts_calls = True``: it handles a call of several
    steps (``run.step`` advanced by k, metrics with a leading axis of k). A
    stage's own hooks (the checkpointer) are fine: calls end on its ``every``.
    """
    asked = {id(obj) for obj in [*installed_plugins(), *hooks]}
    for impl in hook.jaxpipe_fit_step.get_hookimpls():
        obj = getattr(impl.plugin, "obj", impl.plugin)  # the object itself, as the plugin manager wraps it
        if id(obj) in asked and not getattr(obj, "accepts_calls", False):
            return True
    return False


class _Schedule:
    """How many steps the next call runs: k, cut at epoch ends, the end and ``every`` periods."""

    def __init__(self, explicit: int | None, steps_per_epoch: int | None, total: int | None, every: list[int]) -> None:
        self.k = explicit or 1
        self.auto = explicit is None
        self.steps_per_epoch, self.total, self.every = steps_per_epoch, total, every if explicit is None else []
        self.log_every = 1
        self.capacity = explicit or min(steps_per_epoch or _CAPACITY, total or _CAPACITY, _CAPACITY)

    def count(self, step: int) -> int:
        n = self.k
        if self.auto and n >= self.log_every:  # calls end on multiples of log_every
            end = (step + n) // self.log_every * self.log_every
            n = end - step if end > step else n
        if self.steps_per_epoch:
            n = min(n, self.steps_per_epoch - step % self.steps_per_epoch)
        if self.total is not None:
            n = min(n, self.total - step)
        for period in self.every:
            n = min(n, period - step % period)
        return max(n, 1)

    def measured(self, seconds_per_step: float, log_every: int) -> None:
        """Sets k so that a call takes about ``_CALL_SECONDS``, aligned with ``log_every``."""
        k = int(max(_CALL_SECONDS / max(seconds_per_step, 1e-9), 1))
        # A round number (1, 2, 5, 10, 20, 50, ...): the same k run after run, so streamed calls,
        # whose stacked batches have k rows, reuse one compiled program.
        k = min(max(v for v in _ROUND if v <= k), self.capacity)
        if k >= log_every:
            k -= k % log_every
        elif k < self.capacity:  # a whole epoch per call needs no rounding
            k = max(d for d in range(1, k + 1) if log_every % d == 0)
        self.k, self.log_every = k, log_every


class _Loop:
    """One run's calls: launch, read metrics back one call late, end epochs, stop.

    Modes: ``"device"`` (the data set on the device, batches gathered by the
    compiled many-step program), ``"stream"`` (stacked host batches copied a
    call ahead into the same kind of program) and ``"host"`` (a pipeline that
    ``fit`` cannot re-compile, e.g. without ``.jit()``: called as built, as
    ``fit`` always did).
    """

    def __init__(self, pipe: PipelineLike, run: FitRun, hook: Any, bar: Any, state: Any, data: Any, plan: Any) -> None:
        self.pipe, self.run, self.hook, self.bar, self.data, self.plan = pipe, run, hook, bar, data, plan
        self.guard: bool = plan["guard"]
        self.nonfinite: str | None = None
        self.pending: list[tuple[int, int, Callable[[], tuple[list[str], np.ndarray]]]] = []
        self.scanned = stacks_batches(pipe)  # e.g. .scan(k): batches stacked
        explicit = scan_steps(pipe) if self.scanned else None
        self.k_reason = "set by .scan" if explicit else "auto"
        if explicit is None and _wants_every_step(hook, plan["hooks"]):
            explicit, self.k_reason = 1, "a hook sees every step"
        self.every = _every(pipe)
        self.schedule = _Schedule(explicit, run.steps_per_epoch, run.total_steps, self.every)
        self.step_hooks = bool(hook.jaxpipe_fit_step.get_hookimpls())
        self.place_hooks = bool(hook.jaxpipe_place_batch.get_hookimpls())
        self.codec = _fit_program.KeyCodec.of(state)
        self.mode, why = "host", "the pipeline called as built (no plain `.jit()`)"
        if _fit_program.step_function(pipe) is not None:
            self.mode, why = "stream", "batches streamed from the host"
            if isinstance(data, Mapping):
                on_device, why = _fit_data.choose_device_data(plan["device_data"], data, self._shards())
                self.mode = "device" if on_device else "stream"
        self.why = why
        self.calls = 0
        self.own_bar = True
        # The step time measured by an earlier fit of this pipeline on batches like these (a notebook's
        # next run, a sweep) sets k at once: no synchronous measuring calls.
        self.measure_key = (pipe, self.mode, run.batch_size, _fit_data.batch_signature(data))
        if self.schedule.auto and self.mode != "host" and self.measure_key in _STEP_SECONDS:
            self.schedule.measured(_STEP_SECONDS[self.measure_key], plan["log_every"])
        self.prefetcher: _fit_data.Prefetcher | None = None
        self._state = state  # typed; in "device"/"stream" mode replaced by raw, donated copies
        self._raw: Any = None
        self.ok: Any = None

    # --- the state --------------------------------------------------------------------------

    def state(self) -> Any:
        """The state as the caller and hooks see it: typed keys."""
        if self._raw is None:
            return self._state
        try:
            return self.codec.typed(self._raw)
        except RuntimeError:  # a call failed after its input was donated: the caller's state is what is left
            return self._state

    # --- training ---------------------------------------------------------------------------

    def train(self) -> None:
        run = self.run
        if run.total_steps is not None and run.step >= run.total_steps:
            return
        if self.mode != "host":
            # One copy of the caller's state; every call then donates its input (nothing allocated per step).
            self._raw = _copy(self.codec.raw(self._state))
            self.ok = jnp.bool_(True)
        if self.mode == "device":
            self._train_on_device()
        else:
            self._train_groups()
        self.read_back()
        ended = not run.stop_requested and self.nonfinite is None
        if ended and run.total_steps is None and run.step > run.start_step:  # the end of data of unknown length
            self.end_epoch()

    def _train_on_device(self) -> None:
        run, schedule = self.run, self.schedule
        assert run.steps_per_epoch is not None and run.total_steps is not None and run.batch_size is not None
        if self.place_hooks:  # the placing hook says, as for host batches, when the devices cannot split one
            sample = {
                k: np.asarray(v[: run.batch_size])[None] if self.scanned else v[: run.batch_size]
                for k, v in self.data.items()
            }
            self.hook.jaxpipe_place_batch(run=run, batch=sample, whole=True)
        data, size = self._place_data()
        data_key = jnp.copy(self._state.data_key)  # kept: the state's own is donated with each call
        orders: dict[int, jax.Array] = {}
        program = _fit_program.program(
            self.pipe,
            self.codec,
            gather=True,
            batch_size=run.batch_size,
            steps_per_epoch=run.steps_per_epoch,
            capacity=schedule.capacity,
            guard=self.guard,
        )
        while run.step < run.total_steps:
            n = schedule.count(run.step)
            epoch = run.step // run.steps_per_epoch
            if epoch not in orders:
                orders = {epoch: _fit_program.epoch_order_on_device(data_key, epoch, size)}
            started = time.perf_counter()
            full = self._full_call(n, n)
            call = full.call if full is not None else program.call
            before = _copy(self._raw) if full is not None and self.guard else None  # see _replay
            try:
                self._raw, self.ok, rows = call(self._raw, self.ok, n, data, orders[epoch])
            except Exception as err:
                self._explain(err)
                raise
            names = full.names if full is not None else program.names
            fetch = self._rows(rows, n, names)
            if before is not None:
                fetch.replay = self._replay(program, before, (data, orders[epoch]))  # type: ignore[attr-defined]
            if not self._after_call(n, fetch, started, data_state=None):
                return

    def _train_groups(self) -> None:
        run, schedule = self.run, self.schedule
        if isinstance(self.data, Mapping):
            assert run.steps_per_epoch is not None and run.total_steps is not None and run.batch_size is not None
            groups: Iterator[Any] = _fit_data.array_groups(
                self.data,
                self._state.data_key,
                run.batch_size,
                run.steps_per_epoch,
                run.step,
                run.total_steps,
                schedule.count,
            )
        else:
            source = _fit_data.ResumableSource(self.data, run.steps_per_epoch, self.plan["epochs"])
            saved = run.resumed_data_state if run.resume else None
            groups = source.groups(run.step, run.total_steps, saved, schedule.count)
        self.prefetcher = _fit_data.Prefetcher(groups, self._place_group)
        for n, batches, data_state in self.prefetcher:
            started = time.perf_counter()
            if self.mode == "host":
                before, first = self._state, run.step
                self._state, metrics = self.pipe(self._state, batches)
                try:  # no guard inside the program here: read each call back now, keep the state before it
                    go_on = self._after_call(n, self._metric_rows(metrics, n), started, data_state, sync=self.guard)
                finally:
                    if self.nonfinite is not None:
                        self._state, run.step = before, first
                if not go_on:
                    return
                continue
            capacity = jax.tree.leaves(batches)[0].shape[0]
            guarded = _fit_program.program(
                self.pipe,
                self.codec,
                gather=False,
                batch_size=run.batch_size or 0,
                steps_per_epoch=run.steps_per_epoch or 0,
                capacity=capacity,
                guard=self.guard,
            )
            full = self._full_call(n, capacity)
            program = full or guarded
            before = _copy(self._raw) if full is not None and self.guard else None  # see _replay
            try:
                self._raw, self.ok, out = program.call(self._raw, self.ok, n, batches)
            except Exception as err:
                self._explain(err)
                raise
            rows = self._rows(out, n, program.names)
            if before is not None:
                rows.replay = self._replay(guarded, before, (batches,))  # type: ignore[attr-defined]
            if not self._after_call(n, rows, started, data_state=data_state):
                return

    def _replay(self, guarded: _fit_program.Program, before: Any, source: tuple[Any, ...]) -> Callable[[int], None]:
        """How to redo the finite steps of a full call from the state before it, should one step go non-finite.

        A full call (a ``scan`` of k steps) has no guard inside, so that it costs
        exactly its steps; it is rare that a row comes back non-finite, and then
        the ``good`` steps before it run again through the guarded program, from
        a copy of the state kept before the call: the same steps, the same bits.
        """

        def replay(good: int) -> None:
            self._raw, self.ok, _ = guarded.call(before, jnp.bool_(True), good, *source)

        return replay

    def _full_call(self, n: int, rows: int) -> _fit_program.Program | None:
        """The fixed-length program for a call of k steps (``rows`` batches), once k is known; else None."""
        k = self.schedule.k
        if n != k or rows != k or k == 1 or (self.schedule.auto and self.measure_key not in _STEP_SECONDS):
            return None
        run = self.run
        return _fit_program.program(
            self.pipe,
            self.codec,
            gather=self.mode == "device",
            batch_size=run.batch_size or 0,
            steps_per_epoch=run.steps_per_epoch or 0,
            capacity=k,
            guard=self.guard,
            static=True,
        )

    # --- after each call ------------------------------------------------------------------

    def _after_call(self, n: int, rows: Any, started: float, data_state: Any, sync: bool = False) -> bool:
        """Books a launched call; False when the run must stop."""
        run, schedule = self.run, self.schedule
        first = run.step
        run.step += n
        self.calls += 1
        if data_state is not None:
            run.data_state = data_state
        self.pending.append((first, n, rows))
        self.bar.update(n)
        epoch_end = (run.steps_per_epoch and run.step % run.steps_per_epoch == 0) or run.step == run.total_steps
        crossing = any(run.step // p > first // p for p in self.every) if self.step_hooks else False
        measuring = schedule.auto and self.measure_key not in _STEP_SECONDS and self.calls <= 2 and self.mode != "host"
        # A call whose hooks may save, or that ends an epoch, is read back now: a non-finite step is
        # found before any hook sees the state. Otherwise metrics come back one call late.
        self.read_back(keep_last=not (sync or measuring or crossing or epoch_end))
        if self.nonfinite is not None:
            return False
        if measuring and self.calls == 2:
            seconds = (time.perf_counter() - started) / n
            if jax.process_count() > 1:  # every process must run calls of the same length: take process 0's
                from jax.experimental import multihost_utils

                seconds = float(multihost_utils.broadcast_one_to_all(np.float64(seconds)))
            _STEP_SECONDS[self.measure_key] = seconds
            schedule.measured(_STEP_SECONDS[self.measure_key], self.plan["log_every"])
            self._describe()
        elif self.calls == 1 and not measuring:
            self._describe()
        if self.step_hooks:
            per_step = self.k_reason == "a hook sees every step"  # as before: each metric a scalar
            self.hook.jaxpipe_fit_step(run=run, state=self.state(), metrics=_Metrics(rows, per_step))
        if epoch_end:
            self.end_epoch()
        if run.stop_requested:
            run.interrupted = True
            return False
        return True

    def _describe(self) -> None:
        k = self.schedule.k
        per = "step" if k == 1 else "steps"
        self.run.per_call = f"{k} {per} per call ({self.k_reason}), {self.why}"
        if self.own_bar and not getattr(self.bar, "disable", False):  # a supplied display shows run.per_call itself
            self.bar.write(f"fit: {self.run.per_call}")

    def _rows(self, rows: jax.Array, n: int, names: list[str]) -> Callable[[], tuple[list[str], np.ndarray]]:
        rows.copy_to_host_async()  # fetched while the next call runs

        def fetch() -> tuple[list[str], np.ndarray]:
            return names, np.asarray(rows)[:n]

        fetch.device = rows  # type: ignore[attr-defined]
        fetch.names = names  # type: ignore[attr-defined]
        fetch.n = n  # type: ignore[attr-defined]
        return fetch

    def _metric_rows(self, metrics: dict[str, Any], n: int) -> Callable[[], tuple[list[str], np.ndarray]]:
        def fetch() -> tuple[list[str], np.ndarray]:
            host = jax.device_get(metrics)
            names = list(host)
            values = [np.ravel(np.asarray(host[k], dtype=np.float64))[:n] for k in names]
            return names, np.stack(values, axis=1) if values else np.zeros((n, 0))

        fetch.metrics = metrics  # type: ignore[attr-defined]
        return fetch

    def read_back(self, keep_last: bool = False) -> None:
        """Moves the metrics of finished calls into ``run.history``; stops at a non-finite step."""
        run = self.run
        take = self.pending[:-1] if keep_last else self.pending[:]
        del self.pending[: len(take)]
        for first, n, fetch in take:
            names, host = fetch()
            finite = np.isfinite(host).all(axis=1) if self.guard else np.ones(len(host), bool)
            good = int(np.argmin(finite)) if not finite.all() else n
            for i in range(good):
                step = first + i + 1
                values = {k: float(v) for k, v in zip(names, host[i], strict=True)}
                run.history.append({"step": step, "epoch": run.epoch_of(step), **values})
            if good < n:
                replay = getattr(fetch, "replay", None)
                if replay is not None:  # a full call, unguarded: its state is redone up to the good steps
                    replay(good)
                self._nonfinite(first + good, names, host[good])
                return
        if take and run.history:
            latest = metrics_of(run.history[-1])
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in latest.items()}, refresh=False)

    def _nonfinite(self, done: int, names: list[str], row: np.ndarray) -> None:
        """The step after ``done`` gave a non-finite metric: the state stays as it was after ``done``."""
        run = self.run
        self.pending.clear()
        run.step = done
        bad = [f"{k}={v}" for k, v in zip(names, row, strict=True) if not np.isfinite(v)]
        message = (
            f"`fit` stopped at {run.where(done + 1)}: the step gave non-finite {', '.join(bad)}; "
            f"the state is the one from before that step (step {done}), and no checkpoint holds a later one.\n"
            f"Lower the learning rate, clip gradients (optax.clip_by_global_norm), or check that batch's data; "
            f'fit(..., on_nonfinite="ignore") trains on regardless.'
        )
        run.interrupted = True
        run.stop()
        if self.plan["on_nonfinite"] == "raise":
            self.nonfinite = message
            raise PipelineError(message, pipeline=repr(self.pipe))
        self.nonfinite = message

    def end_epoch(self) -> None:
        run = self.run
        self.read_back()
        if self.nonfinite is not None:
            return
        state = self.state()
        metrics: dict[str, float] = {}
        eval_data = self.plan["eval_data"]
        if eval_data is not None:
            metrics = {
                f"eval_{k}": v for k, v in evaluate(self.pipe, state, eval_data, self.plan["eval_batch_size"]).items()
            }
            epoch = run.step // run.steps_per_epoch if run.steps_per_epoch else len(run.eval_history) + 1
            run.eval_history.append({"step": run.step, "epoch": epoch, **metrics})
            if not getattr(self.bar, "disable", False):
                self.bar.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.hook.jaxpipe_fit_epoch_end(run=run, state=state, metrics=metrics)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    # --- placing data -----------------------------------------------------------------------

    def _shards(self) -> int:
        """How many devices share each batch (a ``.data_parallel`` stage's batch axis), as its hooks say."""
        return self.hook.jaxpipe_batch_shards(run=self.run) or 1

    def _place_data(self) -> tuple[Any, int]:
        """The dict of arrays on the device(s), once; under ``.data_parallel`` split along the batch axis."""
        host = {k: np.asarray(v) for k, v in self.data.items()}
        size = next(iter(host.values())).shape[0]
        pad = -size % self._shards()  # rows the permutation never picks, so every device holds an equal share
        if pad:
            host = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in host.items()}
        placed = self.hook.jaxpipe_place_data(run=self.run, data=host)
        return (jax.device_put(host) if placed is None else placed), size

    def _place_group(self, group: tuple[int, Any, Any]) -> tuple[int, Any, Any]:
        """A call's host batches, on the device (runs in the prefetch thread)."""
        n, batches, data_state = group
        if isinstance(batches, list):
            if self.mode == "host" and not self.scanned:
                batches = batches[0]
            else:
                batches = _stack(batches)
        if self.mode != "host":  # padded to k rows (never run): one compiled program for every call
            batches = _pad(batches, max(n, self.schedule.k))
        whole = isinstance(self.data, Mapping)  # every process holds the whole data set
        if self.mode == "host" or self.scanned:
            placed = self.hook.jaxpipe_place_batch(run=self.run, batch=batches, whole=whole)
            return n, batches if placed is None else placed, data_state
        if self.place_hooks:  # one batch at a time, as the hooks expect, then stacked on the device
            rows = len(jax.tree.leaves(batches)[0])
            single = [jax.tree.map(lambda x, i=i: x[i], batches) for i in range(rows)]
            placed_each = [self.hook.jaxpipe_place_batch(run=self.run, batch=b, whole=whole) for b in single]
            if all(p is not None for p in placed_each):
                return n, jax.tree.map(lambda *xs: jnp.stack(xs), *placed_each), data_state
        return n, jax.device_put(batches), data_state

    def _explain(self, err: Exception) -> None:
        """Re-raises a failed call as the pipeline itself would explain it; returns if there is nothing to add."""
        explained = diagnose.explain_error(self.pipe, err, (self.state(), None), {})
        if explained is not None:
            raise explained from err
        located = err.within(self.pipe) if isinstance(err, PipelineError) else err
        if located is not err:
            raise located from err  # a stage's own error, raised knowing only its name


@jax.jit
def _copy(tree: Any) -> Any:
    """A fresh copy of every array, in one dispatch (the caller keeps the originals; fit donates the copy)."""
    return jax.tree.map(jnp.copy, tree)


def _pad(stacked: Any, rows: int) -> Any:
    """Stacked batches with zero batches appended up to ``rows``."""

    def pad(x: Any) -> Any:
        if x.shape[0] >= rows:
            return x
        lib = jnp if isinstance(x, jax.Array) else np
        return lib.concatenate([x, lib.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])

    return jax.tree.map(pad, stacked)


def _stack(batches: list[Any]) -> Any:
    stack = jnp.stack if any(isinstance(x, jax.Array) for x in jax.tree.leaves(batches[0])) else np.stack
    return jax.tree.map(lambda *xs: stack(xs), *batches)


class _Metrics(Mapping[str, Any]):
    """A call's metrics for hooks: each a device array with a leading axis of the call's steps, sliced on access."""

    def __init__(self, fetch: Any, scalars: bool) -> None:
        self._fetch, self._scalars = fetch, scalars

    def _all(self) -> dict[str, Any]:
        if hasattr(self._fetch, "metrics"):
            return dict(self._fetch.metrics)
        rows, names, n = self._fetch.device, self._fetch.names, self._fetch.n
        if self._scalars:
            return {name: rows[0, j] for j, name in enumerate(names)}
        return {name: rows[:n, j] for j, name in enumerate(names)}

    def __getitem__(self, name: str) -> Any:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fetch.metrics if hasattr(self._fetch, "metrics") else self._fetch.names)

    def __len__(self) -> int:
        return len(list(iter(self)))
