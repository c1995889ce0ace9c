"""The Orbax ``.checkpoint()`` stage: saving, resuming, damaged checkpoints, bad input.

The reference for every resumed run is a hand-written loop: the pipeline's own compiled step called on the
batches ``fit`` documents (epoch ``e`` permuted by ``fold_in(data_key, e)``). Most tests share one checkpointing
pipeline whose directory is emptied before each test, so the step compiles once for the module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxpipe_orbax import Checkpointer, CheckpointWarning

from jaxpipe import FitRun, Pipeline, PipelineError, hookimpl

# --- a small real training setup: a Flax model with dropout and BatchNorm, an Optax chain with a schedule -------------


class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)  # reads the state's key stream
        x = nn.BatchNorm(use_running_average=not train)(x)  # carries model_state
        return nn.Dense(3)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


# the schedule's count is part of the optimizer state that must survive a restart
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, 40)))
SIZE, BATCH = 64, 8  # 8 steps per epoch


def trainer(directory=None, width=16, **options):
    pipe = Pipeline(loss).model(MLP(width), input="x").optimize(TX).jit()
    return pipe if directory is None else pipe.checkpoint(directory, **options)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SIZE, 4)).astype(np.float32)
    return {"x": x, "label": ((x @ np.array([1.0, -1.0, 0.5, 2.0]) > 0) + (x[:, 0] > 1)).astype(np.int32)}


def sample(data):
    return {k: v[:BATCH] for k, v in data.items()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One checkpointing pipeline (every=4, keep=2) for the module, so its step compiles once."""
    directory = tmp_path_factory.mktemp("shared") / "ckpt"
    return trainer(directory, every=4, keep=2), directory


@pytest.fixture
def pipe(shared):
    """The shared pipeline with an empty parent folder, as a fresh run would find it."""
    pipe, directory = shared
    for entry in directory.parent.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return pipe


def directory_of(pipe):
    return Path(pipe.stages[-1].options["directory"])


def batches(state, data, epochs):
    """The batches `fit` trains on, written out by hand."""
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), SIZE))
        for start in range(0, SIZE, BATCH):
            yield {k: v[order[start : start + BATCH]] for k, v in data.items()}


def by_hand(step, state, data, steps):
    """``steps`` training steps from ``state`` with the compiled step and `fit`'s batches."""
    for _, batch in zip(range(steps), batches(state, data, epochs=steps // 8 + 1), strict=False):
        state, _ = step(state, batch)
    return state


def bits(tree):
    """Every leaf as raw numpy bits (typed keys through their key data)."""

    def raw(x):
        return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    return jax.tree.map(raw, tree)


def assert_same_bits(a, b):
    assert type(a) is type(b) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(bits(a)), jax.tree.leaves(bits(b)), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def steps_on_disk(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def all_files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


# --- the stage itself -------------------------------------------------------------------------------------------------


def test_stage_leaves_the_step_unchanged(pipe, data):
    plain = trainer()
    built = pipe.build()
    assert type(built) is type(jax.jit(abs))  # still the jax.jit object
    state = pipe.init(jax.random.key(0), sample(data))
    assert built.lower(state, sample(data)).as_text() == plain.build().lower(state, sample(data)).as_text()
    explained = pipe.explain()
    assert explained.endswith("\n\n" + plain.explain().split("\n\n")[-1])  # the same JAX expression
    assert "keeps its newest 2 steps" in explained and "every 4 steps" in explained
    assert not os.path.exists(directory_of(pipe))  # adding the stage or init with nothing to restore writes nothing


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, r"`every` must be a positive int .* got 0"),
        ({"every": 2.5}, r"`every` must be a positive int .* got 2.5"),
        ({"every": True}, r"`every` must be a positive int .* got True"),
        ({"keep": 0}, r"`keep` must be a positive int .* or None .* got 0"),
        ({"keep": "3"}, r"`keep` must be a positive int .* got '3'"),
        ({"directory": 3}, r"`directory` must be a path .* got 3"),
        ({"directory": ""}, r"`directory` must be a path .* got ''"),
    ],
)
def test_bad_options_fail_when_the_stage_is_added(tmp_path, options, message):
    options = {"directory": tmp_path / "ckpt", **options}
    with pytest.raises(PipelineError, match=message) as info:
        trainer().checkpoint(**options)
    assert info.value.stage == 4 and info.value.stage_name == "checkpoint"
    assert os.listdir(tmp_path) == []


