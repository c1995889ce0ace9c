"""``fit`` on Grain data: the same training as on the same batches in a list, and a resumed run continues from
the Grain iterator's saved position (bit-identical parameters after SIGKILL at random points; reads after a
resume proportional to the steps left)."""

from __future__ import annotations

import os
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import grain_resume_train
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError
from jaxpipe._training.grain import Epochs, as_batches, is_grain

ROOT = Path(__file__).resolve().parent.parent


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def records(n: int = 80) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def dataset(counter: list[int] | None = None) -> grain.MapDataset:
    def count(record):
        if counter is not None:
            counter.append(1)  # list.append is atomic: Grain reads on several threads
        return record

    return grain.MapDataset.source(records()).shuffle(seed=0).map(count).batch(8, drop_remainder=True)


TRAINER = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()


def train(data, epochs=3, pipe=TRAINER, hooks=()):
    state = pipe.init(jax.random.key(0), {"x": np.zeros((8, 3), np.float32)}, params={"w": jnp.zeros(3)})
    return pipe.fit(state, data, epochs=epochs, progress=False, hooks=hooks, log_every=1)  # a call per step


def test_other_data_passes_unchanged_and_grain_is_not_imported():
    code = (
        "import sys, numpy as np; from jaxpipe._training.grain import Epochs, as_batches, is_grain\n"
        "data = {'x': np.zeros(3)}; batches = [data]\n"
        "assert as_batches(data) is data and as_batches(batches) is batches and not is_grain(batches)\n"
        "assert 'grain' not in sys.modules, 'grain imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grain_datasets_loaders_and_iterators_are_taken_as_they_are():
    ds = dataset()
    loader = grain.DataLoader(
        data_source=records(),
        sampler=grain.samplers.IndexSampler(80, shard_options=grain.sharding.NoSharding(), num_epochs=1, seed=0),
        operations=[grain.transforms.Batch(8)],
        worker_count=0,
    )
    for data in (ds.to_iter_dataset(), iter(ds), loader, iter(loader)):
        assert is_grain(data) and as_batches(data) is data
    epochs = as_batches(ds)  # a MapDataset: read one Grain epoch per fit epoch
    assert isinstance(epochs, Epochs) and epochs.for_epoch(0) is ds and len(epochs) == len(ds) == 10
    endless = as_batches(grain.MapDataset.source(records()).repeat().batch(8))
    assert isinstance(endless, grain.IterDataset) and not hasattr(endless, "__len__")  # no sys.maxsize steps


def test_other_grain_objects_are_refused_with_the_way_to_write_them():
    with pytest.raises(PipelineError, match=r"got grain\..*IndexSampler\.\nGive e\.g\. grain\.MapDataset\.source"):
        as_batches(grain.samplers.IndexSampler(80, shard_options=grain.sharding.NoSharding(), num_epochs=1, seed=0))


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)] + [np.asarray(state.step)]


def batch_bits(batches):
    return [tuple(np.asarray(b[k]).tobytes() for k in sorted(b)) for b in batches]


def test_each_epoch_of_a_map_dataset_is_grains_own_epoch_reshuffled():
    ds = dataset()
    epochs = as_batches(ds)
    first, second = (list(epochs.for_epoch(e)) for e in (0, 1))
    assert batch_bits(first) == batch_bits(ds)  # epoch 1 as before
    assert batch_bits(first + second) == batch_bits(ds.repeat(2))  # what Grain's repeat gives: shuffle seed + epoch
    assert batch_bits(first) != batch_bits(second)  # a new order
    assert sorted(x for b in first for x in b["x"][:, 0]) == sorted(x for b in second for x in b["x"][:, 0])
    unshuffled = grain.MapDataset.source(records()).batch(8)  # nothing random: the same batches each epoch
    assert batch_bits(as_batches(unshuffled).for_epoch(3)) == batch_bits(unshuffled)


