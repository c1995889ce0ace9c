"""The plugin contract: the hooks a jaxpipe plugin may implement.

A plugin is a module or object with functions marked ``@jaxpipe.hookimpl``,
named like the hooks below, registered through the ``jaxpipe`` entry-point
group in the plugin's ``pyproject.toml``::

    [project.entry-points.jaxpipe]
    nancheck = "jaxpipe_nancheck"

Import heavy libraries inside the hook bodies, not at module top, so that
``import jaxpipe`` stays fast. A plugin that fails to import, or whose hook
raises, is skipped with one :class:`~jaxpipe.errors.PluginWarning`; block a
plugin by name with ``JAXPIPE_DISABLE_PLUGINS=name1,name2``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from jaxpipe._stages import StageKind

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
# Besides plugins registered through entry points, a stage kind may give
# ``run_hooks(options)``: an object with these hooks that is registered only
# while ``init``/``fit`` of a pipeline holding that stage runs. The Orbax
# ``.checkpoint()`` stage saves and restores through them.


@hookspec(firstresult=True)
def jaxpipe_init_state(pipeline: Any, state: Any) -> Any:
    """Replace a freshly initialised training state, e.g. by a restored one.

    Called at the end of ``Pipeline.init`` with the state built by the stages'
    ``init`` contributions. Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` being initialised.
      state: the new :class:`~jaxpipe.TrainState`.

    Returns:
      A state to use instead, or None to keep ``state``.
    """


@hookspec(firstresult=True)
def jaxpipe_fit_resume(run: Any, state: Any) -> Any:
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
def jaxpipe_save_state(pipeline: Any, state: Any) -> Any:
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
def jaxpipe_restore_state(pipeline: Any, state: Any) -> Any:
    """Read back the newest saved training state, for a step loop written by hand.

    Called by ``Pipeline.restore(state)``; the Orbax ``.checkpoint()`` stage
    implements it. Stops at the first non-None result.

    Args:
      pipeline: the :class:`~jaxpipe.Pipeline` whose stage saves.
      state: a :class:`~jaxpipe.TrainState` giving the structure, shapes,
        dtypes and placement to restore into.

    Returns:
      The restored state, ``state`` itself if nothing is saved yet, or None if
      this plugin does not save for ``pipeline``.
    """


@hookspec(firstresult=True)
def jaxpipe_place_state(pipeline: Any, state: Any) -> Any:
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
def jaxpipe_place_batch(run: Any, batch: Any, whole: bool) -> Any:
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
def jaxpipe_fit_progress(run: Any) -> Any:
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
def jaxpipe_fit_start(run: Any, state: Any) -> None:
    """Called once before the first step of ``Pipeline.fit``.

    Args:
      run: the :class:`~jaxpipe.FitRun`: the pipeline, the planned number of
        steps, the history so far, and ``run.stop()`` to end after the current
        step.
      state: the state training starts from.
    """


@hookspec
def jaxpipe_fit_step(run: Any, state: Any, metrics: dict[str, Any]) -> None:
    """Called after every training step (every call, for ``.scan(k)``).

    Args:
      run: the :class:`~jaxpipe.FitRun`; ``run.step`` is the state's step.
      state: the state after the step.
      metrics: that step's metrics as JAX arrays, still being computed (each
        with a leading axis of k under ``.scan(k)``); ``float()`` waits for
        the step, so read them only when needed. ``run.history`` holds them as
        floats, read back every ``log_every`` steps.
    """


@hookspec
def jaxpipe_fit_epoch_end(run: Any, state: Any, metrics: dict[str, Any]) -> None:
    """Called at the end of each epoch, with the epoch's eval metrics if any."""


@hookspec
def jaxpipe_fit_end(run: Any, state: Any) -> None:
    """Called once when ``fit`` ends: finished, stopped or interrupted.

    ``run.interrupted`` tells whether Ctrl-C or ``run.stop()`` ended it early.
    An implementation must leave ``state`` usable, e.g. wait for async saves.
    """