def test_directory_that_is_a_file_or_a_second_checkpoint_stage_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is a file; give a directory"):
        trainer(tmp_path / "notes.txt")
    with pytest.raises(PipelineError, match=r"already has a `.checkpoint\(\)` stage"):
        trainer(tmp_path / "a").checkpoint(tmp_path / "b")


# --- saving -----------------------------------------------------------------------------------------------------------


def test_saves_every_n_steps_keeps_the_newest_and_records_the_run(pipe, data):
    directory = directory_of(pipe)
    fresh = pipe.init(jax.random.key(0), sample(data))
    state = pipe.fit(fresh, data, epochs=2, batch_size=BATCH, progress=False)
    assert_same_bits(state, by_hand(pipe.build(), fresh, data, 16))
    assert steps_on_disk(directory) == [12, 16]  # saved at 4, 8, 12, 16; keep=2
    assert not [name for name in os.listdir(directory) if "tmp" in name]  # fit waited for the async writes
    meta = json.loads((directory / "16" / "meta" / "metadata").read_text())
    assert meta["step"] == 16 and meta["next"] == {"epoch": 3, "batch": 1, "of": 8}  # counted from 1
    assert meta["pipeline"] == repr(pipe) and meta["explain"] == pipe.explain()
    assert meta["layout"][".params['Dense_0']['kernel']"] == "float32[4,16]"
    assert meta["layout"][".model_state['batch_stats']['BatchNorm_0']['mean']"] == "float32[16]"
    assert meta["layout"][".key"] == "key<fry>[]"
    restored = pipe.init(jax.random.key(1), sample(data))  # another key: the checkpoint wins
    assert_same_bits(restored, state)


def test_scan_saves_when_a_multiple_of_every_is_crossed(tmp_path, data):
    directory = tmp_path / "ckpt"
    scanned = Pipeline(loss).model(MLP(), input="x").optimize(TX).scan(4).jit()
    scanned = scanned.checkpoint(directory, every=6, keep=None)
    state = scanned.fit(scanned.init(jax.random.key(0), sample(data)), data, epochs=3, batch_size=BATCH, progress=False)
    ends = list(range(4, 25, 4))  # each call takes 4 steps
    crossing = [b for a, b in zip([0, *ends], ends, strict=False) if b // 6 > a // 6]
    assert steps_on_disk(directory) == crossing == [8, 12, 20, 24]  # 6 and 18 fall inside calls; 24 is also the end
    assert int(state.step) == 24


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(pipe, data, capsys):
    fresh = pipe.init(jax.random.key(0), sample(data))
    first = pipe.fit(fresh, data, epochs=1, batch_size=BATCH, progress=False)
    assert int(first.step) == 8
    capsys.readouterr()
    resumed = pipe.init(jax.random.key(0), sample(data))  # the restart of a crashed script
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"jaxpipe: resuming from step 8 of {directory_of(pipe)} (next: epoch 2, batch 1 of 8)"]
    final = pipe.fit(resumed, data, epochs=3, batch_size=BATCH, progress=False)
    assert "resuming" not in capsys.readouterr().out  # once is enough: fit had the newest state already
    assert_same_bits(final, by_hand(pipe.build(), fresh, data, 24))


def test_legacy_uint32_keys_are_saved_and_restored_as_they_are(pipe, data):
    """Driven through the hooks `fit` calls, so no second training program needs compiling."""
    legacy = pipe.init(jax.random.PRNGKey(0), sample(data))
    assert legacy.key.dtype == jnp.uint32 and legacy.data_key.dtype == jnp.uint32
    run = FitRun(pipe, epochs=1, batch_size=BATCH, steps_per_epoch=8, total_steps=8)
    hooks = Checkpointer(**pipe.stages[-1].options)  # what the stage registers for a run
    hooks.jaxpipe_fit_start(run=run, state=legacy)
    run.step = 3  # as if three steps had run
    hooks.jaxpipe_fit_end(run=run, state=legacy)
    assert steps_on_disk(directory_of(pipe)) == [3]
    restored = pipe.init(jax.random.PRNGKey(1), sample(data))
    assert restored.key.dtype == jnp.uint32 and restored.data_key.dtype == jnp.uint32
    assert_same_bits(restored, legacy)


