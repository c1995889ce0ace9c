"""A save that fails: what is left on disk, and what to tell the user (a full or read-only disk)."""

from __future__ import annotations

import contextlib
import errno
import os

from jaxpipe_orbax import _directory


def clean_up(directory: str, step: int) -> None:
    """Removes the failed save's unfinished folder, or sets its step aside if Orbax had renamed it (primary host)."""
    with contextlib.suppress(OSError):
        for name in _listing(directory):
            if name.startswith(f"{step}{_directory.UNFINISHED}"):
                _directory.remove(os.path.join(directory, name))
        if os.path.isdir(os.path.join(directory, str(step))):  # failed after Orbax's rename
            _directory.set_aside(directory, step)


def message(directory: str, step: int | None, err: BaseException) -> str | None:
    """The user's message for a save that failed on a full or read-only disk; None for any other failure."""
    kept = sorted(int(name) for name in _listing(directory) if name.isdigit())
    intact = (
        f"the checkpoints before it (steps {', '.join(map(str, kept))}) are intact"
        if kept
        else "no earlier checkpoint was saved"
    )
    if _caused_by(err, errno.ENOSPC, "No space left on device"):
        return (
            f"the disk holding {directory} is full (No space left on device): the checkpoint of step "
            f"{step} could not be written and its unfinished folder was removed; {intact}.\n"
            f"Free some space (or give the checkpoints a directory on a larger disk, e.g. "
            f".checkpoint('/scratch/runs/digits'), or keep fewer, e.g. keep=2), then resume with fit."
        )
    if _caused_by(err, errno.EROFS, "Read-only file system"):
        return (
            f"{directory} became read-only while the checkpoint of step {step} was written; {intact}.\n"
            f"Remount it read-write, or give the checkpoints a writable directory, then resume with fit."
        )
    return None


def unwritable(directory: str, err: OSError) -> str:
    """The message for a directory where nothing can be written, found before anything was."""
    why = "is on a read-only file system" if err.errno == errno.EROFS else "cannot be written by this user"
    return (
        f"the checkpoint directory {directory} {why} ({err}), so this run could not save its "
        f"checkpoints; nothing was written there.\nRemount it read-write (or fix its permissions), or "
        f"give the checkpoints a writable directory, e.g. .checkpoint('/scratch/runs/digits'). Reading the "
        f"checkpoints there needs no writing: trainer.init(...) and trainer.restore(state) restore them."
    )


def _caused_by(err: BaseException | None, code: int, text: str) -> bool:
    """Whether ``err`` or an error it came from is the OS error ``code`` (TensorStore's say it in words)."""
    seen = 0
    while err is not None and seen < 20:
        if getattr(err, "errno", None) == code or text in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