def test_fit_on_a_grain_dataset_trains_as_on_the_same_batches_in_a_list():
    ds = dataset()
    assert len(ds) == 10
    for data, epochs in ((ds, 3), (ds.to_iter_dataset(), 1), (iter(ds), 1)):
        expected = train(list(ds.repeat(epochs)), epochs=1)  # a MapDataset's epochs are Grain's, reshuffled
        got = train(data, epochs=epochs)
        for a, b in zip(leaves(got), leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(got.step) == 10 * epochs


class StopAt:
    def __init__(self, step: int) -> None:
        self.step, self.runs = step, []

    @jaxpipe.hookimpl
    def jaxpipe_fit_start(self, run, state):
        self.runs.append(run)

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        if run.step >= self.step:  # fit runs several steps per call: the first call to reach it
            run.stop()


@pytest.mark.parametrize("stop", [4, 17])
def test_a_stopped_run_resumes_at_the_grain_position_and_reads_only_what_is_left(tmp_path, stop):
    pipe = TRAINER.checkpoint(str(tmp_path / "ckpt"), every=3)  # calls end at multiples of 3 and at epoch ends
    first = StopAt(stop)
    train(dataset(), pipe=pipe, hooks=[first])  # stops mid-epoch; the checkpoint holds the Grain position
    stopped = first.runs[0].step
    assert stopped % 10 and first.runs[0].data_state == {"next_index": stopped % 10}
    reads: list[int] = []
    second = StopAt(10**9)
    resumed = train(dataset(reads), pipe=pipe, hooks=[second])
    run = second.runs[0]
    assert run.start_step == stopped and run.resumed_data_state == {"next_index": stopped % 10}
    assert len(reads) == (30 - stopped) * 8  # each epoch read from where it stood: nothing read twice, none skipped
    for a, b in zip(leaves(resumed), leaves(train(dataset())), strict=True):
        np.testing.assert_array_equal(a, b)  # the uninterrupted run's parameters, bit for bit


class CountingSource:
    """A random-access source (len and [i], what Grain's DataLoader reads) that counts its reads."""

    def __init__(self, reads: list[int]) -> None:
        self.records, self.reads = records(), reads

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:  # Grain checks the source's repr when it restores a loader's state
        return f"CountingSource({len(self.records)} records)"

    def __getitem__(self, index):
        self.reads.append(1)
        return self.records[index]


def loader(reads: list[int]) -> grain.DataLoader:
    """3 epochs of 10 batches, reshuffled each epoch by the sampler; no read-ahead worth speaking of."""
    return grain.DataLoader(
        data_source=CountingSource(reads),
        sampler=grain.samplers.IndexSampler(80, shard_options=grain.sharding.NoSharding(), num_epochs=3, seed=0),
        operations=[grain.transforms.Batch(8, drop_remainder=True)],
        worker_count=0,
        read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=1),
    )


def test_a_stopped_run_on_a_grain_dataloader_resumes_from_its_saved_state(tmp_path):
    pipe = TRAINER.checkpoint(str(tmp_path / "ckpt"), every=3)
    first = StopAt(13)
    train(loader([]), epochs=1, pipe=pipe, hooks=[first])  # the loader's one pass holds its 3 epochs
    stopped, saved = first.runs[0].step, first.runs[0].data_state
    assert 13 <= stopped < 30 and isinstance(saved, str)  # the loader's state is JSON bytes, kept as text
    reads: list[int] = []
    second = StopAt(10**9)
    resumed = train(loader(reads), epochs=1, pipe=pipe, hooks=[second])
    assert second.runs[0].start_step == stopped and second.runs[0].resumed_data_state == saved
    assert (30 - stopped) * 8 <= len(reads) <= (30 - stopped + 3) * 8  # not the `stopped` batches again
    for a, b in zip(leaves(resumed), leaves(train(loader([]), epochs=1)), strict=True):
        np.testing.assert_array_equal(a, b)


# --- SIGKILL at random points, on a run that reads from Grain ------------------------------------------

SCRIPT = Path(__file__).with_name("grain_resume_train.py")
KILLS = 4
SEED = int(os.environ.get("JAXPIPE_KILL_SEED", "20261"))
STEP = re.compile(r"^step (\d+)$", re.MULTILINE)


def newest_step(directory: Path) -> int:
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps, default=0)