def test_extra_fields_are_saved_and_restored(pipe, data):
    state = pipe.init(jax.random.key(0), sample(data))
    state = state.replace(extra={"ema_params": state.params, "seen": jnp.int32(7)})
    run = FitRun(pipe, epochs=1, batch_size=BATCH, steps_per_epoch=8, total_steps=8)
    hooks = Checkpointer(**pipe.stages[-1].options)
    hooks.jaxpipe_fit_start(run=run, state=state)
    run.step = 3
    hooks.jaxpipe_fit_end(run=run, state=state)
    fresh = pipe.init(jax.random.key(1), sample(data), resume=False)
    assert_same_bits(pipe.restore(fresh.replace(extra={"ema_params": fresh.params, "seen": jnp.int32(0)})), state)


def test_a_checkpoint_saved_before_train_state_had_extra_restores(pipe, data, monkeypatch):
    """Checkpoints written before ``TrainState.extra`` hold the six older fields only (saved as a dict by path)."""
    import orbax.checkpoint as ocp

    standard_save = ocp.args.StandardSave

    def older_save(item, *args, **kwargs):
        older = {
            name: getattr(item, name) for name in ("step", "params", "opt_state", "key", "model_state", "data_key")
        }
        return standard_save(older, *args, **kwargs)

    state = pipe.init(jax.random.key(0), sample(data))
    run = FitRun(pipe, epochs=1, batch_size=BATCH, steps_per_epoch=8, total_steps=8)
    hooks = Checkpointer(**pipe.stages[-1].options)
    with monkeypatch.context() as patch:
        patch.setattr(ocp.args, "StandardSave", older_save)
        hooks.jaxpipe_fit_start(run=run, state=state)
        run.step = 3
        hooks.jaxpipe_fit_end(run=run, state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not reported as damaged
        restored = pipe.init(jax.random.key(1), sample(data))
    assert restored.extra == {}
    assert_same_bits(restored, state)


def test_fit_resumes_a_newer_checkpoint_than_the_state_it_was_given(pipe, data, capsys):
    fresh = pipe.init(jax.random.key(0), sample(data))
    pipe.fit(fresh, data, epochs=1, batch_size=BATCH, progress=False)
    capsys.readouterr()
    final = pipe.fit(fresh, data, epochs=2, batch_size=BATCH, progress=False)  # given step 0, disk has 8
    assert capsys.readouterr().out.startswith("jaxpipe: resuming from step 8 of ")
    assert_same_bits(final, by_hand(pipe.build(), fresh, data, 16))


def test_resuming_with_another_batch_size_warns(pipe, data):
    fresh = pipe.init(jax.random.key(0), sample(data))
    pipe.fit(fresh, data, epochs=1, batch_size=BATCH, progress=False)
    with pytest.warns(CheckpointWarning, match=r"batch_size=8 \(8 steps per epoch\), but this run has batch_size=16"):
        pipe.fit(fresh, data, epochs=2, batch_size=16, progress=False)  # 8 steps in all: already done


def test_donated_state_is_saved_intact(shared, tmp_path, data):
    """Orbax holds a host copy before `save` returns, so donating the state to the next step cannot touch it."""
    import orbax.checkpoint as ocp

    directory, plain = tmp_path / "ckpt", shared[0].build()  # the same step without donation
    donating = Pipeline(loss).model(MLP(), input="x").optimize(TX).jit(donate_argnums=0)
    donating = donating.checkpoint(directory, every=1, keep=None)
    fresh = donating.init(jax.random.key(0), sample(data))
    expected = [fresh]
    for batch in batches(fresh, data, epochs=1):
        expected.append(plain(expected[-1], batch)[0])
    final = donating.fit(jax.tree.map(jnp.copy, fresh), data, epochs=1, batch_size=BATCH, progress=False)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    with ocp.CheckpointManager(directory) as manager:
        assert manager.all_steps() == list(range(1, 9))
        for step in range(1, 9):
            saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
            assert_same_bits(saved, expected[step])
    assert_same_bits(final, expected[-1])


# --- stopping and failing ---------------------------------------------------------------------------------------------


class InterruptAt:
    """Sends the process SIGINT (as Ctrl-C does) right after a given step."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_ends_after_the_current_step_and_saves_it(pipe, data):
    fresh = pipe.init(jax.random.key(0), sample(data))
    with pytest.raises(KeyboardInterrupt) as caught:  # once the end hooks saved, as Python code does
        pipe.fit(fresh, data, epochs=3, batch_size=BATCH, progress=False, hooks=[InterruptAt(7)])
    state = caught.value.state
    assert int(state.step) == 7
    assert steps_on_disk(directory_of(pipe)) == [4, 7]
    assert_same_bits(state, by_hand(pipe.build(), fresh, data, 7))
    assert_same_bits(pipe.init(jax.random.key(0), sample(data)), state)


def test_a_failed_step_saves_nothing_after_the_last_good_checkpoint(pipe, data):
    fresh = pipe.init(jax.random.key(0), sample(data))
    good = list(batches(fresh, data, epochs=1))
    bad = {"image": good[6]["x"], "label": good[6]["label"]}  # the model reads batch["x"]
    with pytest.raises(PipelineError, match="the batch has no key 'x'"):
        pipe.fit(fresh, [*good[:6], bad, good[7]], epochs=1, progress=False)
    assert steps_on_disk(directory_of(pipe)) == [4]  # not the state after step 6
    assert_same_bits(pipe.init(jax.random.key(0), sample(data)), by_hand(pipe.build(), fresh, data, 4))


# --- resuming from what is on disk ------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(pipe, data):
    """The shared pipeline's directory with checkpoints at steps 4 and 8, and a file of the user's beside it."""
    directory = directory_of(pipe)
    fresh = pipe.init(jax.random.key(0), sample(data))
    pipe.fit(fresh, data, epochs=1, batch_size=BATCH, progress=False)
    assert steps_on_disk(directory) == [4, 8]
    (directory.parent / "notes.txt").write_text("the user's own file")
    return pipe, directory, fresh


def _truncate_array_data(step):
    (data_file,) = (step / "state" / "d").iterdir()
    data_file.write_bytes(data_file.read_bytes()[:10])


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_array_data,
        lambda step: (step / "state" / "manifest.ocdbt").unlink(),
        lambda step: (step / "meta" / "metadata").write_text('{"format": 1, "st'),
    ],
    ids=["truncated-array-data", "deleted-manifest", "half-written-metadata"],
)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reader threads, on failure
def test_damaged_newest_step_warns_and_restores_the_previous_one(two_checkpoints, data, damage):
    pipe, directory, fresh = two_checkpoints
    damage(directory / "8")
    files_before = all_files(directory)
    with pytest.warns(CheckpointWarning, match=r"step 8 .* is incomplete or damaged .* left in place"):
        restored = pipe.init(jax.random.key(0), sample(data))
    assert_same_bits(restored, by_hand(pipe.build(), fresh, data, 4))
    assert all_files(directory) == files_before  # init only reads
    # training goes on, sets the damaged step aside (kept, not deleted) and saves step 8 again
    with pytest.warns(CheckpointWarning, match=r"step 8 .* this run moves it to 8\.damaged"):
        final = pipe.fit(restored, data, epochs=1, batch_size=BATCH, progress=False)
    moved = {f"8.damaged{f[1:]}" if f.startswith("8/") else f for f in files_before}
    assert moved <= all_files(directory)
    assert (directory.parent / "notes.txt").read_text() == "the user's own file"
    assert steps_on_disk(directory) == [4, 8]
    assert_same_bits(final, by_hand(pipe.build(), fresh, data, 8))


def test_unfinished_save_left_by_a_killed_process_is_removed_only_by_the_next_writer(two_checkpoints, data):
    pipe, directory, fresh = two_checkpoints
    os.rename(directory / "8", directory / "8.orbax-checkpoint-tmp")  # killed before Orbax's final rename
    listing = sorted(os.listdir(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader says nothing about it: it may be a live writer's save
        restored = pipe.init(jax.random.key(0), sample(data))
    assert_same_bits(restored, by_hand(pipe.build(), fresh, data, 4))
    assert sorted(os.listdir(directory)) == listing  # readers never delete
    half = {k: v[: SIZE // 2] for k, v in data.items()}  # 4 steps per epoch: step 4 ends the run
    with warnings.catch_warnings(record=True):  # "another batch_size": not what this checks
        done = pipe.fit(fresh, half, epochs=1, batch_size=BATCH, progress=False)  # restores, trains nothing
    assert int(done.step) == 4 and sorted(os.listdir(directory)) == listing  # a fit that saves nothing is a reader
    with pytest.warns(CheckpointWarning, match=r"1 unfinished save\(s\) \(8\.orbax-checkpoint-tmp\).* removed"):
        final = pipe.fit(restored, data, epochs=1, batch_size=BATCH, progress=False)  # holds the writer lock
    assert sorted(os.listdir(directory)) == ["4", "8", "jaxpipe-checkpoints.json"]
    assert_same_bits(final, by_hand(pipe.build(), fresh, data, 8))


def test_restoring_into_another_structure_says_what_differs(two_checkpoints, data):
    pipe, directory, _ = two_checkpoints
    wider = trainer(directory, width=32)
    with pytest.raises(PipelineError) as info:
        wider.init(jax.random.key(0), sample(data))
    message = str(info.value)
    assert info.value.stage == 4 and info.value.stage_name == "checkpoint"
    assert f"the checkpoint {directory / '8'} was written by a pipeline with another training state" in message
    assert ".params['Dense_0']['kernel']: float32[4,16] in the checkpoint, float32[4,32] in this pipeline" in message
    assert ".params['Dense_1']['bias']" not in message  # the same in both
    assert "\n  ... and " in message  # the Adam moments and BatchNorm statistics differ too
    assert f"Saved by:  {pipe!r}\nThis one:  {wider!r}" in message
    with pytest.raises(PipelineError, match=r"\.key: key<fry>\[\] in the checkpoint, uint32\[2\] in this pipeline"):
        pipe.init(jax.random.PRNGKey(0), sample(data))
    assert steps_on_disk(directory) == [4, 8]  # nothing set aside: the checkpoints are fine


def test_a_copied_directory_resumes(two_checkpoints, tmp_path, data):
    """Nothing in a checkpoint depends on where it was written (e.g. a run copied to another machine)."""
    pipe, directory, _ = two_checkpoints
    expected = pipe.init(jax.random.key(0), sample(data))
    shutil.copytree(directory, tmp_path / "copy")
    assert_same_bits(trainer(tmp_path / "copy").init(jax.random.key(0), sample(data)), expected)


# --- what is written, and how -----------------------------------------------------------------------------------------


def test_nothing_is_pickled_or_written_outside_the_directory(pipe, data, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint went through pickle")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.chdir(tmp_path)
    directory = directory_of(pipe)
    state = pipe.fit(pipe.init(jax.random.key(0), sample(data)), data, epochs=1, batch_size=BATCH, progress=False)
    assert_same_bits(pipe.init(jax.random.key(0), sample(data)), state)
    assert os.listdir(tmp_path) == [] and os.listdir(directory.parent) == ["ckpt"]
    for path in all_files(directory):
        head = (directory / path).read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), path


def test_loading_the_plugin_does_not_import_orbax(tmp_path):
    code = (
        "import sys\n"
        "from jaxpipe import Pipeline\n"
        f"pipe = Pipeline(abs).jit().checkpoint({str(tmp_path / 'c')!r}, every=10)\n"
        "print('orbax.checkpoint' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


# --- the directory is jaxpipe's alone: nothing else in it is touched -------------------------------------------------


def snapshot(root):
    """Everything under ``root``, links not followed: a file's bytes (hashed), a link's target, or a folder."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                found[os.path.relpath(path, root)] = "folder"
            else:
                found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


@pytest.fixture
def parallel_deleter(monkeypatch):
    """Orbax deletes with its parallel deleter, as it does on machines with 4 or more CPUs."""
    from orbax.checkpoint._src.path import deleter

    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # what Orbax's PathDeleter reads to choose it
    assert deleter.PathDeleter(deleter.epath.Path("/tmp"))._parallel_deleter is not None


def users_folders(directory, outside):
    (directory / "12").mkdir(parents=True)
    (directory / "12" / "mine.txt").write_text("mine")
    (directory / "2" / "sub").mkdir(parents=True)
    (directory / "2" / "sub" / "results.csv").write_text("a,b\n1,2\n")
    return ["12/ (a folder without Orbax checkpoint metadata)", "2/ (a folder without Orbax checkpoint metadata)"]


def a_file(directory, outside):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("notes")
    return ["notes.txt (a file)"]


def another_tools_checkpoints(directory, outside):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        for step in (100, 200):  # Orbax saves only steps after its latest
            manager.save(step, args=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}))
    return ["100/ (an Orbax checkpoint that jaxpipe did not write, with items ['default'])"]


