"""The checkpoint directory is jaxpipe's alone: what is in it, and who may change what.

Orbax treats every number-named folder of its directory as a step, and its
retention deletes old ones (following symbolic links on machines where it
deletes in parallel). So jaxpipe keeps the directory to itself: it writes a
marker file (:data:`MARKER`) when it creates the directory, and refuses an
existing non-empty directory without the marker, or one holding anything it
did not write (files, links, other folders, other tools' checkpoints).

Who changes what:

- A process that only reads (``init``, ``Pipeline.restore``, a ``fit`` that
  saves nothing) changes nothing, not even an unfinished save.
- A process that writes, right before its first save, moves the steps it found
  damaged to ``<step>.damaged`` and removes unfinished saves
  (``<step>.orbax-checkpoint-tmp``) only while it holds the directory's writer
  lock (an exclusive ``flock`` on the marker, held by each writer until it has
  finished writing). Holding it proves that no other jaxpipe process is writing
  there, so whoever left those saves has stopped. Without the lock it leaves
  them alone (Orbax replaces a step's unfinished save when it saves that step).
- Retention deletes only complete step folders of the run's own training state
  (same leaves, shapes and dtypes), never a link and never through one, and
  never a step holding anything Orbax and jaxpipe did not write (a user's notes
  put into it): that step is kept. It renames a step to ``<step>.deleting``
  first, so a reader sees it go at once, and looks inside after the rename.
- Retention with ``best=`` also keeps the step marked best in its metadata
  (``_best.py``); marking rewrites that metadata file atomically.
- A step folder missing one of its parts (``meta/``, ``state/``, Orbax's
  metadata) and holding nothing else is a damaged step, not someone else's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import IO, Any

MARKER = "jaxpipe-checkpoints.json"
UNFINISHED = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step still being written
DELETING = ".deleting"  # a step retention is removing: renamed first, so readers see it go at once
_SET_ASIDE = re.compile(r"\d+\.damaged(-\d+)?|earlier-run-\d+")  # jaxpipe's own, never deleted
_STEP_ITEMS = ("state", "meta")  # the Orbax items every jaxpipe step has
_REQUIRED = ("_CHECKPOINT_METADATA", "state", "meta")  # what a complete step folder holds
# What Orbax and jaxpipe write in a step folder, and at the top of its items: anything else is someone else's.
_WRITTEN = {
    "": re.compile(r"_CHECKPOINT_METADATA|commit_success\.txt|state|meta|data"),
    "meta": re.compile(r"metadata|metadata\.jaxpipe-tmp|commit_success\.txt"),  # the tmp: _best.mark's rewrite
    "data": re.compile(r"metadata|commit_success\.txt"),
    "state": re.compile(
        r"_METADATA|_CHECKPOINT_METADATA|_sharding|commit_success\.txt|manifest\.ocdbt|d|"
        r"array_metadatas|ocdbt\.process_\d+|descriptor"
    ),
}
_SHOWN = 12


@dataclasses.dataclass
class Survey:
    """What a checkpoint directory holds.

    Attributes:
      marked: the directory has jaxpipe's marker file.
      steps: complete jaxpipe steps: step -> its metadata, or None when the
        metadata is unreadable or fails its checksum (a damaged step).
      reasons: step -> why its metadata is damaged.
      unfinished: names of unfinished saves.
      leftovers: names of steps whose deletion was cut short.
      foreign: one line per entry jaxpipe did not write.

    A step folder missing ``meta/``, ``state/`` or Orbax's metadata, and
    holding nothing else, is a damaged step (in ``steps`` as None), not foreign.
    """

    marked: bool = False
    steps: dict[int, dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)
    unfinished: list[str] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    foreign: list[str] = dataclasses.field(default_factory=list)


def checksum(meta: dict[str, Any]) -> str:
    """A hash of a step's metadata (without the checksum itself), so damage that is still valid JSON shows."""
    body = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def survey(directory: str) -> Survey | None:
    """What ``directory`` holds, or None if it does not exist. Reads only."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return None
    found = Survey(marked=any(e.name == MARKER and e.is_file(follow_symlinks=False) for e in entries))
    if not found.marked and entries:  # not created by jaxpipe: everything in it is someone else's
        found.foreign = _unmarked(entries)
        return found
    for entry in entries:
        try:
            _sort(found, entry)
        except FileNotFoundError:  # renamed or removed meanwhile by a writer (a save completing, retention)
            continue
    return found


def _sort(found: Survey, entry: os.DirEntry[str]) -> None:
    """Puts one entry of the directory where it belongs in ``found``."""
    name = entry.name
    if entry.is_symlink():
        found.foreign.append(f"{name} -> {os.readlink(entry.path)} (a symbolic link)")
    elif not entry.is_dir(follow_symlinks=False):
        if name != MARKER:
            found.foreign.append(f"{name} (a file)")
    elif name.isdigit():
        why_not = _not_a_step(entry.path)
        missing = [item for item in _REQUIRED if not os.path.lexists(os.path.join(entry.path, item))]
        if why_not and missing and os.listdir(entry.path) and not foreign_in_step(entry.path):  # e.g. no meta/
            found.steps[int(name)] = None
            found.reasons[int(name)] = f"its folder has no {', '.join(missing)}"
        elif why_not:
            found.foreign.append(f"{name}/ ({why_not})")
        else:
            meta, reason = _read_meta(entry.path)
            found.steps[int(name)] = meta
            if meta is None:
                found.reasons[int(name)] = reason
    elif name.split(".")[0].isdigit() and UNFINISHED in name:
        found.unfinished.append(name)
    elif name.split(".")[0].isdigit() and name.endswith(DELETING):
        found.leftovers.append(name)
    elif not _SET_ASIDE.fullmatch(name):
        found.foreign.append(f"{name}/ (a folder jaxpipe did not write)")


def _unmarked(entries: list[os.DirEntry[str]]) -> list[str]:
    lines = []
    for entry in entries:
        if entry.is_symlink():
            lines.append(f"{entry.name} -> {os.readlink(entry.path)} (a symbolic link)")
        elif entry.is_dir(follow_symlinks=False):
            why_not = _not_a_step(entry.path) if entry.name.isdigit() else ""
            lines.append(f"{entry.name}/ ({why_not or 'a folder'})")
        else:
            lines.append(f"{entry.name} (a file)")
    return lines


def _not_a_step(path: str) -> str:
    """Why the folder ``path`` is not a step jaxpipe wrote, or '' if it is one."""
    if not os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
        if not os.path.isdir(path):
            raise FileNotFoundError(path)  # it went meanwhile
        return "a folder without Orbax checkpoint metadata"
    items = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
    if any(os.path.islink(os.path.join(path, item)) for item in items) or not set(_STEP_ITEMS) <= set(items):
        return f"an Orbax checkpoint that jaxpipe did not write, with items {items}"
    return ""


def foreign_in_step(path: str) -> list[str]:
    """What a step folder holds that neither Orbax nor jaxpipe wrote (links included), e.g. ``['NOTES.txt']``."""
    found = []
    for item, written in _WRITTEN.items():
        folder = os.path.join(path, item) if item else path
        if item and (os.path.islink(folder) or not os.path.isdir(folder)):
            continue  # absent (or a link, listed as foreign one level up)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            own = written.fullmatch(entry.name) and not entry.is_symlink()
            if not own or (not item and entry.name in _WRITTEN and not entry.is_dir(follow_symlinks=False)):
                found.append(os.path.join(item, entry.name) + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return found


def _read_meta(path: str) -> tuple[dict[str, Any] | None, str]:
    """A step's metadata, or (None, why) if it is unreadable or does not match its checksum."""
    try:
        with open(os.path.join(path, "meta", "metadata"), encoding="utf-8") as file:
            meta = json.load(file)
    except (OSError, ValueError) as err:
        if not os.path.isdir(path):
            raise FileNotFoundError(path) from err  # the whole step went meanwhile: not damage
        return None, f"its metadata is unreadable: {type(err).__name__}: {err}"
    if not isinstance(meta, dict) or meta.get("checksum") != checksum(meta):
        return None, "its metadata does not match its checksum"
    return meta, ""


