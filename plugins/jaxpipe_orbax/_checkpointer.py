"""Saving and restoring one training run with an Orbax ``CheckpointManager``.

A :class:`Checkpointer` lives for one ``init``, ``fit``, ``Pipeline.save`` or
``Pipeline.restore`` call: jaxpipe registers it through the ``.checkpoint()``
stage's ``run_hooks``. Orbax does the work that must be right under crashes and
on many hosts: it writes each step into a temporary directory and renames it
when complete (so a killed process leaves only complete steps listed), saves
asynchronously after copying the arrays off the device, and lets only the
primary host create directories. Checkpoints are tensorstore arrays plus JSON,
never pickle.

jaxpipe keeps the directory to itself and does its own retention (Orbax's is
off): see ``_directory.py`` for who may change what.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
from typing import IO, Any, NoReturn

import jax
import jax.numpy as jnp

from jaxpipe import PipelineError, hookimpl
from jaxpipe_orbax import _best, _directory, _failures, _reading
from jaxpipe_orbax._data_state import NotJSONError, as_json
from jaxpipe_orbax._layout import abstract, differences, layout

_barriers = itertools.count()  # Orbax's process barriers need names never used before in this process
_RETRIES = 10  # restores retried when a writer's retention removed the step being read


class CheckpointWarning(UserWarning):
    """A checkpoint could not be used or written as is; training goes on."""


class Checkpointer:
    """The ``.checkpoint()`` stage's hooks for one run.

    Args:
      directory: where the step directories live; nothing is written elsewhere.
      every: save when ``fit`` crosses a multiple of ``every`` steps.
      keep: how many of the newest checkpoints to keep; None keeps all.
      best: an eval metric (e.g. ``"eval_loss"``): also keep the step whose
        evaluation was best by it, marked so in its metadata.
      mode: ``"min"`` or ``"max"``: which values of ``best`` are better.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every: int = 100,
        keep: int | None = 3,
        best: str | None = None,
        mode: str = "min",
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))  # already absolute when given by the stage
        self.every = every
        self.keep = keep
        self.best = None if best is None else _best.Best(best, mode)
        self._best_known: tuple[int, float] | None = None  # (step, value) of the best step so far
        self._best_loaded = False  # the marks on disk were read (or this run starts over)
        self._manager: Any = None
        self._lock: IO[bytes] | None = None
        self._claimed = False  # this run has prepared the directory for writing
        self._layout: dict[str, str] | None = None  # this run's state layout: the steps retention may delete
        self._damaged: dict[int, str] = {}  # steps found damaged while restoring, set aside before saving
        self._start_over = False  # fit(..., resume=False)
        self._warned_nonfinite = False
        self._saved_step = 0  # the newest step saved or resumed in this run
        self._in_flight: int | None = None  # the step Orbax may still be writing
        self._failed = False  # a save failed (and said so): nothing more is saved in this run
        self._kept: set[int] = set()  # old steps kept because they hold someone's files (warned once each)
        self._description: dict[str, str] = {}
        self._pipeline: Any = None  # the pipeline saving, for the errors of its asynchronous writes

    # --- hooks ------------------------------------------------------------------

    @hookimpl
    def jaxpipe_init_state(self, pipeline: Any, state: Any, which: str) -> Any:
        """``trainer.init``: the newest complete checkpoint (or the best), if there is one (reads only)."""
        try:
            return self._restore_which(pipeline, state, which)
        finally:
            self._close()

    @hookimpl
    def jaxpipe_restore_state(self, pipeline: Any, state: Any, which: str) -> Any:
        """``Pipeline.restore``: the newest complete checkpoint (or the best), or ``state`` itself (reads only)."""
        try:
            restored = self._restore_which(pipeline, state, which)
        finally:
            self._close()
        return state if restored is None else restored

    @hookimpl
    def jaxpipe_save_state(self, pipeline: Any, state: Any) -> bool:
        """``Pipeline.save``: saves ``state`` and waits until it is written."""
        if not hasattr(state, "step"):
            raise PipelineError(
                f"`save` needs the TrainState from `init`, got {type(state).__name__}.\n"
                f"Call state = trainer.init(jax.random.key(0), sample_batch) first.",
                stage_name="checkpoint",
                pipeline=repr(pipeline),
            )
        try:
            written = self._save(pipeline, state, run=None)
        finally:
            self._close()
        return written

    @hookimpl
    def jaxpipe_fit_resume(self, run: Any, state: Any) -> Any:
        """``fit``: the newest complete checkpoint, if it is newer than ``state``."""
        try:
            if self.best is not None and not getattr(run, "evaluates", False):
                raise self._error(
                    run.pipeline,
                    f"best={self.best.metric!r} keeps the step with {self.best!r}, but this `fit` has no "
                    f"`eval_data`, so nothing is evaluated.\nPass the data to evaluate, e.g. "
                    f"trainer.fit(state, data, epochs=10, eval_data=test), or leave `best` out of `.checkpoint()`.",
                )
            restored = None
            if not getattr(run, "resume", True):
                self._start_over = True  # the earlier run's steps are moved aside before the first save
                self._survey(run.pipeline, state, check_layout=False)  # refuse a foreign directory now
            else:
                restored = self._restore(run.pipeline, state, newer_than=int(state.step), run=run)
            step = int((state if restored is None else restored).step)
            if run.total_steps is None or step < run.total_steps:  # this run will save: say now if it cannot
                problem = _directory.not_writable(self.directory)
                if problem is not None:
                    raise self._unwritable(run.pipeline, problem)
            return restored
        except BaseException:
            self._close()
            raise

    @hookimpl
    def jaxpipe_fit_start(self, run: Any, state: Any) -> None:
        del state  # the step is in run.start_step
        self._saved_step = run.start_step
        self._description = {"pipeline": repr(run.pipeline), "explain": run.pipeline.explain()}

    @hookimpl
    def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
        del metrics  # not saved
        # With .scan(k) one call advances k steps: save when a multiple of `every` was crossed.
        if run.step // self.every > self._saved_step // self.every:
            self._save(run.pipeline, state, run)

    @hookimpl
    def jaxpipe_fit_evaluated(self, run: Any, state: Any, metrics: Any) -> None:
        """With ``best=``: an evaluation better than the best so far saves its state (if needed) and marks it."""
        if self.best is None or self._failed:
            return
        try:
            value = self.best.value(metrics)
        except KeyError:
            raise self._error(
                run.pipeline,
                f"best={self.best.metric!r} names a metric that the evaluation does not report; it reports "
                f"{', '.join(map(repr, metrics)) or 'none'}.\nName one of those, e.g. "
                f".checkpoint(..., best={next(iter(metrics), 'eval_loss')!r}).",
            ) from None
        if not self._best_loaded:
            self._best_loaded = True
            found = None if self._start_over else _directory.survey(self.directory)
            if found is not None:
                self._best_known = _best.best_step(found, self.best, layout(state))
        if value is None or not self.best.better(value, None if self._best_known is None else self._best_known[1]):
            return
        if self._save(run.pipeline, state, run, best=self.best.record(value)):
            self._best_known = (run.step, value)

    @hookimpl
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        """Saves the final or interrupted state, then always waits for the writes in flight.

        Not after a failed step (``run.error_in_step``): its state may be wrong.
        After an error in user code (a hook, a display) the state is good and is saved.
        """
        good = run.error is None or not run.error_in_step
        try:
            if good and not self._failed and run.step != self._saved_step:
                self._save(run.pipeline, state, run)
        finally:
            self._close()

    # --- the directory --------------------------------------------------------------

    def _survey(self, pipeline: Any, state: Any, check_layout: bool = True) -> _directory.Survey | None:
        """What the directory holds; refuses one that holds anything else, or another training state's steps."""
        found = _directory.survey(self.directory)
        if found is not None and found.foreign:
            raise self._error(pipeline, _directory.refusal(self.directory, found))
        if found is not None and check_layout:
            current = layout(state)
            for step in sorted(found.steps, reverse=True):
                meta = found.steps[step]
                if meta is not None and meta.get("layout", current) != current:
                    raise self._error(pipeline, self._mismatch(pipeline, meta, current, step))
        return found

    def _claim(self, pipeline: Any, state: Any) -> None:
        """Before this run's first save: the marker, the writer lock, and tidying what earlier runs left."""
        from orbax.checkpoint import multihost

        found = self._survey(pipeline, state, check_layout=not self._start_over)
        self._layout = layout(state)
        if multihost.is_primary_host(0):
            try:  # before Orbax starts: its failed saves leave threads that keep the process from exiting
                _directory.create(self.directory)
                _directory.probe(self.directory)
            except OSError as err:
                raise self._unwritable(pipeline, err) from err
            self._lock = _directory.writer_lock(self.directory)
            if found is not None:
                self._tidy(found)
        multihost.sync_global_processes(f"jaxpipe_checkpoint_claim_{next(_barriers)}")
        self._claimed = True

    def _tidy(self, found: _directory.Survey) -> None:
        """Sets aside damaged steps, removes abandoned unfinished saves, moves an earlier run aside (primary host)."""
        if self._lock is not None and found.unfinished:
            warnings.warn(
                f"{self.directory} holds {len(found.unfinished)} unfinished save(s) ({', '.join(found.unfinished)}) "
                f"left by a process that stopped while writing them (no other jaxpipe process is writing here). "
                f"They are not checkpoints and were removed.",
                CheckpointWarning,
                stacklevel=6,
            )
            for name in found.unfinished:
                _directory.remove(os.path.join(self.directory, name))
        if self._lock is not None:
            for name in found.leftovers:  # old steps whose deletion a stopped writer did not finish
                if not _directory.foreign_in_step(os.path.join(self.directory, name)):
                    _directory.remove(os.path.join(self.directory, name))
        damaged = {**found.reasons, **self._damaged}
        for step in sorted(damaged):
            if step in found.steps:
                _directory.set_aside(self.directory, step)
        if self._start_over:
            steps = sorted(step for step in found.steps if step not in damaged)
            if steps:
                folder = _directory.move_earlier_run(self.directory, steps)
                print(
                    f"jaxpipe: fit(..., resume=False): moved the earlier run's checkpoints "
                    f"(steps {', '.join(map(str, steps))}) to {folder}; this run starts afresh.",
                    flush=True,
                )

    def _retain(self) -> None:
        """Deletes this run's own complete steps beyond the newest ``keep``, but the best one (primary host)."""
        from orbax.checkpoint import multihost

        if self.keep is None or self._layout is None or not multihost.is_primary_host(0):
            return
        found = _directory.survey(self.directory)
        if found is None:
            return
        own = sorted(step for step, meta in found.steps.items() if meta and meta.get("layout") == self._layout)
        kept_best = None if self.best is None else _best.best_step(found, self.best, self._layout)
        for step in own[: -self.keep]:
            if kept_best is not None and step == kept_best[0]:
                continue  # the best step stays until a better one is marked
            try:
                kept = _directory.remove_step(self.directory, step)
            except OSError as err:  # e.g. replaced by a link meanwhile: left alone
                warnings.warn(f"could not remove old checkpoint step {step}: {err}", CheckpointWarning, stacklevel=2)
                continue
            if kept and step not in self._kept:
                self._kept.add(step)
                warnings.warn(
                    f"old checkpoint step {step} in {self.directory} is kept: it holds things jaxpipe did not write "
                    f"({', '.join(kept)}), and jaxpipe deletes nothing of yours. Move them out of "
                    f"{os.path.join(self.directory, str(step))} and a later save removes the step.",
                    CheckpointWarning,
                    stacklevel=2,
                )

    # --- saving -------------------------------------------------------------------

    def _open(self) -> Any:
        """The manager that saves (after :meth:`_claim`)."""
        if self._manager is None:
            import orbax.checkpoint as ocp

            # Orbax's own retention and clean-up stay off (keep all, no tmp clean-up): jaxpipe decides
            # what may be deleted. create=False: jaxpipe creates the directory with its marker.
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def _drop_manager(self) -> None:
        manager, self._manager = self._manager, None
        if manager is None:
            return
        try:
            self._wait(manager)
        except BaseException:
            with contextlib.suppress(Exception):  # the failed save is what is raised
                manager.close()
            raise
        manager.close()

    def _wait(self, manager: Any) -> None:
        """Waits for the save in flight; a failed one is removed and raised as a PipelineError when known."""
        try:
            manager.wait_until_finished()
        except Exception as err:
            self._raise_failed(err)
        self._in_flight = None

    def _close(self) -> None:
        try:
            self._drop_manager()
            if self._claimed:
                self._retain()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.close()  # releases the writer lock
            self._claimed = False

    def _save(self, pipeline: Any, state: Any, run: Any, best: dict[str, Any] | None = None) -> bool:
        """Saves ``state``; False when it was not written (non-finite values, or its step is saved already).

        ``best``: the step is marked best with this record, in its metadata
        (added to the step's metadata if it is saved already; then True).
        """
        import orbax.checkpoint as ocp

        step = int(state.step) if run is None else run.step  # fit counts steps without waiting for the device
        self._pipeline = pipeline
        data_state = self._data_state(pipeline, run)  # before anything is written
        if not self._finite(state, step):
            return False
        if not self._claimed:
            self._claim(pipeline, state)
        manager = self._open()
        self._wait(manager)  # the previous save is complete: now older steps may go
        self._retain()
        if step in manager.all_steps():
            return best is not None and self._mark(step, best)
        per_epoch = None if run is None else run.steps_per_epoch
        meta: dict[str, Any] = {
            "format": 2,
            "step": step,
            "next": _next_position(step, per_epoch),
            "batch_size": None if run is None else run.batch_size,
            "steps_per_epoch": per_epoch,
            "pipeline": repr(pipeline),
            **self._description,
            "layout": self._layout,
            **({} if best is None else {"best": best}),
        }
        meta["checksum"] = _directory.checksum(meta)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:  # the data iterator's position, for fit to set on resume
            items["data"] = ocp.args.JsonSave({"state": data_state})
        # Orbax copies the arrays to host memory before save() returns and writes them from there, so a
        # later step that donates these arrays cannot change what is written.
        self._in_flight = step
        try:
            manager.save(step, args=ocp.args.Composite(**items), force=True)  # this class decides when to save
        except Exception as err:
            self._raise_failed(err)
        self._saved_step = step
        return True

    def _mark(self, step: int, best: dict[str, Any]) -> bool:
        """Marks the saved step ``step`` best (the primary host rewrites its metadata); whether it is marked."""
        from orbax.checkpoint import multihost

        marked = _best.mark(self.directory, step, best) if multihost.is_primary_host(0) else True
        multihost.sync_global_processes(f"jaxpipe_checkpoint_best_{next(_barriers)}")
        return marked

    def _data_state(self, pipeline: Any, run: Any) -> Any:
        """``run.data_state`` as JSON (NumPy numbers as Python ones), or a PipelineError saying what is not."""
        try:
            return as_json(getattr(run, "data_state", None))
        except NotJSONError as err:
            self._failed = True
            raise self._error(
                pipeline,
                f"the data iterator's state (its get_state()) cannot be saved in a checkpoint: it holds a "
                f"{err}, and a checkpoint keeps the iterator's state as JSON.\nMake get_state() return plain "
                f"data (dicts, lists, str, int, float, bool, None; NumPy numbers and arrays are converted), "
                f"e.g. return {{'index': self.index, 'seed': self.seed}}.",
            ) from err

    def _raise_failed(self, err: Exception) -> NoReturn:
        """After a failed save: removes its unfinished folder, raises (a PipelineError for a full or read-only disk)."""
        self._failed = True
        step, self._in_flight = self._in_flight, None
        if step is not None and jax.process_index() == 0:  # the primary host made its folder
            _failures.clean_up(self.directory, step)
        message = _failures.message(self.directory, step, err)
        if message is None:
            raise err
        raise self._error(self._pipeline, message) from err

    def _unwritable(self, pipeline: Any, err: OSError) -> PipelineError:
        """The error for a directory where nothing can be written, found before anything was."""
        self._failed = True
        return self._error(pipeline, _failures.unwritable(self.directory, err))

    def _finite(self, state: Any, step: int) -> bool:
        """Whether every floating leaf of ``state`` is finite; warns (once per run) when not."""
        leaves = [x for x in jax.tree.leaves(state) if _inexact(x)]
        if not leaves or bool(_all_finite(leaves)):
            return True
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            paths = [
                jax.tree_util.keystr(path)
                for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
                if _inexact(x) and not bool(_all_finite([x]))
            ]
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            warnings.warn(
                f"the training state at step {step} holds NaN or inf (in {shown}), so it is not saved, "
                f"nor any later non-finite state: the checkpoints in {self.directory} keep the last finite one. "
                f"Lower the learning rate or clip gradients (optax.clip_by_global_norm), then resume.",
                CheckpointWarning,
                stacklevel=4,
            )
        return False

    # --- restoring ------------------------------------------------------------------

    def _restore(self, pipeline: Any, state: Any, newer_than: int | None, run: Any) -> Any:
        """The newest readable checkpoint (newer than ``newer_than``), or None. Changes nothing on disk."""
        import orbax.checkpoint as ocp

        target = jax.tree.map(abstract, state)
        for _ in range(_RETRIES):
            found = self._survey(pipeline, state)
            if found is None:
                return None
            for step in sorted(found.steps, reverse=True):
                path = os.path.join(self.directory, str(step))
                meta = found.steps[step]
                if meta is None:
                    self._note_damaged(step, found.reasons[step], run)
                    continue
                if newer_than is not None and step <= newer_than:
                    if step == newer_than and run is not None:  # fit was given this step's state: its data position
                        self._resume_data(step, run)
                    return None
                items = {"state": ocp.args.StandardRestore(target)}
                if run is not None and os.path.isdir(os.path.join(path, "data")):
                    items["data"] = ocp.args.JsonRestore()
                try:
                    restored = self._read_state(step, items, state)
                except Exception as err:
                    if not os.path.isdir(path):  # a writer's retention removed it while it was read: look again
                        break
                    self._note_damaged(step, _reason(err), run)
                    continue
                self._announce(step, meta, run)
                if "data" in items:
                    run.resumed_data_state = restored["data"]["state"]
                return restored["state"]
            else:
                return None
        raise self._error(
            pipeline,
            f"the checkpoints in {self.directory} were deleted {_RETRIES} times while being read: a run saving "
            f"there removes old steps faster than this process reads them.\nGive that run a larger `keep`, "
            f"e.g. .checkpoint(..., keep=5), or read a copy of the directory.",
        )

    def _restore_which(self, pipeline: Any, state: Any, which: str) -> Any:
        """``which="newest"``: :meth:`_restore`. ``"best"``: the step marked best, or None if none is saved."""
        if which == "newest":
            return self._restore(pipeline, state, newer_than=None, run=None)
        if which != "best":
            raise self._error(
                pipeline,
                f"`which` must be 'newest' (the newest checkpoint, the default) or 'best' (the step that "
                f".checkpoint(..., best=...) kept for its best evaluation), got {which!r}; e.g. which='best'.",
            )
        import orbax.checkpoint as ocp

        found = self._survey(pipeline, state)
        if found is None or not found.steps:
            return None
        chosen = _best.best_step(found, self.best, layout(state))
        if chosen is None:
            raise self._error(
                pipeline,
                f"no checkpoint in {self.directory} is marked best (steps {', '.join(map(str, sorted(found.steps)))}): "
                f"a `fit` with .checkpoint(..., best='eval_loss') and `eval_data` marks the step of each better "
                f"evaluation.\nRestore the newest instead: trainer.init(key, sample_batch) (which='newest').",
            )
        step, value = chosen
        target = jax.tree.map(abstract, state)
        restored = self._read(step, {"state": ocp.args.StandardRestore(target)})["state"]
        metric = found.steps[step]["best"]["metric"]  # type: ignore[index]
        if jax.process_index() == 0:
            print(f"jaxpipe: restoring step {step} of {self.directory}, the best by {metric} ({value:.6g})", flush=True)
        return restored

    def _read(self, step: int, items: dict[str, Any]) -> Any:
        return _reading.read(self.directory, step, items)

    def _read_state(self, step: int, items: dict[str, Any], state: Any) -> Any:
        return _reading.read_state(self.directory, step, items, state)

    def _resume_data(self, step: int, run: Any) -> None:
        import orbax.checkpoint as ocp

        if os.path.isdir(os.path.join(self.directory, str(step), "data")):
            run.resumed_data_state = self._read(step, {"data": ocp.args.JsonRestore()})["data"]["state"]

    def _error(self, pipeline: Any, message: str) -> PipelineError:
        return PipelineError(message, stage_name="checkpoint").within(pipeline)

    def _mismatch(self, pipeline: Any, meta: dict[str, Any], current: dict[str, str], step: int) -> str:
        return (
            f"the checkpoint {os.path.join(self.directory, str(step))} was written by a pipeline with another "
            f"training state, so it cannot be restored into this one. Leaves that differ:\n"
            + "\n".join(differences(meta["layout"], current))
            + f"\nSaved by:  {meta.get('pipeline', '(not recorded)')}\nThis one:  {pipeline!r}\n"
            f"Give this pipeline its own directory, or restore with the pipeline that wrote the checkpoint "
            f"(or start over there with fit(..., resume=False), which moves the old steps to a sub-folder)."
        )

    def _announce(self, step: int, meta: dict[str, Any], run: Any) -> None:
        position = meta.get("next") or {}
        where = f" (next: epoch {position['epoch']}, batch {position['batch']} of {position['of']})" if position else ""
        if jax.process_index() == 0:
            print(f"jaxpipe: resuming from step {step} of {self.directory}{where}", flush=True)
        if run is None or meta.get("batch_size") is None or run.batch_size is None:
            return
        if (meta["batch_size"], meta.get("steps_per_epoch")) != (run.batch_size, run.steps_per_epoch):
            warnings.warn(
                f"the checkpoint at step {step} was written by a run with batch_size={meta['batch_size']} "
                f"({meta.get('steps_per_epoch')} steps per epoch), but this run has batch_size={run.batch_size} "
                f"({run.steps_per_epoch} steps per epoch), so it will not see the batches the first run would have. "
                f"Use the first run's batch_size and data for an exact resume.",
                CheckpointWarning,
                stacklevel=2,
            )

    def _note_damaged(self, step: int, reason: str, run: Any) -> None:
        """Warns about a damaged step; a run that saves moves it to ``<step>.damaged`` (kept, not deleted)."""
        if step in self._damaged:
            return
        self._damaged[step] = reason
        later = (
            f"this run moves it to {step}.damaged before it saves"
            if run is not None
            else f"it is left in place (a run that saves here moves it to {step}.damaged)"
        )
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is incomplete or damaged ({reason}), so an older step "
            f"is used instead, if there is one. Nothing is deleted: {later}.",
            CheckpointWarning,
            stacklevel=6,
        )


def _inexact(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    """One device reduction: True when every value of every leaf is finite."""
    return functools.reduce(jnp.logical_and, (jnp.all(jnp.isfinite(x)) for x in leaves))


def _next_position(step: int, per_epoch: int | None) -> dict[str, int] | None:
    """Where the step after ``step`` starts, counted from 1 as people read it: epoch, batch, of batches."""
    if not per_epoch:
        return None
    epoch, batch = divmod(step, per_epoch)
    return {"epoch": epoch + 1, "batch": batch + 1, "of": per_epoch}


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