def a_link_named_like_a_step(directory, outside):
    (outside / "best").mkdir(parents=True)
    (outside / "best" / "weights.bin").write_bytes(b"\x00" * 64)
    directory.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "best", directory / "2")
    return [f"2 -> {outside / 'best'} (a symbolic link)"]


@pytest.mark.parametrize("jaxpipes_already", [False, True], ids=["new-directory", "jaxpipe-directory"])
@pytest.mark.parametrize("put", [users_folders, a_file, another_tools_checkpoints, a_link_named_like_a_step])
def test_a_directory_holding_anything_else_is_refused_and_nothing_changes(
    pipe, data, parallel_deleter, jaxpipes_already, put
):
    directory = directory_of(pipe)
    outside = directory.parent / "elsewhere"
    fresh = pipe.init(jax.random.key(0), sample(data))
    if jaxpipes_already:
        pipe.fit(fresh, data, epochs=1, batch_size=BATCH, progress=False)  # steps 4 and 8, and the marker
    listed = put(directory, outside)
    before = snapshot(directory.parent)
    for attempt in (
        lambda: pipe.fit(fresh, data, epochs=3, batch_size=BATCH, progress=False),
        lambda: pipe.init(jax.random.key(0), sample(data)),
        lambda: pipe.save(fresh),
    ):
        with pytest.raises(PipelineError) as info:
            attempt()
        message = str(info.value)
        assert info.value.stage == 4 and info.value.stage_name == "checkpoint"
        why = "holds things that jaxpipe did not write" if jaxpipes_already else "was not created by jaxpipe"
        assert f"the checkpoint directory {directory} {why}" in message
        for line in listed:
            assert f"\n  {line}" in message
        instead = f"{directory}-2" if jaxpipes_already else str(directory / "checkpoints")
        assert f"a folder of their own, e.g. .checkpoint({instead!r})" in message
        assert snapshot(directory.parent) == before  # nothing changed, inside or outside


