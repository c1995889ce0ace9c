"""``Pipeline.fit``: the training loop, its data order, and its hooks.

The loop is exactly resumable: the batches of epoch ``e`` come from a
permutation keyed by ``fold_in(state.data_key, e)``, and the position in the
data is a function of ``state.step``; so a run restored from a checkpoint at
step ``s`` sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxpipe._fold import fold
from jaxpipe._stages import Stage, StageContext
from jaxpipe._train import TrainState, run_hooks, scan_steps
from jaxpipe.errors import PipelineError

if TYPE_CHECKING:
    from jaxpipe._pipeline import Pipeline


@dataclasses.dataclass
class FitRun:
    """One call of ``fit``, as plugin hooks see it.

    Attributes:
      pipeline: the pipeline being trained.
      epochs: the run's total number of epochs (not a count to add).
      batch_size: examples per step (None for an iterable of batches).
      steps_per_epoch: steps in one epoch, if the data has a length.
      total_steps: the step the run ends at, if known.
      start_step: the step this call started from (after any resume).
      step: the state's step after the latest call.
      history: one dict of float metrics per step, filled as ``fit`` runs.
      eval_history: one dict of eval metrics per epoch with an eval set.
      interrupted: whether Ctrl-C or :meth:`stop` ended the run early.
      error: the exception that ended the run, if a step failed.
    """

    pipeline: Any
    epochs: int
    batch_size: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    start_step: int = 0
    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    eval_history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    error: BaseException | None = None
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def stop(self) -> None:
        """Ends training cleanly after the current step (thread-safe)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def position(self) -> dict[str, int]:
        """Where in the data the next step starts: epoch and batch within it."""
        per_epoch = self.steps_per_epoch or 0
        return {"epoch": self.epoch, "batch": self.step % per_epoch if per_epoch else self.step}


# --- data ---------------------------------------------------------------------


def _check_arrays(data: Mapping[str, Any], what: str) -> int:
    sizes: dict[str, int | None] = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in data.items()}
    size = next(iter(sizes.values()), None)
    if size is None or len(set(sizes.values())) != 1:
        raise PipelineError(
            f"`fit` needs {what} as a dict of arrays with the same number of examples along axis 0, "
            f"got sizes {sizes}.\nGive e.g. {{'image': x_train, 'label': y_train}}."
        )
    return size


