"""The Orbax ``.checkpoint()`` stage: saving, resuming, damaged checkpoints, bad input.

The reference for every resumed run is a hand-written loop: the pipeline's own compiled step called on the
batches ``fit`` documents (epoch ``e`` permuted by ``fold_in(data_key, e)``). Most tests share one checkpointing
pipeline whose directory is emptied before each test, so the step compiles once for the module.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import warnings

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
    assert "LatestN(2)" in explained and "every 4 steps" in explained
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
    state = pipe.fit(fresh, data, epochs=3, batch_size=BATCH, progress=False, hooks=[InterruptAt(7)])
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