def test_another_models_checkpoints_are_never_rotated_away(two_checkpoints, data):
    """A pipeline of another training state may not use (or clean) a directory holding another model's steps."""
    pipe, directory, _ = two_checkpoints
    wider = trainer(directory, width=32, every=4, keep=1)
    before = snapshot(directory.parent)
    fresh = trainer(width=32).init(jax.random.key(0), sample(data))
    ahead = fresh.replace(step=jnp.asarray(20, jnp.int32))  # past the other model's steps, so nothing is restored
    for attempt in (
        lambda: wider.fit(ahead, data, epochs=4, batch_size=BATCH, progress=False),
        lambda: wider.save(ahead),
    ):
        with pytest.raises(PipelineError, match=r"was written by a pipeline with another training state") as info:
            attempt()
        assert "Saved by:  " + repr(pipe) in str(info.value)
    assert snapshot(directory.parent) == before


def test_retention_never_follows_or_removes_what_appears_during_a_run(pipe, data, parallel_deleter):
    """A link named like an old step, and a user's folder, put into the directory while training runs."""
    directory = directory_of(pipe)
    outside = directory.parent / "elsewhere"
    (outside / "best").mkdir(parents=True)
    (outside / "best" / "weights.bin").write_bytes(b"\x01" * 64)

    class MeddleAt:
        @hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            if run.step == 5:
                os.symlink(outside / "best", directory / "1")
                (directory / "2").mkdir()
                (directory / "2" / "mine.txt").write_text("mine")

    outside_before = snapshot(outside)
    fresh = pipe.init(jax.random.key(0), sample(data))
    final = pipe.fit(fresh, data, epochs=3, batch_size=BATCH, progress=False, hooks=[MeddleAt()])
    assert_same_bits(final, by_hand(pipe.build(), fresh, data, 24))
    assert snapshot(outside) == outside_before
    assert (
        os.readlink(directory / "1") == str(outside / "best") and (directory / "2" / "mine.txt").read_text() == "mine"
    )
    assert sorted(os.listdir(directory)) == ["1", "2", "20", "24", "jaxpipe-checkpoints.json"]  # keep=2 of its own