def refusal(directory: str, found: Survey) -> str:
    """The message refusing ``directory``: what is there, and a directory to use instead."""
    lines = found.foreign if len(found.foreign) <= _SHOWN else [*found.foreign[:_SHOWN], "..."]
    if found.marked:  # jaxpipe's directory, with someone else's things put into it
        why, fix = "holds things that jaxpipe did not write", "Move them out of it, or give the checkpoints "
        instead = _free(f"{directory}-{i}" for i in itertools.count(2))
    else:  # someone else's directory: a sub-folder of it is jaxpipe's to keep
        why, fix = "was not created by jaxpipe and is not empty", "Give the checkpoints "
        names = itertools.chain(["checkpoints"], (f"checkpoints-{i}" for i in range(2, 99)))
        instead = _free(os.path.join(directory, name) for name in names)
    return (
        f"the checkpoint directory {directory} {why}:\n"
        + "\n".join(f"  {line}" for line in lines)
        + "\njaxpipe keeps its checkpoint directory to itself (its retention deletes old steps there), so it "
        f"uses only an empty directory or one it created.\n{fix}a folder of their own, e.g. .checkpoint({instead!r})."
    )


def _free(paths: Iterable[str]) -> str:
    """The first of ``paths`` that names nothing yet (the last one if all are taken)."""
    path = ""
    for path in paths:
        if not os.path.lexists(path):
            break
    return path


