"""The ``.checkpoint()`` stage where things go wrong: the user's files in a step, NumPy iterator states,
read-only and full disks, incomplete steps, bad paths, and errors at the end of ``fit``.

Disks are real: a read-only or tiny tmpfs mounted in a private mount namespace (``unshare``) around a real
training process, skipped where this machine does not allow mounting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from environment import unavailable
from jaxpipe_orbax import Checkpointer, CheckpointWarning, _directory

from jaxpipe import FitRun, Pipeline, PipelineError, hookimpl

SCRIPT = Path(__file__).with_name("checkpoint_disk_train.py")


def loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def trainer(directory, **options):
    return Pipeline(loss).optimize(optax.adam(1e-2)).jit().checkpoint(directory, **options)


DATA = {
    "x": np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32),
    "y": np.random.default_rng(1).normal(size=(64,)).astype(np.float32),
}
SAMPLE = {k: v[:8] for k, v in DATA.items()}


def fresh(pipe):
    return pipe.init(jax.random.key(0), SAMPLE, params={"w": np.zeros(4, np.float32)}, resume=False)


def steps_on_disk(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.step) == int(b.step)


class At:
    """Runs ``action(run)`` once, right after step ``step``."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    @hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        if run.step == self.step:
            self.action(run)


def hooks_for(pipe):
    """What the stage registers for one run, and that run, driven as `fit` drives them."""
    run = FitRun(pipe, epochs=1, batch_size=8, steps_per_epoch=8, total_steps=8)
    return Checkpointer(**pipe.stages[-1].options), run


# --- 1. retention deletes nothing of the user's -----------------------------------------------------------------------


def test_retention_keeps_a_step_holding_the_users_files_and_warns_once(tmp_path):
    directory = tmp_path / "runs" / "x"
    pipe = trainer(directory, every=4, keep=2)

    def put_files(run):
        while not (directory / "8").exists():  # step 8's asynchronous save has been renamed into place
            time.sleep(0.01)
        (directory / "4" / "NOTES.txt").write_text("why step 4 matters")
        (directory / "8" / "my_analysis").mkdir()
        (directory / "8" / "my_analysis" / "plot.csv").write_text("a,b\n")

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        final = pipe.fit(fresh(pipe), DATA, epochs=3, batch_size=8, progress=False, hooks=[At(9, put_files)])
    assert int(final.step) == 24
    assert steps_on_disk(directory) == [4, 8, 20, 24]  # 12 and 16 went; 4 and 8 hold the user's files
    assert (directory / "4" / "NOTES.txt").read_text() == "why step 4 matters"
    assert (directory / "8" / "my_analysis" / "plot.csv").read_text() == "a,b\n"
    kept = [str(w.message) for w in said if issubclass(w.category, CheckpointWarning)]
    assert len(kept) == 2, kept  # once per step, not at every save
    assert "old checkpoint step 4 " in kept[0] and "(NOTES.txt)" in kept[0]
    assert "old checkpoint step 8 " in kept[1] and "(my_analysis/)" in kept[1]
    assert_same(pipe.init(jax.random.key(0), SAMPLE, params={"w": np.zeros(4, np.float32)}), final)
    (directory / "4" / "NOTES.txt").unlink()  # moved out: the next save removes the step
    with pytest.warns(CheckpointWarning, match=r"old checkpoint step 8 .* \(my_analysis/\)"):
        assert pipe.save(final.replace(step=jnp.asarray(25, jnp.int32)))
    assert steps_on_disk(directory) == [8, 24, 25]


# --- 2. an iterator's state with NumPy numbers ------------------------------------------------------------------------


class Batches:
    """A hand-written resumable iterator that, as many do, keeps NumPy numbers in its state."""

    def __init__(self, strict=True):
        self.batches = [{k: v[i : i + 8] for k, v in DATA.items()} for i in range(0, 64, 8)]
        self.index, self.given, self.strict = np.int64(0), [], strict

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self.batches):
            raise StopIteration
        self.index += 1
        return self.batches[int(self.index) - 1]

    def get_state(self):
        return {"index": self.index, "seen": np.arange(self.index), "scale": np.float32(0.5), "last": np.bool_(0)}

    def set_state(self, state):
        self.given.append(state)
        assert type(state["index"]) is int and all(type(i) is int for i in state["seen"]), state
        self.index = np.int64(state["index"])