def test_the_marker_is_written_when_jaxpipe_creates_the_directory(pipe, data):
    directory = directory_of(pipe)
    fresh = pipe.init(jax.random.key(0), sample(data))
    assert not directory.exists()  # reading a directory that is not there creates nothing
    assert pipe.save(fresh)  # step 0
    assert sorted(os.listdir(directory)) == ["0", "jaxpipe-checkpoints.json"]
    assert json.loads((directory / "jaxpipe-checkpoints.json").read_text())["written_by"] == "jaxpipe"
    shutil.rmtree(directory)
    directory.mkdir()  # an empty existing directory is fine too
    assert pipe.save(fresh) and sorted(os.listdir(directory)) == ["0", "jaxpipe-checkpoints.json"]


# --- non-finite states, damaged metadata, paths ---------------------------------------------------------------------


def test_a_state_with_nan_is_never_saved(pipe, data):
    directory = directory_of(pipe)
    good = pipe.init(jax.random.key(0), sample(data))
    bad = good.replace(
        step=jnp.asarray(8, jnp.int32),
        params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), good.params),
    )
    with pytest.warns(CheckpointWarning, match=r"state at step 8 holds NaN or inf \(in \.params\["):
        assert pipe.save(bad) is False
    assert not directory.exists()
    run = FitRun(pipe, epochs=1, batch_size=BATCH, steps_per_epoch=8, total_steps=8)
    hooks = Checkpointer(**pipe.stages[-1].options)  # what the stage registers for a fit
    hooks.jaxpipe_fit_start(run=run, state=good)
    for step, state in ((4, good.replace(step=jnp.asarray(4, jnp.int32))), (8, bad), (12, bad)):
        run.step = step
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            hooks.jaxpipe_fit_step(run=run, state=state, metrics={})
        assert len(said) == (1 if step == 8 else 0)  # warned once per run
    hooks.jaxpipe_fit_end(run=run, state=bad)
    assert steps_on_disk(directory) == [4]  # retention can never be left with only non-finite states


