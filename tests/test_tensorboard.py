"""``jaxpipe.TensorBoard``: what TensorBoard's own reader finds is the run's history, step for step, once each,
also across a resume after a crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jaxpipe
from jaxpipe import Pipeline


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


class Runs:
    """Keeps each run ``fit`` hands its hooks, to compare the events with its history."""

    def __init__(self) -> None:
        self.runs: list[jaxpipe.FitRun] = []

    @jaxpipe.hookimpl
    def jaxpipe_fit_start(self, run, state):
        self.runs.append(run)


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``directory`` as (step, value) pairs, as TensorBoard shows them."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(rows, start_step=0):
    out: dict[str, list[tuple[int, float]]] = {}
    for index, row in enumerate(rows):
        step = int(row.get("step", start_step + index + 1))
        for name, value in row.items():
            if name not in ("step", "epoch"):
                out.setdefault(name.removeprefix("eval_"), []).append((step, float(np.float32(value))))
    return out


def schedule(step):
    return 0.05 * 0.9 ** (step / 8)


def test_scalars_read_back_with_tensorboard_are_the_run_history(data, tmp_path):
    runs = Runs()
    pipe = (
        Pipeline(linear_loss)
        .optimize(optax.sgd(schedule), learning_rate=schedule, metrics=("grad_norm", "learning_rate"))
        .jit()
    )
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    board = jaxpipe.TensorBoard(tmp_path / "logs")
    pipe.fit(state, data, epochs=3, batch_size=8, eval_data=data, log_every=4, hooks=[board, runs], progress=False)
    (run,) = runs.runs
    train, evals = scalars(tmp_path / "logs" / "train"), scalars(tmp_path / "logs" / "eval")
    assert sorted(train) == ["grad_norm", "learning_rate", "loss"] and sorted(evals) == ["loss"]
    assert train == expected(run.history) and len(train["loss"]) == 24
    assert [step for step, _ in train["learning_rate"]] == list(range(1, 25))
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], [schedule(s) for s in range(24)], rtol=1e-6)
    assert evals == expected(run.eval_history) and [s for s, _ in evals["loss"]] == [8, 16, 24]


class ReadAtStep:
    """Reads the train log while fit runs, at step ``at``: what an open TensorBoard sees then."""

    def __init__(self, directory: Path, at: int) -> None:
        self.directory, self.at, self.seen = directory, at, None

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        if run.step == self.at:
            self.seen = scalars(self.directory)


def test_events_are_on_disk_at_each_epoch_end_and_when_stopped(data, tmp_path):
    runs, probe = Runs(), ReadAtStep(tmp_path / "logs" / "train", at=9)

    class StopAt:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            if run.step == 13:
                run.stop()

    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).scan(1).jit()  # a call per step: stop mid-epoch
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    board = jaxpipe.TensorBoard(tmp_path / "logs")
    hooks = [board, runs, probe, StopAt()]
    state = pipe.fit(state, data, epochs=3, batch_size=8, log_every=100, hooks=hooks, progress=False)
    assert int(state.step) == 13
    assert [step for step, _ in probe.seen["loss"]] == list(range(1, 9))  # flushed as read back: one call late
    assert scalars(tmp_path / "logs" / "train") == expected(runs.runs[0].history)  # all 13, flushed on stop


def test_every_step_a_checkpoint_holds_is_on_disk_before_the_checkpoint_is_saved(data, tmp_path):
    """A run killed right after a save and resumed from it loses no step of its curves (none missing for good)."""
    probe = ReadAtStep(tmp_path / "logs" / "train", at=6)
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit().checkpoint(str(tmp_path / "ckpt"), every=6)
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    hooks = [jaxpipe.TensorBoard(tmp_path / "logs"), probe]
    pipe.fit(state, data, epochs=2, batch_size=8, log_every=100, hooks=hooks, progress=False)
    assert [step for step, _ in probe.seen["loss"]] == list(range(1, 7))  # the checkpoint's step and all before


def test_a_run_resumed_after_a_crash_shows_each_step_once(data, tmp_path):
    directory, logs = tmp_path / "ckpt", tmp_path / "logs"
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit().checkpoint(str(directory), every=8)
    first, second = Runs(), Runs()
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    hooks = [jaxpipe.TensorBoard(logs), first]
    pipe.fit(state, data, epochs=3, batch_size=8, eval_data=data, log_every=4, hooks=hooks, progress=False)
    shutil.rmtree(directory / "24")  # as if killed after writing step 24's events but before its checkpoint
    hooks = [jaxpipe.TensorBoard(logs), second]
    pipe.fit(state, data, epochs=3, batch_size=8, eval_data=data, log_every=4, hooks=hooks, progress=False)
    (run,) = second.runs
    assert run.start_step == 16 and len(run.history) == 8
    train, evals = scalars(logs / "train"), scalars(logs / "eval")
    assert [step for step, _ in train["loss"]] == list(range(1, 25))  # no step twice
    resumed = expected(run.history, start_step=16)
    assert {name: values[16:] for name, values in train.items()} == resumed  # the resumed run's values
    assert {name: values[:16] for name, values in train.items()} == expected(first.runs[0].history[:16])
    assert [step for step, _ in evals["loss"]] == [8, 16, 24]
    assert evals["loss"][2] == expected(run.eval_history)["loss"][0]


def test_a_fresh_run_in_an_old_log_directory_replaces_its_curves(data, tmp_path):
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    state = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    pipe.fit(state, data, epochs=3, batch_size=8, hooks=[jaxpipe.TensorBoard(tmp_path)], progress=False)
    runs = Runs()
    pipe.fit(state, data, epochs=1, batch_size=8, hooks=[jaxpipe.TensorBoard(tmp_path), runs], progress=False)
    assert scalars(tmp_path / "train") == expected(runs.runs[0].history)  # 8 steps, not 24


def test_import_is_lazy_and_repr_is_plain():
    assert repr(jaxpipe.TensorBoard("runs/a")) == "TensorBoard('runs/a')"