def test_an_iterator_state_with_numpy_numbers_is_saved_and_given_back_as_python_numbers(tmp_path):
    pipe = trainer(tmp_path / "a", every=4, keep=None)
    stopped = pipe.fit(fresh(pipe), Batches(), epochs=1, progress=False, hooks=[At(5, lambda run: run.stop())])
    step = int(stopped.step)
    assert 5 <= step < 8 and steps_on_disk(tmp_path / "a") == [4, step]
    assert not [name for name in os.listdir(tmp_path / "a") if "tmp" in name]
    saved = json.loads((tmp_path / "a" / str(step) / "data" / "metadata").read_text())["state"]
    assert saved == {"index": step, "seen": list(range(step)), "scale": 0.5, "last": False}
    again = Batches()
    resumed = pipe.fit(fresh(pipe), again, epochs=1, progress=False)
    assert again.given == [saved]  # set_state got plain ints (it asserts so)
    whole = trainer(tmp_path / "b", every=4, keep=None)
    assert_same(resumed, whole.fit(fresh(whole), Batches(), epochs=1, progress=False))


def test_an_iterator_state_json_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    directory = tmp_path / "a"
    pipe = trainer(directory, every=4, keep=None)

    class WithAHandle(Batches):
        def get_state(self):
            return {"index": int(self.index), "file": object()}

    with pytest.raises(PipelineError) as info:
        pipe.fit(fresh(pipe), WithAHandle(), epochs=1, progress=False)
    message = str(info.value)
    assert info.value.stage_name == "checkpoint"
    assert "holds a builtins.object at state['file']" in message and "e.g. return {'index'" in message
    assert not directory.exists() or not [name for name in os.listdir(directory) if "orbax" in name or name.isdigit()]


# --- 3 and 5. a read-only and a full disk, in a real process that must exit -------------------------------------------