def test_metadata_damaged_but_still_json_falls_back_to_the_previous_step(two_checkpoints, data):
    pipe, directory, fresh = two_checkpoints
    meta_file = directory / "8" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["layout"][".params['Dense_0']['kernel']"] = "float32[4,17]"  # valid JSON, wrong content
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(CheckpointWarning, match=r"step 8 .* damaged \(its metadata does not match its checksum\)"):
        restored = pipe.init(jax.random.key(0), sample(data))
    assert_same_bits(restored, by_hand(pipe.build(), fresh, data, 4))


def test_a_relative_directory_is_resolved_when_the_stage_is_added(tmp_path, monkeypatch, data):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    pipe = trainer("runs/x", every=4)
    assert pipe.stages[-1].options["directory"] == str(tmp_path / "a" / "runs" / "x")
    state = pipe.init(jax.random.key(0), sample(data))
    monkeypatch.chdir(tmp_path / "b")
    assert pipe.save(state)
    assert os.listdir(tmp_path / "b") == [] and steps_on_disk(tmp_path / "a" / "runs" / "x") == [0]


# --- saving and restoring by hand, data state, starting over --------------------------------------------------------


def test_a_hand_written_loop_saves_and_restores_through_the_stage(pipe, data, capsys):
    directory, step = directory_of(pipe), pipe.build()
    fresh = pipe.init(jax.random.key(0), sample(data))
    assert pipe.restore(fresh) is fresh  # nothing saved yet
    state = fresh
    for batch in itertools.islice(batches(fresh, data, epochs=1), 5):
        state, _ = step(state, batch)
        if int(state.step) % 2 == 0:
            assert pipe.save(state)
    assert pipe.save(state)
    assert pipe.save(state) is False  # step 5 is saved already
    assert steps_on_disk(directory) == [4, 5]  # keep=2
    capsys.readouterr()
    assert_same_bits(pipe.restore(fresh), state)
    assert capsys.readouterr().out.startswith("jaxpipe: resuming from step 5 of ")
    with pytest.raises(PipelineError, match=r"`save` needs a stage that saves the training state") as info:
        trainer().save(state)
    assert "e.g. trainer = trainer.checkpoint('runs/exp'), then trainer.save(state)" in str(info.value)
    with pytest.raises(PipelineError, match=r"`restore` needs a stage that saves"):
        trainer().restore(state)


