"""jaxpipe's Orbax plugin: the ``.checkpoint(directory, every=, keep=)`` stage.

Registered only through the ``jaxpipe`` entry-point group. Orbax is imported
when a run first saves or restores, so loading this plugin stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from jaxpipe import StageContext, StageKind, Training, hookimpl
from jaxpipe_orbax import _best, _directory
from jaxpipe_orbax._checkpointer import Checkpointer as Checkpointer
from jaxpipe_orbax._checkpointer import CheckpointWarning as CheckpointWarning

__all__ = ["CheckpointWarning", "Checkpointer", "checkpoint"]


def checkpoint(
    fn: Callable[..., Any],
    directory: str | os.PathLike[str],
    every: int = 100,
    keep: int | None = 3,
    best: str | None = None,
    mode: str = "min",
) -> Callable[..., Any]:
    """Saves the training state with Orbax every ``every`` steps, keeping the newest ``keep``.

    ``trainer.init`` and ``trainer.fit`` resume from the newest complete
    checkpoint in ``directory`` and say so; ``fit`` also saves when it ends or
    is stopped with Ctrl-C (not after a failed step). ``keep=None`` keeps all.
    Saves are asynchronous; nothing is written outside ``directory``, a
    relative ``directory`` is resolved when the stage is added, and the
    directory must be empty, new, or one jaxpipe created. A step loop written
    by hand saves and restores with ``trainer.save(state)`` and
    ``trainer.restore(state)``.

    ``best="eval_loss"`` (an eval metric as ``fit`` names it; ``mode="min"``
    or ``"max"``) also keeps the step whose evaluation was best: after each
    evaluation of ``fit(..., eval_data=...)`` that beats the best so far, that
    state is saved (if its step is not saved already) and marked best in the
    step's metadata, with its value. Retention keeps it beside the newest
    ``keep`` until a better one is marked, across restarts.
    ``trainer.init(key, batch, which="best")`` and
    ``trainer.restore(state, which="best")`` restore it.

    The step function itself is returned unchanged, so
    ``.jit().checkpoint(...)`` still builds to the ``jax.jit`` object.
    """
    del directory, every, keep, best, mode  # read by the run hooks, not by the function
    return fn


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    directory = options.get("directory")
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise TypeError(
            f"`directory` must be a path (str or os.PathLike), got {directory!r}; e.g. .checkpoint('runs/digits')."
        )
    if os.path.isfile(directory):
        raise ValueError(f"`directory` {os.fspath(directory)!r} is a file; give a directory for the checkpoints.")
    why_not = _directory.unusable(os.path.abspath(os.fspath(directory)))
    if why_not:
        raise ValueError(
            f"`directory` {os.fspath(directory)!r} {why_not}, so no checkpoint can be written there.\n"
            f"Give a folder path, e.g. .checkpoint('runs/digits')."
        )
    # Resolved once, here: a later os.chdir must not move a run's checkpoints. (The stage keeps the bound
    # options it was checked with; a declared "normalise options" step on StageKind would say this better.)
    options["directory"] = os.path.abspath(os.fspath(directory))
    every = options.get("every", 100)
    if not _positive_int(every):
        raise ValueError(f"`every` must be a positive int (steps between saves), got {every!r}; e.g. every=100.")
    keep = options.get("keep", 3)
    if keep is not None and not _positive_int(keep):
        raise ValueError(
            f"`keep` must be a positive int (how many checkpoints to keep) or None (keep all), got {keep!r}; "
            f"e.g. keep=3."
        )
    _best.check(options.get("best"), options.get("mode", "min"))
    if any(stage.kind.apply is checkpoint for stage in ctx.stages):  # this stage, as the registry holds it
        raise ValueError(
            "this pipeline already has a `.checkpoint()` stage, and one run saves to one directory.\n"
            "Keep a single `.checkpoint(...)`."
        )


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the step is unchanged whatever it is
    directory, every, keep = os.fspath(options["directory"]), options.get("every", 100), options.get("keep", 3)
    kept = "all its steps" if keep is None else f"its newest {keep} steps"
    if options.get("best") is not None:
        kept += f" and the step with {_best.Best(options['best'], options.get('mode', 'min'))!r}"
    code = (
        "# .checkpoint(): the step is unchanged; while fit runs, Orbax saves the state:\n"
        f"# manager = ocp.CheckpointManager({directory!r})\n"
        f"# every {every} steps: manager.save(step, args=ocp.args.StandardSave(state))\n"
        f"# and jaxpipe keeps {kept} (it deletes nothing else, and never through a link)"
    )
    return code, inner


CHECKPOINT = StageKind(
    "checkpoint",
    checkpoint,
    check=_check,
    explain=_explain,
    keeps_signature=True,
    keeps_program=True,
    training=Training(
        run_hooks=lambda options: Checkpointer(**options),
        period=lambda options: options.get("every", 100),  # fit ends its calls where a save falls due
        outside_fit="It saves and restores only inside `trainer.init` and `trainer.fit`: train with "
        "`trainer.fit(state, data)`, or in a loop written by hand call `trainer.save(state)` and "
        "`trainer.restore(state)` yourself.",
    ),
)


@hookimpl
def jaxpipe_register_stages() -> list[StageKind]:
    return [CHECKPOINT]
