"""Saving and restoring one training run with an Orbax ``CheckpointManager``.

A :class:`Checkpointer` lives for one ``init`` or ``fit`` call: jaxpipe
registers it through the ``.checkpoint()`` stage's ``run_hooks``. Orbax does
the work that must be right under crashes and on many hosts: it writes each
step into a temporary directory and renames it when complete (so a killed
process leaves only complete steps listed), saves asynchronously after copying
the arrays off the device, deletes old steps, and lets only the primary host
create directories. Checkpoints are tensorstore arrays plus JSON, never pickle.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np

from jaxpipe import PipelineError, hookimpl
from jaxpipe_orbax._layout import differences, layout

_barriers = itertools.count()  # Orbax's process barriers need names never used before in this process


class CheckpointWarning(UserWarning):
    """A checkpoint could not be used as is; training goes on from an older one."""


class Checkpointer:
    """The ``.checkpoint()`` stage's hooks for one ``init`` or ``fit`` call.

    Args:
      directory: where the step directories live; nothing is written elsewhere.
      every: save when ``fit`` crosses a multiple of ``every`` steps.
      keep: how many of the newest checkpoints to keep; None keeps all.
    """

    def __init__(self, directory: str | os.PathLike[str], every: int = 100, keep: int | None = 3) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        self.keep = keep
        self._manager: Any = None
        self._saved_step = 0  # the newest step saved or resumed in this run
        self._description: dict[str, str] = {}

    # --- hooks ------------------------------------------------------------------

    @hookimpl
    def jaxpipe_init_state(self, pipeline: Any, state: Any) -> Any:
        """``trainer.init``: the newest complete checkpoint, if there is one."""
        try:
            return self._restore(pipeline, state, newer_than=None, run=None)
        finally:
            self._close()

    @hookimpl
    def jaxpipe_fit_resume(self, run: Any, state: Any) -> Any:
        """``fit``: the newest complete checkpoint, if it is newer than ``state``."""
        try:
            return self._restore(run.pipeline, state, newer_than=int(state.step), run=run)
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
            self._save(run, state)

    @hookimpl
    def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
        """Saves the final or interrupted state (not after a failed step), then waits for the writes."""
        try:
            if run.error is None and run.step != self._saved_step:
                self._save(run, state)
        finally:
            self._close()

    # --- saving -------------------------------------------------------------------

    def _open(self) -> Any:
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(self.keep),
                enable_async_checkpointing=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def _close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()  # waits for the asynchronous writes to finish

    def _save(self, run: Any, state: Any) -> None:
        import orbax.checkpoint as ocp

        meta = {
            "format": 1,
            "step": run.step,  # the state's step, counted by fit without waiting for the device
            "position": run.position,
            "batch_size": run.batch_size,
            "steps_per_epoch": run.steps_per_epoch,
            **self._description,
            "layout": layout(state),
        }
        # Orbax copies the arrays to host memory before save() returns and writes them from there, so a
        # later step that donates these arrays cannot change what is written.
        self._open().save(
            run.step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,  # this class decides when to save (every, scan groups, the end)
        )
        self._saved_step = run.step

    # --- restoring ------------------------------------------------------------------

    def _restore(self, pipeline: Any, state: Any, newer_than: int | None, run: Any) -> Any:
        """The newest readable checkpoint (newer than ``newer_than``), or None."""
        if not os.path.isdir(self.directory):
            return None
        import orbax.checkpoint as ocp

        self._remove_unfinished()

        manager = self._open()
        for step in sorted(manager.all_steps(), reverse=True):
            if newer_than is not None and step <= newer_than:
                return None
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:
                self._set_aside(step, err)
                continue
            self._check_layout(pipeline, state, meta, step)
            target = jax.tree.map(_abstract, state)
            try:
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            except Exception as err:
                self._set_aside(step, err)
                continue
            self._announce(step, meta, run)
            return restored["state"]
        return None

    def _check_layout(self, pipeline: Any, state: Any, meta: dict[str, Any], step: int) -> None:
        saved, current = meta.get("layout"), layout(state)
        if saved is None or saved == current:
            return
        raise PipelineError(
            f"the checkpoint {os.path.join(self.directory, str(step))} was written by a pipeline with another "
            f"training state, so it cannot be restored into this one. Leaves that differ:\n"
            + "\n".join(differences(saved, current))
            + f"\nSaved by:  {meta.get('pipeline', '(not recorded)')}\nThis one:  {pipeline!r}\n"
            f"Give this pipeline its own directory, or restore with the pipeline that wrote the checkpoint.",
            stage_name="checkpoint",
        ).within(pipeline)

    def _announce(self, step: int, meta: dict[str, Any], run: Any) -> None:
        position = meta.get("position") or {}
        where = f" (epoch {position['epoch']}, batch {position['batch']})" if "epoch" in position else ""
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

    def _remove_unfinished(self) -> None:
        """Warns about and removes the temporary directories of saves a stopped process never finished.

        Orbax can do this itself (``cleanup_tmp_directories``), but in a background thread that may still
        run when a later save starts; here it is done before the run touches the directory.
        """
        import orbax.checkpoint as ocp
        from orbax.checkpoint import multihost

        unfinished = sorted(str(path.get()) for path in ocp.utils.tmp_checkpoints(self.directory))
        if unfinished:
            warnings.warn(
                f"{self.directory} holds {len(unfinished)} unfinished save(s) "
                f"({', '.join(os.path.basename(p) for p in unfinished)}): a process stopped while writing them. "
                f"They are not checkpoints and were removed; training resumes from the newest complete step.",
                CheckpointWarning,
                stacklevel=5,
            )
        if unfinished and multihost.is_primary_host(0):
            for path in unfinished:
                shutil.rmtree(path, ignore_errors=True)
        # every process passes this barrier, also one that listed the folder after the primary cleaned it
        multihost.sync_global_processes(f"jaxpipe_checkpoint_unfinished_{next(_barriers)}")

    def _set_aside(self, step: int, err: Exception) -> None:
        """Renames an unreadable step to ``<step>.damaged`` (kept, not deleted) so later saves can use its number."""
        from orbax.checkpoint import multihost

        path = os.path.join(self.directory, str(step))
        aside = next(
            name for i in itertools.count() if not os.path.exists(name := f"{path}.damaged{f'-{i}' if i else ''}")
        )
        if multihost.is_primary_host(0):
            os.rename(path, aside)
        multihost.sync_global_processes(f"jaxpipe_checkpoint_set_aside_{step}_{next(_barriers)}")
        self._manager.reload()
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is incomplete or damaged ({type(err).__name__}: {reason}). "
            f"It was moved to {aside} for inspection, and the previous complete step is restored instead.",
            CheckpointWarning,
            stacklevel=5,
        )


def _abstract(leaf: Any) -> Any:
    """The restore target of one leaf: shape, dtype (typed PRNG keys included) and placement."""
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