def test_the_data_state_is_saved_with_each_checkpoint_and_given_back_on_resume(pipe, data):
    fresh = pipe.init(jax.random.key(0), sample(data))
    first = FitRun(pipe, epochs=1, batch_size=None, steps_per_epoch=None, total_steps=None)
    first.data_state = {"next_index": 3, "seed": "b'\\x01'"}  # e.g. a Grain iterator's get_state(), as JSON
    hooks = Checkpointer(**pipe.stages[-1].options)
    hooks.jaxpipe_fit_start(run=first, state=fresh)
    first.step = 3
    hooks.jaxpipe_fit_end(run=first, state=fresh.replace(step=jnp.asarray(3, jnp.int32)))
    assert json.loads((directory_of(pipe) / "3" / "data" / "metadata").read_text()) == {"state": first.data_state}
    for given in (fresh, pipe.init(jax.random.key(0), sample(data))):  # a fresh state, or step 3's from init
        second = FitRun(pipe, epochs=1, batch_size=None, steps_per_epoch=None, total_steps=None)
        resumed = Checkpointer(**pipe.stages[-1].options).jaxpipe_fit_resume(run=second, state=given)
        assert int((resumed or given).step) == 3
        assert second.resumed_data_state == first.data_state


def test_resume_false_moves_the_earlier_run_aside_and_starts_afresh(two_checkpoints, data, capsys):
    pipe, directory, fresh = two_checkpoints
    earlier = {name: value for name, value in snapshot(directory).items() if name.split("/")[0] in ("4", "8")}
    run = FitRun(pipe, epochs=1, batch_size=BATCH, steps_per_epoch=8, total_steps=8)
    run.resume = False  # fit(..., resume=False)
    hooks = Checkpointer(**pipe.stages[-1].options)
    assert hooks.jaxpipe_fit_resume(run=run, state=fresh) is None  # nothing restored
    hooks.jaxpipe_fit_start(run=run, state=fresh)
    run.step = 3
    hooks.jaxpipe_fit_end(run=run, state=fresh.replace(step=jnp.asarray(3, jnp.int32)))
    assert (
        f"moved the earlier run's checkpoints (steps 4, 8) to {directory / 'earlier-run-1'}" in capsys.readouterr().out
    )
    assert sorted(os.listdir(directory)) == ["3", "earlier-run-1", "jaxpipe-checkpoints.json"]
    moved = {
        name.removeprefix("earlier-run-1/"): v for name, v in snapshot(directory).items() if "earlier-run-1/" in name
    }
    assert moved == earlier  # kept, byte for byte
    assert int(pipe.init(jax.random.key(0), sample(data)).step) == 3


def test_a_finished_run_trains_again_from_the_start_with_init_and_fit_resume_false(two_checkpoints, data):
    pipe, directory, fresh = two_checkpoints
    finished = pipe.init(jax.random.key(0), sample(data))
    assert int(finished.step) == 8  # init restores the finished run ...
    state = pipe.init(jax.random.key(0), sample(data), resume=False)  # ... unless told not to
    assert int(state.step) == 0
    again = pipe.fit(state, data, epochs=1, batch_size=BATCH, progress=False, resume=False)
    assert int(again.step) == 8
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(finished.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the same seed and data: the same run again
    assert "earlier-run-1" in os.listdir(directory)


# --- readers never delete: an evaluation process reading while training writes ----------------------------------------


@pytest.mark.slow
def test_a_reader_while_training_runs_deletes_nothing_and_the_trainer_finishes(tmp_path):
    script = Path(__file__).with_name("reader_writer.py")
    directory, out = tmp_path / "ckpt", tmp_path / "final.npz"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    trainer_process = subprocess.Popen(
        [sys.executable, str(script), "train", str(directory), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = subprocess.Popen(
        [sys.executable, str(script), "read", str(directory), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, train_errors = trainer_process.communicate(timeout=600)
    finally:
        Path(f"{out}.stop").touch()  # the reader stops either way
        read, read_errors = reader.communicate(timeout=120)
    assert trainer_process.returncode == 0, train_errors[-3000:]
    assert reader.returncode == 0, read_errors[-3000:]
    report = json.loads(read.strip().splitlines()[-1])
    assert report["reads"] >= 1 and report["reads_while_saving"] >= 1, report  # the race was run
    assert "CheckpointWarning" not in train_errors + read_errors  # nothing unfinished, nothing damaged
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "final.npz", "final.npz.stop"]  # nothing else written
    import kill_resume_train

    with np.load(out) as saved:
        killed = dict(saved)
    for path, value in kill_resume_train.leaves(kill_resume_train.train(None)).items():
        np.testing.assert_array_equal(killed[path], value, err_msg=path)
