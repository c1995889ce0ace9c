"""The plugin contract: the hooks a jaxpipe plugin may implement.

A plugin is a module or object with functions marked ``@jaxpipe.hookimpl``,
named like the hooks below, registered through the ``jaxpipe`` entry-point
group in the plugin's ``pyproject.toml``::

    [project.entry-points.jaxpipe]
    nancheck = "jaxpipe_nancheck"

Import heavy libraries inside the hook bodies, not at module top, so that
``import jaxpipe`` stays fast. Block a plugin by name with
``JAXPIPE_DISABLE_PLUGINS=name1,name2``.

Isolation, who is protected from whom:

- An installed plugin (an entry point) is code the user did not write for this
  run, so it cannot end the run. If it fails to import (even by ``sys.exit``),
  or its ``jaxpipe_register_stages`` raises, it is skipped with one
  :class:`~jaxpipe.errors.PluginWarning`. If one of its run hooks (the hooks
  below, called by ``init``/``fit``) raises, one PluginWarning names the plugin
  and the hook, that hook of that plugin is off for the rest of the run, and
  training and saving go on. ``KeyboardInterrupt`` in its hook during ``fit``
  means what Ctrl-C means there: stop after the current step (end hooks and
  the final checkpoint still run); after a stop was already asked for (a
  second Ctrl-C), and outside ``fit``, it propagates. Its hook wrappers
  (``wrapper=True`` or ``hookwrapper=True``) are guarded the same way: one that
  raises before or after its ``yield``, breaks the protocol (no yield, two) or
  returns the wrong kind is off for the run, and the hooks it wraps answer as
  if it were not there; their own exceptions pass through it unchanged.
- A stage's run hooks (``StageKind.run_hooks``, e.g. the ``.checkpoint()``
  saver) are part of the pipeline the user asked for, and the objects passed as
  ``fit(hooks=[...])`` are the user's own code: their exceptions propagate and
  end the run, so a checkpoint that could not be written is never a warning
  that scrolls by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike
    from jaxpipe._core.run import FitRun
    from jaxpipe._core.stage import StageKind
    from jaxpipe._core.state import TrainState

hookspec = pluggy.HookspecMarker("jaxpipe")
hookimpl = pluggy.HookimplMarker("jaxpipe")


# --- registration: called once, the first time a plugin stage is looked up ----


@hookspec
def jaxpipe_register_stages() -> list[StageKind]:  # type: ignore[empty-body]
    """Return the stage kinds this plugin adds to :class:`~jaxpipe.Pipeline`.

    Each :class:`~jaxpipe.StageKind` becomes a method of ``Pipeline`` (so
    ``StageKind("clip", apply=...)`` gives ``Pipeline(f).clip(...)``), a name in
    ``%%jaxpipe`` specs, and a row of ``jaxpipe plugins``. Its options are the
    parameters of ``apply`` after the function. Two plugins giving the same name
    make that name raise :class:`~jaxpipe.errors.PluginError` naming both.

    Returns:
      A list of stage kinds (empty if none).
    """


# --- training runs: called by Pipeline.init and Pipeline.fit -------------------
#
# Besides plugins registered through entry points, a stage kind's ``Training`` role may give
# ``run_hooks(options)``: an object with these hooks that is registered only
# while ``init``/``fit`` of a pipeline holding that stage runs. The Orbax
# ``.checkpoint()`` stage saves and restores through them.


@hookspec(firstresult=True)
def jaxpipe_state_shardings(pipeline: PipelineLike, state: Any) -> Any:
    """Say where each array of a new training state should live, before it is made.

    Called by ``Pipeline.init`` with the state's shapes (``jax.eval_shape`` of
    the stages' ``init`` contributions; Flax partitioning boxes kept). Given
    shardings, ``init`` compiles the initialiser with them as
    ``out_shardings``, so each device makes only its own shard and none ever
    holds a whole parameter. The ``.data_parallel`` stage implements it.
    Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` being initialised.
      state: a :class:`~jaxpipe.TrainState` of ``jax.ShapeDtypeStruct`` leaves.

    Returns:
      A tree like ``state`` of ``jax.sharding.Sharding``, or None to make the
      state eagerly on the default device.
    """


@hookspec(firstresult=True)
def jaxpipe_init_state(pipeline: PipelineLike, state: TrainState, which: str) -> TrainState | None:
    """Replace a freshly initialised training state, e.g. by a restored one.

    Called at the end of ``Pipeline.init`` with the state built by the stages'
    ``init`` contributions. Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` being initialised.
      state: the new :class:`~jaxpipe.TrainState`.
      which: ``init``'s ``which``: ``"newest"`` (the default: the newest saved
        state) or ``"best"`` (the state a saver kept for its best evaluation,
        e.g. ``.checkpoint(..., best="eval_loss")``). An implementation may
        leave the argument out of its signature (then it restores the newest).

    Returns:
      A state to use instead, or None to keep ``state``.
    """


@hookspec(firstresult=True)
def jaxpipe_fit_resume(run: FitRun, state: TrainState) -> TrainState | None:
    """Give ``fit`` a newer state to continue from, e.g. the latest checkpoint.

    Called once at the start of ``Pipeline.fit`` before ``jaxpipe_fit_start``.
    Stops at the first non-None result.

    Args:
      run: the :class:`~jaxpipe.FitRun` about to start.
      state: the state ``fit`` was given.

    Returns:
      A state to continue from, or None to keep ``state``.
    """


@hookspec(firstresult=True)
def jaxpipe_save_state(pipeline: PipelineLike, state: TrainState) -> bool | None:
    """Save a training state now, for a step loop written by hand.

    Called by ``Pipeline.save(state)``; the Orbax ``.checkpoint()`` stage
    implements it. The state must be written when the hook returns. Stops at
    the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` whose stage saves.
      state: the :class:`~jaxpipe.TrainState` to save.

    Returns:
      True if ``state`` was written, False if it was deliberately not (e.g.
      its step is saved already, or it holds NaN), or None if this plugin does
      not save for ``pipeline``.
    """


@hookspec(firstresult=True)
def jaxpipe_restore_state(pipeline: PipelineLike, state: TrainState, which: str) -> TrainState | None:
    """Read back the newest saved training state, for a step loop written by hand.

    Called by ``Pipeline.restore(state)``; the Orbax ``.checkpoint()`` stage
    implements it. Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` whose stage saves.
      state: a :class:`~jaxpipe.TrainState` giving the structure, shapes,
        dtypes and placement to restore into.
      which: ``Pipeline.restore``'s ``which``: ``"newest"`` (the default) or
        ``"best"``, as for :func:`jaxpipe_init_state`.

    Returns:
      The restored state, ``state`` itself if nothing is saved yet, or None if
      this plugin does not save for ``pipeline``.
    """


@hookspec(firstresult=True)
def jaxpipe_place_state(pipeline: PipelineLike, state: TrainState) -> TrainState | None:
    """Put a training state on the devices it trains on, e.g. replicated over a mesh.

    Called at the end of ``Pipeline.init`` (after ``jaxpipe_init_state``) and
    by ``Pipeline.fit`` after ``jaxpipe_fit_resume``, so a restored state lands
    where a fresh one would. The ``.data_parallel`` stage implements it.
    Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` being trained.
      state: the :class:`~jaxpipe.TrainState`.

    Returns:
      The placed state, or None to leave it as it is.
    """


@hookspec(firstresult=True)
def jaxpipe_place_batch(run: FitRun, batch: Any, whole: bool) -> Any:
    """Put one host batch on the devices before the training step that reads it.

    Called by ``Pipeline.fit`` before every call of the step (with the stacked
    batches of a ``.scan(k)`` call). Across several processes, each builds its
    part of the global batch, e.g. with ``jax.make_array_from_process_local_data``.
    Stops at the first non-None result.

    Args:
      run: the :class:`~jaxpipe.FitRun`.
      batch: the batch as host arrays.
      whole: True when every process holds the whole global batch (``fit``
        over a dict of arrays); False when each process's batch is its own
        share (``fit`` over an iterable of batches).

    Returns:
      The batch to call the step with, or None to pass ``batch`` unchanged.
    """


@hookspec(firstresult=True)
def jaxpipe_batch_shards(run: FitRun) -> int | None:
    """How many equal parts the devices split each batch into along its first axis.

    ``fit`` pads a training set it puts on the devices to a multiple of this
    (with rows its shuffle never picks) and budgets each device's share.
    Stops at the first non-None result.

    Args:
      run: the :class:`~jaxpipe.FitRun`.

    Returns:
      The number of parts, or None for one device.
    """


@hookspec(firstresult=True)
def jaxpipe_place_data(run: FitRun, data: dict[str, Any]) -> Any:
    """Put a whole training set on the devices once, split along its first axis as the batches are.

    Called by ``Pipeline.fit`` when the data fits on the devices; each call
    then gathers its batches there. Every process passes the whole data set.
    Stops at the first non-None result.

    Args:
      run: the :class:`~jaxpipe.FitRun`.
      data: the training set as host arrays, rows a multiple of
        ``jaxpipe_batch_shards``.

    Returns:
      The placed data, or None to let ``fit`` put it on the default device.
    """


@hookspec(firstresult=True)
def jaxpipe_fit_progress(run: FitRun) -> Any:
    """Supply the progress display of ``fit``, in place of its tqdm bar.

    Called by ``Pipeline.fit`` (with ``progress=True``) before
    ``jaxpipe_fit_start``; the notebook dashboard implements it, so a notebook
    shows one progress display, not two. Stops at the first non-None result.

    Args:
      run: the :class:`~jaxpipe.FitRun` about to start.

    Returns:
      A tqdm-like object (``update(n)``, ``set_postfix(dict, refresh=)``,
      ``write(text)``, ``close()``), or None for the default bar.
    """


@hookspec
def jaxpipe_fit_start(run: FitRun, state: TrainState) -> None:
    """Called once before the first step of ``Pipeline.fit``.

    Args:
      run: the :class:`~jaxpipe.FitRun`: the pipeline, the planned number of
        steps, the history so far, and ``run.stop()`` to end after the current
        step.
      state: the state training starts from.
    """


@hookspec
def jaxpipe_fit_step(run: FitRun, state: TrainState, metrics: dict[str, Any]) -> None:
    """Called after every compiled call of the training step.

    ``fit`` runs several steps per call (``.scan(k)``'s k, or as many as take
    about 0.2 s; calls end at epoch ends and at multiples of a stage's
    ``every``). A hook given to ``fit(hooks=...)`` or a plugin keeps one step
    per call unless its object says ``accepts_calls = True``.

    Args:
      run: the :class:`~jaxpipe.FitRun`; ``run.step`` is the state's step.
      state: the state after the call; its arrays are donated to the next
        call, so copy what you keep (``jax.device_get(state)``).
      metrics: the call's metrics as JAX arrays, still being computed, each
        with a leading axis of the call's steps (scalars for a hook that
        keeps one step per call); ``float()`` waits for the
        call, so read them only when needed. ``run.history`` holds them as
        ``{"step", "epoch", **metrics}`` rows, read back one call late.
    """


@hookspec
def jaxpipe_fit_epoch_end(run: FitRun, state: TrainState, metrics: dict[str, Any]) -> None:
    """Called at the end of each epoch, with the epoch's eval metrics if any."""


@hookspec
def jaxpipe_fit_evaluated(run: FitRun, state: TrainState, metrics: dict[str, float]) -> None:
    """Called after each evaluation of ``eval_data`` (each epoch's end, or every ``eval_every`` steps).

    Args:
      run: the run; ``run.eval_history[-1]`` is this evaluation's row.
      state: the state evaluated (donated to the next call: copy what you keep).
      metrics: the eval metrics, named ``eval_<metric>`` (e.g. ``eval_loss``).

    Call ``run.stop()`` to end training after this call (early stopping).
    """


@hookspec
def jaxpipe_fit_end(run: FitRun, state: TrainState) -> None:
    """Called once when ``fit`` ends: finished, stopped or interrupted.

    ``run.interrupted`` tells whether Ctrl-C or ``run.stop()`` ended it early.
    An implementation must leave ``state`` usable, e.g. wait for async saves.
    """