def unusable(path: str) -> str:
    """Why the absolute ``path`` can never be a checkpoint directory, or ''. Reads only (the stage's check)."""
    if "\0" in path:
        return "contains a NUL character ('\\x00'), which no file system allows in a path"
    existing = _nearest_existing(path)
    if existing != path and not os.path.isdir(existing):
        return f"is inside {existing}, which is a file, not a folder"
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            return (
                f"has a name of {len(os.fsencode(part))} bytes ({part[:24]}...), longer than the {name_max} bytes "
                f"this file system allows for one file or folder name"
            )
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    if len(os.fsencode(path)) >= path_max:
        return f"is {len(os.fsencode(path))} bytes long; this file system allows paths shorter than {path_max}"
    return ""


def not_writable(directory: str) -> OSError | None:
    """Why nothing can be written in ``directory`` (or in its nearest existing parent), or None. Writes nothing."""
    existing = _nearest_existing(directory)
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    return OSError(code, os.strerror(code), existing)


def probe(directory: str) -> None:
    """Writes and removes a nameless file in ``directory``; raises the OSError where nothing can be written."""
    with tempfile.TemporaryFile(dir=directory):  # O_TMPFILE on Linux: no name appears in the directory
        pass


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _pathconf(path: str, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError, AttributeError):  # not reported here (or Windows)
        return default


def create(directory: str) -> None:
    """Creates ``directory`` (if needed) with jaxpipe's marker; the caller has checked it is empty or marked."""
    os.makedirs(directory, exist_ok=True)
    note = {"written_by": "jaxpipe", "what": "Orbax checkpoints of one training run; see jaxpipe's README."}
    with contextlib.suppress(FileExistsError):  # another process of the same run was first
        fd = os.open(os.path.join(directory, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as file:
            json.dump(note, file)


def writer_lock(directory: str) -> IO[bytes] | None:
    """The directory's writer lock (an open marker file holding an exclusive flock), or None if taken.

    None too where flock does not exist or the file system refuses it: then
    nothing that needs the lock is done.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        file = open(os.path.join(directory, MARKER), "rb")  # noqa: SIM115 (held until the writer is done)
    except OSError:
        return None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        return None
    return file


def remove(path: str) -> None:
    """Deletes one folder jaxpipe wrote: never a symbolic link, never through one.

    ``shutil.rmtree`` removes links inside the folder without following them,
    and refuses a link given as the folder.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        return
    shutil.rmtree(path)


def remove_step(directory: str, step: int) -> list[str]:
    """Deletes step folder ``step`` unless it holds anything jaxpipe did not write; returns those things.

    Renamed first, so a reader sees the whole step go at once, and checked
    after the rename, so nothing put into it meanwhile is deleted.
    """
    path = os.path.join(directory, str(step))
    if os.path.islink(path) or not os.path.isdir(path):
        return []
    doomed = path + DELETING
    if os.path.isdir(doomed) and not os.path.islink(doomed) and not foreign_in_step(doomed):
        remove(doomed)  # left by a deletion cut short
    os.rename(path, doomed)  # fails while a leftover holding someone's files is there: the step stays
    foreign = foreign_in_step(doomed)
    if foreign:
        os.rename(doomed, path)  # someone's files: the step stays
    else:
        remove(doomed)
    return foreign


def set_aside(directory: str, step: int) -> str:
    """Renames step folder ``step`` to ``<step>.damaged`` (or ``-1``, ``-2``...); returns the new path."""
    path = os.path.join(directory, str(step))
    aside = _free(f"{path}.damaged{f'-{i}' if i else ''}" for i in itertools.count())
    os.rename(path, aside)
    return aside


def move_earlier_run(directory: str, steps: list[int]) -> str:
    """Moves the step folders ``steps`` into a new ``earlier-run-<n>`` folder; returns its path."""
    folder = _free(os.path.join(directory, f"earlier-run-{i}") for i in itertools.count(1))
    os.mkdir(folder)
    for step in steps:
        os.rename(os.path.join(directory, str(step)), os.path.join(folder, str(step)))
    return folder