def epoch_order(data_key: jax.Array, epoch: int, size: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation keyed by (data_key, epoch)."""
    if isinstance(data_key, jax.Array) and len(data_key.sharding.device_set) > 1 and data_key.is_fully_replicated:
        data_key = data_key.addressable_data(0)  # a key replicated over a mesh: shuffle on one local device
    return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), size))


def _array_calls(
    data: Mapping[str, Any],
    state: TrainState,
    batch_size: int,
    per_call: int,
    steps_per_epoch: int,
    start: int,
    end: int,
) -> Iterator[tuple[int, Any]]:
    """(steps in the call, batch or stacked batches) from step ``start`` to ``end``."""
    host = {key: np.asarray(value) for key, value in data.items()}
    size = next(iter(host.values())).shape[0]
    step = start
    while step < end:
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(state.data_key, epoch, size)[: steps_per_epoch * batch_size]
        while offset < steps_per_epoch and step < end:
            count = min(per_call, steps_per_epoch - offset, end - step)
            index = order[offset * batch_size : (offset + count) * batch_size]
            if per_call > 1:
                index = index.reshape(count, batch_size)
            yield count, {key: value[index] for key, value in host.items()}
            offset += count
            step += count


def _iterable_calls(data: Iterable[Any], per_call: int, skip: int, end: int | None) -> Iterator[tuple[int, Any]]:
    """Batches from an iterable, skipping the ``skip`` already trained on."""
    iterator = iter(data)
    for _ in range(skip):
        next(iterator, None)
    step = skip
    while end is None or step < end:
        group = [
            b for _, b in zip(range(per_call if end is None else min(per_call, end - step)), iterator, strict=False)
        ]
        if not group:
            return
        if per_call > 1:
            yield len(group), jax.tree.map(lambda *xs: np.stack(xs), *group)
        else:
            yield 1, group[0]
        step += len(group)


# --- evaluation ------------------------------------------------------------------


@functools.lru_cache(maxsize=8)  # one compiled evaluator per pipeline, not one per epoch
def evaluator(pipe: Pipeline) -> Callable[[TrainState, Any], dict[str, Any]] | None:
    """A jitted ``(state, batch) -> metrics`` from the last stage that can evaluate.

    A stage's ``evaluate`` may return None to leave evaluation to an earlier one.
    """
    found = None

    def note(fn: Callable[..., Any], stage: Stage, ctx: StageContext) -> Callable[..., Any]:
        nonlocal found
        training = stage.kind.training
        if training is not None and training.evaluate is not None:
            found = training.evaluate(fn, **stage.options) or found
        return stage.apply(fn)

    fold(pipe, note, pipe.fn, lambda stage, err: f"making the evaluation step of `.{stage.name}()` failed: {err}")
    return jax.jit(found) if found is not None else None


def evaluate(
    pipe: Pipeline, state: TrainState, data: Mapping[str, Any], batch_size: int | None = None
) -> dict[str, float]:
    """Metrics of ``state`` on a dict-of-arrays data set, averaged over examples."""
    step = evaluator(pipe)
    if step is None:
        raise PipelineError(
            "this pipeline has no stage that can evaluate (a `.model(...)` stage does).",
            pipeline=repr(pipe),
        )
    size = _check_arrays(data, "eval data")
    batch_size = min(batch_size or size, size)
    totals: dict[str, float] = {}
    for start in range(0, size, batch_size):
        batch = {key: np.asarray(value)[start : start + batch_size] for key, value in data.items()}
        count = next(iter(batch.values())).shape[0]
        for name, value in jax.device_get(step(state, batch)).items():
            totals[name] = totals.get(name, 0.0) + float(value) * count
    return {name: total / size for name, total in totals.items()}


# --- the loop ----------------------------------------------------------------------


@contextlib.contextmanager
def _graceful_interrupt(run: FitRun) -> Iterator[None]:
    """First Ctrl-C: stop after the current step. Second: interrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if run.stop_requested:
            raise KeyboardInterrupt
        run.interrupted = True
        run.stop()

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
    pipe: Pipeline,
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
) -> TrainState:
    """Trains ``state`` until the run's total of ``epochs`` epochs.

    Args:
      pipe: a pipeline whose built function is a step ``(state, batch) ->
        (state, metrics)`` (``.model(...).optimize(...)``, optionally
        ``.scan(k)`` and ``.jit()``).
      state: the state to start from; a ``.checkpoint()`` stage may resume a
        newer one from disk.
      data: a dict of arrays, shuffled each epoch, or an iterable of batches
        (taken in order; a resumed run skips those already trained on).
      epochs: the run's total: a run resumed at step ``s`` continues to the
        same end rather than adding epochs.
      batch_size: examples per step (needed for a dict of arrays; the last
        partial batch of each epoch is dropped).
      eval_data: a dict of arrays evaluated at the end of every epoch.
      eval_batch_size: examples per evaluation call; None evaluates the whole
        eval set in one call (one compile, no partial last batch).
      progress: show a progress bar (text in a terminal, a widget in Jupyter),
        or a ``tqdm``-like factory.
      log_every: steps between metric read-backs from the device.
      hooks: objects with ``@jaxpipe.hookimpl`` methods (a logger, a
        dashboard) called during this run only, like plugins.

    Returns:
      The final state; after Ctrl-C, the state after the last completed step.
    """
    if not isinstance(state, TrainState):
        raise PipelineError(
            f"`fit` needs the TrainState from `init`, got {type(state).__name__}.\n"
            f"Call state = trainer.init(jax.random.key(0), sample_batch) first.",
            pipeline=repr(pipe),
        )
    if not isinstance(epochs, int) or epochs < 1:
        raise PipelineError(f"`epochs` must be a positive int, got {epochs!r}.", pipeline=repr(pipe))
    per_call = scan_steps(pipe)
    if isinstance(data, Mapping):
        size = _check_arrays(data, "training data")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= size:
            raise PipelineError(
                f"`fit` on a dict of arrays needs `batch_size`, an int from 1 to the {size} examples in "
                f"the data; got {batch_size!r}.\nFor example batch_size={min(128, size)}.",
                pipeline=repr(pipe),
            )
        steps_per_epoch: int | None = size // batch_size
    else:
        steps_per_epoch = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    total = epochs * steps_per_epoch if steps_per_epoch is not None else None
    run = FitRun(pipe, epochs, batch_size, steps_per_epoch, total)
    with run_hooks(pipe, hooks) as hook:
        resumed = hook.jaxpipe_fit_resume(run=run, state=state)
        state = state if resumed is None else resumed
        placed = hook.jaxpipe_place_state(pipeline=pipe, state=state)
        state = state if placed is None else placed
        whole_batches = isinstance(data, Mapping)  # every process holds the whole data set
        run.start_step = run.step = int(state.step)
        if isinstance(data, Mapping):
            assert steps_per_epoch is not None and total is not None and batch_size is not None
            calls = _array_calls(data, state, batch_size, per_call, steps_per_epoch, run.step, total)
        else:
            epochs_of_data = 1 if steps_per_epoch is None else epochs
            source = (b for _ in range(epochs_of_data) for b in data) if epochs_of_data > 1 else data
            calls = _iterable_calls(source, per_call, run.step, total)
        supplied = hook.jaxpipe_fit_progress(run=run) if progress is True else None  # e.g. the dashboard
        bar = supplied if supplied is not None else _progress(progress, total, run.step)
        pending: list[tuple[int, Any]] = []

        def read_back() -> None:
            for count, metrics in jax.device_get(pending):
                rows = [{k: float(np.ravel(v)[i]) for k, v in metrics.items()} for i in range(count)]
                run.history.extend(rows)
            if pending and run.history:
                bar.set_postfix({k: f"{v:.4g}" for k, v in run.history[-1].items()}, refresh=False)
            pending.clear()

        hook.jaxpipe_fit_start(run=run, state=state)
        # Ctrl-C (or a kernel interrupt from the dashboard's Stop button) stays "stop after this step"
        # until the end hooks have saved: a late one must not cut a checkpoint short.
        with _graceful_interrupt(run):
            try:
                for count, batch in calls:
                    epoch_before = run.epoch
                    on_devices = hook.jaxpipe_place_batch(run=run, batch=batch, whole=whole_batches)
                    state, metrics = pipe(state, batch if on_devices is None else on_devices)
                    run.step += count
                    pending.append((count, metrics))
                    bar.update(count)
                    hook.jaxpipe_fit_step(run=run, state=state, metrics=metrics)
                    if len(pending) * per_call >= log_every:
                        read_back()
                    if run.epoch != epoch_before or run.step == total:
                        read_back()
                        _end_epoch(pipe, run, state, eval_data, eval_batch_size, bar, hook)
                    if run.stop_requested:
                        run.interrupted = True
                        break
                else:
                    if total is None and run.step > run.start_step:  # the end of data of unknown length
                        read_back()
                        _end_epoch(pipe, run, state, eval_data, eval_batch_size, bar, hook)
                read_back()
            except BaseException as err:
                run.error = err
                raise
            finally:
                bar.close()
                hook.jaxpipe_fit_end(run=run, state=state)
    return state


def _end_epoch(
    pipe: Pipeline, run: FitRun, state: TrainState, eval_data: Any, batch_size: Any, bar: Any, hook: Any
) -> None:
    metrics: dict[str, float] = {}
    if eval_data is not None:
        metrics = {f"eval_{k}": v for k, v in evaluate(pipe, state, eval_data, batch_size).items()}
        epoch = run.step // run.steps_per_epoch if run.steps_per_epoch else len(run.eval_history) + 1
        run.eval_history.append({"epoch": float(epoch), "step": float(run.step), **metrics})
        if not getattr(bar, "disable", False):
            bar.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    hook.jaxpipe_fit_epoch_end(run=run, state=state, metrics=metrics)