def test_sigkill_at_random_points_then_resume_from_grain_gives_bit_identical_parameters(tmp_path):
    print(f"kill seed: {SEED} (rerun with JAXPIPE_KILL_SEED={SEED})")
    rng = random.Random(SEED)
    directory, out = tmp_path / "ckpt", tmp_path / "final.npz"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    total = grain_resume_train.EPOCHS * 10
    batch, ahead, every = grain_resume_train.BATCH_SIZE, grain_resume_train.READ_AHEAD, grain_resume_train.EVERY
    kills, runs, log = 0, 0, []
    while True:
        runs += 1
        assert runs <= KILLS + 4, "the run made no progress across restarts"
        start, reads = newest_step(directory), tmp_path / f"reads-{runs}"
        command = [sys.executable, str(SCRIPT), str(directory), str(out), str(reads)]
        with open(tmp_path / "stderr.txt", "w") as errors:
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", (tmp_path / "stderr.txt").read_text()[-3000:]
        lines = []
        if kills < KILLS:
            target, seen = rng.randint(1, 12), 0
            for line in process.stdout:
                lines.append(line)
                seen += line.startswith("step ")
                if seen >= target:
                    break
            time.sleep(rng.uniform(0.0, 0.1))
            process.send_signal(signal.SIGKILL)
        output = "".join(lines) + process.communicate(timeout=180)[0]
        steps = [int(m.group(1)) for m in STEP.finditer(output)]
        count = reads.stat().st_size if reads.exists() else 0
        log.append(f"run {runs}: from step {start}, trained {steps[:1]}..{steps[-1:]}, Grain read {count} records")
        if steps:  # went on from the newest checkpoint (a line per call of up to `every` steps)
            assert start < steps[0] <= start + every, log
            # reads follow the steps trained from the resumed position, plus a read-ahead of a few batches
            # (Grain's buffer, fit's call being prepared and the one ready), not the steps done before it
            assert count <= (steps[-1] - start + ahead + 2 * every + 2) * batch, log
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
        kills += 1
    print("\n".join(log))
    assert kills == KILLS
    assert count == (total - start) * batch, log  # the last run read exactly what was left
    with np.load(out) as saved:
        killed = dict(saved)
    uninterrupted = grain_resume_train.leaves(grain_resume_train.train(None, str(tmp_path / "reads-reference")))
    assert killed.keys() == uninterrupted.keys()
    for path, value in uninterrupted.items():
        np.testing.assert_array_equal(killed[path], value, err_msg=path)
    assert int(killed[".step"]) == total


# --- what fit does with `data = _grain.as_batches(data)` (wired at its start) ---------------------------


def test_fit_trains_an_endless_grain_dataset_until_stopped():
    endless = grain.MapDataset.source(records()).shuffle(seed=0).repeat().batch(8)
    stop = StopAt(25)
    state = train(endless, epochs=1, hooks=[stop])
    run = stop.runs[0]
    assert run.steps_per_epoch is None and run.total_steps is None  # not sys.maxsize // 8 steps planned
    assert int(state.step) == run.step >= 25 and run.interrupted


def test_fit_refuses_a_grain_object_that_is_not_a_dataset_or_loader():
    sampler = grain.samplers.IndexSampler(80, shard_options=grain.sharding.NoSharding(), num_epochs=1, seed=0)
    with pytest.raises(PipelineError, match=r"Grain data as a `grain\.MapDataset`.*got grain\..*IndexSampler"):
        train(sampler)


def test_the_grain_example_trains_and_a_rerun_resumes_without_reading_again(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "examples" / "grain_digits.py"), run_name="example")["main"]
    accuracy = main(str(tmp_path / "out"), epochs=10)
    first = capsys.readouterr().out
    steps = 10 * 1400 // 64
    assert f"trained to step {steps} of {steps}; Grain read {steps * 64} records in this run" in first
    assert accuracy >= 0.85
    assert main(str(tmp_path / "out"), epochs=10) == accuracy  # restored, complete: nothing trained again
    assert f"trained to step {steps} of {steps}; Grain read 0 records in this run" in capsys.readouterr().out