def _mount_namespace():
    """The `unshare` command that gives a process its own mounts, or skips where this machine does not allow it."""
    command = ["unshare", "--mount", "--map-root-user"]
    if shutil.which("unshare") is None:
        unavailable("needs `unshare` to mount a real read-only or small file system")
    probe = subprocess.run(
        [*command, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || mount -t tmpfs -o size=64k tmpfs /tmp"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        unavailable(f"mounting is not allowed here: {probe.stderr.strip()[:200]}")
    return command


def in_mounts(tmp_path, script, timeout=240):
    """Runs the shell ``script`` in a private mount namespace; its output. The process must exit by itself."""
    env = {**os.environ, "PY": sys.executable, "TRAIN": str(SCRIPT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [*_mount_namespace(), "sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=timeout,  # a hung interpreter (threads left waiting inside Orbax) fails here
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_read_only_directory_is_a_clear_error_when_the_run_starts_and_the_process_exits(tmp_path):
    earlier, mount = tmp_path / "earlier", tmp_path / "ro"
    mount.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), "fit", str(earlier), "1"], check=True, capture_output=True)
    assert steps_on_disk(earlier) == list(range(1, 9))
    out = in_mounts(
        tmp_path,
        f"mount --bind {earlier} {mount} && mount -o remount,bind,ro {mount}\n"
        f'"$PY" "$TRAIN" fit {mount} 2\n'  # an earlier run to go on with, on a read-only disk
        f'"$PY" "$TRAIN" fit {mount}/new 1\n'  # a new folder on it
        f'"$PY" "$TRAIN" save {mount}/new\n'  # a hand-written loop's save
        f'"$PY" "$TRAIN" restore {mount}\n',  # reading needs no writing
    )
    lines = out.splitlines()
    errors = [line for line in lines if line.startswith("PipelineError")]
    assert len(errors) == 3, out
    assert all(error.startswith("PipelineError: stage 3 (checkpoint) of ") for error in errors), out
    assert out.count("is on a read-only file system") == 3, out
    assert out.count("nothing was written there.\nRemount it read-write") == 3, out
    assert "resuming from step 8" in out and lines[-1] == "done step 8"
    assert steps_on_disk(earlier) == list(range(1, 9)) and not (earlier / "new").exists()


def test_a_full_disk_is_a_clear_error_and_the_earlier_checkpoints_stay_intact(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    out = in_mounts(
        tmp_path,
        f"mount -t tmpfs -o size=300k tmpfs {mount}\n"
        f'"$PY" "$TRAIN" fit {mount}/c 3 2>/dev/null\n'  # every=1: the disk fills within the first epoch
        f"ls {mount}/c\n"
        f'"$PY" "$TRAIN" restore {mount}/c\n',
    )
    error, listing = out.split("\n", 1)[0], out.split("\n")
    assert error.startswith("PipelineError: stage 3 (checkpoint)"), out
    assert "is full (No space left on device): the checkpoint of step " in out, out
    saved = sorted(int(name) for name in listing if name.isdigit())
    assert saved == list(range(1, len(saved) + 1)) and len(saved) >= 1, out
    assert f"the checkpoints before it (steps {', '.join(map(str, saved))}) are intact" in out
    assert "its unfinished folder was removed" in out and "orbax-checkpoint-tmp" not in out
    assert f"resuming from step {saved[-1]} of " in out and listing[-2] == f"done step {saved[-1]}", out


# --- 4. an incomplete step folder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["meta", "state", "_CHECKPOINT_METADATA"])
def test_a_step_missing_part_of_its_folder_falls_back_to_the_previous_step(tmp_path, missing):
    directory = tmp_path / "c"
    pipe = trainer(directory, every=4, keep=None)
    first = pipe.fit(fresh(pipe), DATA, epochs=1, batch_size=8, progress=False)
    part = directory / "8" / missing
    shutil.rmtree(part) if part.is_dir() else part.unlink()
    with pytest.warns(CheckpointWarning, match=rf"step 8 .* incomplete or damaged \(its folder has no {missing}\)"):
        restored = pipe.init(jax.random.key(0), SAMPLE, params={"w": np.zeros(4, np.float32)})
    assert int(restored.step) == 4
    with pytest.warns(CheckpointWarning, match=r"step 8 .* this run moves it to 8\.damaged"):
        final = pipe.fit(restored, DATA, epochs=1, batch_size=8, progress=False)
    assert_same(final, first)
    assert "8.damaged" in os.listdir(directory) and 8 in steps_on_disk(directory)


# --- 5. paths that can never hold checkpoints -------------------------------------------------------------------------


def test_impossible_paths_are_refused_when_the_stage_is_added(tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    long = tmp_path / ("a" * 300) / "ckpt"
    with pytest.raises(OSError, match="File name too long"):
        os.makedirs(long)  # what the operating system says, later, without the check
    for path, message in [
        (f"{tmp_path}/a\0b", r"contains a NUL character"),
        (tmp_path / "file.txt" / "ckpt", rf"is inside {tmp_path / 'file.txt'}, which is a file, not a folder"),
        (long, r"has a name of 300 bytes \(a{24}\.\.\.\), longer than the 255 bytes"),
    ]:
        with pytest.raises(PipelineError, match=message) as info:
            trainer(path)
        assert info.value.stage == 3 and info.value.stage_name == "checkpoint"
        assert "e.g. .checkpoint('runs/digits')" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


# --- 6. the end of fit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_in_step", "saved"),
    [(False, [4, 6]), (True, [4])],
    ids=["error-in-user-code", "error-in-the-step"],
)
def test_fit_end_waits_for_the_save_in_flight_and_saves_only_after_an_error_outside_the_step(
    tmp_path, error_in_step, saved
):
    directory = tmp_path / "c"
    pipe = trainer(directory, every=4, keep=None)
    state = fresh(pipe)
    hooks, run = hooks_for(pipe)
    hooks.jaxpipe_fit_start(run=run, state=state)
    run.step = 4
    hooks.jaxpipe_fit_step(run=run, state=state.replace(step=jnp.asarray(4, jnp.int32)), metrics={})  # async
    run.step, run.error = 6, RuntimeError("a progress display failed")
    if error_in_step is not None:
        run.error_in_step = error_in_step
    hooks.jaxpipe_fit_end(run=run, state=state.replace(step=jnp.asarray(6, jnp.int32)))
    assert sorted(os.listdir(directory)) == [*map(str, saved), "jaxpipe-checkpoints.json"]  # no unfinished save


def test_fit_end_waits_for_the_save_in_flight_even_when_its_own_save_fails(tmp_path):
    directory = tmp_path / "c"
    pipe = trainer(directory, every=4, keep=None)
    state = fresh(pipe)
    hooks, run = hooks_for(pipe)
    hooks.jaxpipe_fit_start(run=run, state=state)
    run.step, run.data_state = 4, {"index": 4}
    hooks.jaxpipe_fit_step(run=run, state=state.replace(step=jnp.asarray(4, jnp.int32)), metrics={})  # async
    run.step, run.data_state = 6, {"index": 6, "file": object()}
    with pytest.raises(PipelineError, match=r"holds a builtins\.object at state\['file'\]"):
        hooks.jaxpipe_fit_end(run=run, state=state.replace(step=jnp.asarray(6, jnp.int32)))
    assert sorted(os.listdir(directory)) == ["4", "jaxpipe-checkpoints.json"]  # step 4 complete, nothing else
    lock = _directory.writer_lock(str(directory))  # given back
    assert lock is not None
    lock.close()
    again, run = hooks_for(pipe)  # the writer lock was given back: another run can write
    assert again.jaxpipe_fit_resume(run=run, state=state) is not None
    again.jaxpipe_fit_start(run=run, state=state)
    run.step = 5
    again.jaxpipe_fit_end(run=run, state=state.replace(step=jnp.asarray(5, jnp.int32)))
    assert steps_on_disk(directory) == [4, 5]
