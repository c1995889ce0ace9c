"""``Pipeline.fit``: the plan, the run's hooks, and the loop over planned calls.

The loop is exactly resumable: the batches of epoch ``e`` come from a
permutation keyed by ``fold_in(state.data_key, e)``, and the position in the
data is a function of ``state.step``; so a run restored from a checkpoint at
step ``s`` sees the batches an uninterrupted run would have seen, bit for bit,
however many steps each call runs. The parts: :mod:`.plan` (arguments),
:mod:`.schedule` (calls and periods), :mod:`.sources` (data), :mod:`.program`
(the compiled calls), :mod:`.readback` (metrics, the non-finite guard) and
:mod:`.callbacks` (hooks, progress, the end's rule for errors), put together
in :mod:`.loop`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.run import FitRun
from jaxpipe._core.state import TrainState
from jaxpipe._plugins.manager import run_hooks
from jaxpipe._training import grain
from jaxpipe._training.callbacks import Callbacks, graceful_interrupt
from jaxpipe._training.loop import Loop
from jaxpipe._training.plan import make_plan
from jaxpipe.errors import PipelineError


def fit(
    pipe: PipelineLike,
    state: TrainState,
    data: Mapping[str, Any] | Iterable[Any],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_data: Any = None,
    eval_batch_size: int | None = None,
    eval_every: int | None = None,
    eval_params: Callable[[TrainState], Any] | None = None,
    progress: bool | Callable[..., Any] = True,
    log_every: int = 10,
    hooks: Sequence[object] = (),
    device_data: bool | str = "auto",
    on_nonfinite: str = "raise",
    steps_per_call: int | None = None,
    resume: bool = True,
) -> TrainState:
    """Trains ``state`` until the run's total of ``epochs`` epochs (or ``steps`` steps).

    A pipeline ending in ``.jit()`` runs in ``fit``'s own compiled program,
    with the state donated from call to call (the caller's ``state`` stays
    valid). Steps per call are ``.scan(k)``'s k, ``steps_per_call``, or
    measured: the first calls run one step each and are timed, and a call of
    k steps (as many as take about 0.2 s) is kept only if its steps, timed in
    turn, are faster than single steps (XLA:CPU runs convolutions far slower
    inside a loop, so such models keep one step per call). Calls end at epoch
    ends and at multiples of a stage's period such as ``.checkpoint(every=...)``
    and of ``eval_every``.

    The batches are the same bit for bit however the steps are grouped. The
    result is too with one step per call (``steps_per_call=1``): it equals a
    loop of ``trainer(state, batch)``. A call of k steps runs them inside a
    ``lax.scan``, where XLA may fuse the step differently, so on some models
    the parameters differ from that loop in the last bits (ulps), never in
    the batches or the order.

    A ``.jit(...)`` with options that change how the step is called or where
    it runs (``static_argnums``/``static_argnames``, ``donate_argnums``,
    ``in_shardings``/``out_shardings``, ``mesh``, ``device``, ``backend``), no
    ``.jit()`` at all, or a stage after ``.jit()`` that changes the function,
    makes ``fit`` call the pipeline as built: one call per step (or per
    ``.scan(k)`` group), each given exactly the batch a hand-written loop
    would pass. ``keep_unused``, ``inline`` and ``compiler_options`` are kept
    in ``fit``'s own program.

    Args:
      pipe: a pipeline whose built function is a step ``(state, batch) ->
        (state, metrics)`` (``.model(...).optimize(...)``, optionally
        ``.scan(k)`` and ``.jit()``).
      state: the state to start from; a ``.checkpoint()`` stage may resume a
        newer one from disk.
      data: a dict of arrays, shuffled each epoch, or an iterable of batches
        (taken in order; a resumed run skips those already trained on, or
        restores the iterator's position when it has ``get_state``/``set_state``).
      epochs: the run's total (default 1): a run resumed at step ``s``
        continues to the same end rather than adding epochs.
      steps: the run's total of steps instead of ``epochs`` (passes over the
        data continue in the next epoch's order; an iterator that runs out
        ends the run); schedules see the real step.
      batch_size: examples per step (needed for a dict of arrays; the last
        partial batch of each epoch is dropped). Given with an iterable, its
        items are single examples (e.g. Grain records), stacked into batches.
      eval_data: evaluated at the end of every epoch (or every ``eval_every``
        steps): a dict of arrays, a re-iterable of batches (a list, a Grain
        dataset), or a function returning an iterable of batches.
      eval_batch_size: examples per evaluation call for a dict of arrays;
        None evaluates the whole eval set in one call (one compile, no partial
        last batch).
      eval_every: steps between evaluations, and at the run's end; None
        evaluates at each epoch's end.
      eval_params: which parameters to evaluate, a function of the state,
        e.g. ``lambda state: state.extra["ema_params"]`` for ``.ema()``'s
        average; None evaluates ``state.params``.
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
      steps_per_call: steps per compiled call; None measures (see above).
      resume: False starts over: a checkpointer does not restore (``run.resume``).

    Returns:
      The final state.

    Raises:
      KeyboardInterrupt: after Ctrl-C, once the current call has ended and the
        end hooks have saved (Python's convention: a script does not go on as
        if training had finished); its ``state`` attribute is the state it
        stopped at. The notebook dashboard's Stop returns normally, with
        ``run.interrupted`` set.
      NonFiniteError: a step gave a non-finite metric (``on_nonfinite="raise"``);
        its ``state`` is the last finite one.

    Errors in hooks or the progress display end the run, but never cost the
    checkpoint of the steps already trained: every end hook still runs (see
    ``jaxpipe/_training/callbacks.py`` for the rule), then the error is raised.
    """
    try:
        data = grain.as_batches(data)  # Grain datasets and loaders: iterables whose position can be saved
    except PipelineError as err:
        raise PipelineError(err.detail, pipeline=repr(pipe)) from None
    plan = make_plan(
        pipe,
        state,
        data,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        eval_data=eval_data,
        eval_batch_size=eval_batch_size,
        eval_every=eval_every,
        eval_params=eval_params,
        log_every=log_every,
        hooks=hooks,
        device_data=device_data,
        on_nonfinite=on_nonfinite,
        steps_per_call=steps_per_call,
    )
    run = FitRun(pipe, plan.epochs, batch_size, plan.steps_per_epoch, plan.total, resume=bool(resume))
    run.evaluates = plan.eval_data is not None
    with run_hooks(pipe, plan.hooks) as hook:
        callbacks = Callbacks(hook, run, plan.hooks)
        resumed = callbacks.resume(state)
        state = state if resumed is None else resumed
        placed = callbacks.place_state(state)
        state = state if placed is None else placed
        run.start_step = run.step = int(state.step)
        if plan.total is not None and run.step >= plan.total:
            _say_complete(run, resumed is not None)
        bar, own_bar = callbacks.display(progress)
        loop = Loop(pipe, run, callbacks, bar, own_bar, plan)
        # Ctrl-C (or the kernel's interrupt button) stays "stop after this call" until the end hooks
        # have saved: a late one must not cut a checkpoint short. The dashboard's Stop calls run.stop().
        with graceful_interrupt(run):
            try:
                callbacks.start(state)
                loop.train(state)
            except BaseException as err:
                run.error = err
                raise
            finally:
                callbacks.finish([loop.close, bar.close], loop.state)
                callbacks.raise_outcome(run.error, loop.state)
    if loop.nonfinite is not None:
        warnings.warn(loop.message, RuntimeWarning, stacklevel=3)
    return loop.state()


def _say_complete(run: FitRun, resumed: bool) -> None:
    source = "the newest checkpoint" if resumed else "the state"
    more = f"epochs={run.epochs * 2}" if run.steps_per_epoch else f"steps={(run.total_steps or 0) * 2}"
    print(
        f"fit: the run is already complete: {source} is at step {run.step} of {run.total_steps} "
        f"({run.epochs} epochs); nothing to train. To train more, raise `epochs` or `steps` (e.g. {more}); "
        f"to start over, use a new directory, or trainer.init(key, batch, resume=False) and fit(..., resume=False).",
        file=sys.stderr,
    )
