"""`Pipeline.fit`: epochs as the run's total, data order, resume, scan, hooks, Ctrl-C."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def classify(params, batch):
    logits = batch["x"] @ params["w"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


N, BATCH = 56, 8  # 7 steps per epoch


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


@pytest.fixture(scope="module")
def trainer():
    return Pipeline(linear_loss).optimize(optax.sgd(0.05), metrics=("grad_norm",)).jit()


@pytest.fixture(scope="module")
def stepwise():
    """One step per call (`.scan(1)`), so hooks run after every step, as tests of stopping need."""
    return Pipeline(linear_loss).optimize(optax.sgd(0.05)).scan(1).jit()


def start(trainer, data, seed=0):
    return trainer.init(jax.random.key(seed), data, params={"w": jnp.zeros(3)})


class Recorder:
    """Hooks that keep the run and the order of calls."""

    def __init__(self, stop_at=None, interrupt_at=None):
        self.calls, self.run, self.stop_at, self.interrupt_at = [], None, stop_at, interrupt_at

    @jaxpipe.hookimpl
    def jaxpipe_fit_start(self, run, state):
        self.run = run
        self.calls.append(("start", int(state.step)))

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        self.calls.append(("step", run.step))
        if self.stop_at is not None and run.step >= self.stop_at:
            run.stop()
        if run.step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process

    @jaxpipe.hookimpl
    def jaxpipe_fit_epoch_end(self, run, state, metrics):
        self.calls.append(("epoch_end", run.step))

    @jaxpipe.hookimpl
    def jaxpipe_fit_end(self, run, state):
        self.calls.append(("end", int(state.step)))


def hand_written_sgd(data, epochs, state):
    """The same run by hand: keyed permutation per epoch, drop the last partial batch, jitted sgd step."""

    @jax.jit
    def step(params, batch):
        return jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.grad(linear_loss)(params, batch))

    params = state.params
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
        for i in range(N // BATCH):
            index = order[i * BATCH : (i + 1) * BATCH]
            params = step(params, {k: v[index] for k, v in data.items()})
    return params


def test_fit_trains_the_total_epochs_in_keyed_order(trainer, data):
    recorder = Recorder()
    state = start(trainer, data)
    final = trainer.fit(state, data, epochs=2, batch_size=BATCH, progress=False, hooks=[recorder])
    assert int(final.step) == 14
    np.testing.assert_allclose(final.params["w"], hand_written_sgd(data, 2, state)["w"], rtol=1e-6)
    run = recorder.run
    assert [row["step"] for row in run.history] == list(range(1, 15))
    assert [row["epoch"] for row in run.history] == [1] * 7 + [2] * 7  # counted from 1
    assert set(run.history[0]) == {"step", "epoch", "loss", "grad_norm"}
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    assert recorder.calls[0] == ("start", 0) and recorder.calls[-1] == ("end", 14)
    assert ("epoch_end", 7) in recorder.calls and ("epoch_end", 14) in recorder.calls
    ends = [c[1] for c in recorder.calls if c[0] == "step"]  # one hook call per compiled call
    assert ends == sorted(ends) and ends[-1] == 14 and 7 in ends
    assert "steps per call" in run.per_call or "step per call" in run.per_call
    assert not run.interrupted and run.error is None and run.position == {"epoch": 2, "batch": 0}


def test_epochs_is_the_run_total_so_a_resumed_fit_ends_at_the_same_step(trainer, data):
    state = start(trainer, data)
    straight = trainer.fit(state, data, epochs=3, batch_size=BATCH, progress=False)
    partial = trainer.fit(state, data, epochs=1, batch_size=BATCH, progress=False)
    partial = partial.replace(step=partial.step)  # a state saved at the end of epoch 1
    resumed = trainer.fit(partial, data, epochs=3, batch_size=BATCH, progress=False)
    assert int(resumed.step) == int(straight.step) == 21
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])
    recorder = Recorder()
    again = trainer.fit(resumed, data, epochs=3, batch_size=BATCH, progress=False, hooks=[recorder])
    assert int(again.step) == 21 and [c[0] for c in recorder.calls] == ["start", "end"]


def test_resume_mid_epoch_sees_the_same_batches(trainer, stepwise, data):
    state = start(trainer, data)
    straight = trainer.fit(state, data, epochs=2, batch_size=BATCH, progress=False)
    recorder = Recorder(stop_at=10)
    stopped = stepwise.fit(state, data, epochs=2, batch_size=BATCH, progress=False, hooks=[recorder])
    assert int(stopped.step) == 10 and recorder.run.interrupted
    assert recorder.run.position == {"epoch": 1, "batch": 3}
    resumed = trainer.fit(stopped, data, epochs=2, batch_size=BATCH, progress=False)
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])


def test_ctrl_c_ends_after_the_current_step_with_a_consistent_state(trainer, stepwise, data):
    before = signal.getsignal(signal.SIGINT)
    recorder = Recorder(interrupt_at=3)
    state = start(trainer, data)
    with pytest.raises(KeyboardInterrupt) as caught:  # re-raised once the end hooks have run, as Python code does
        stepwise.fit(state, data, epochs=2, batch_size=BATCH, progress=False, hooks=[recorder])
    stopped = caught.value.state
    assert int(stopped.step) == 3
    assert recorder.run.interrupted and recorder.calls[-1] == ("end", 3)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    three_steps = stepwise.fit(state, data, epochs=1, batch_size=BATCH, progress=False, hooks=[Recorder(stop_at=3)])
    np.testing.assert_array_equal(stopped.params["w"], three_steps.params["w"])


def test_iterable_of_batches(trainer, data):
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, N, BATCH)]
    recorder = Recorder()
    state = start(trainer, data)
    final = trainer.fit(state, batches, epochs=2, progress=False, hooks=[recorder])
    assert int(final.step) == 14 and recorder.run.steps_per_epoch == 7

    @jax.jit
    def step(params, batch):
        return jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.grad(linear_loss)(params, batch))

    params = state.params
    for batch in batches * 2:
        params = step(params, batch)
    np.testing.assert_allclose(final.params["w"], params["w"], rtol=1e-6)
    resumed = trainer.fit(start(trainer, data).replace(step=jnp.asarray(12)), batches, epochs=2, progress=False)
    assert int(resumed.step) == 14
    one_pass = trainer.fit(state, iter(batches), epochs=5, eval_data=data, progress=False, hooks=[recorder])
    assert int(one_pass.step) == 7  # no length: one pass, evaluated at its end
    assert recorder.run.eval_history[-1]["step"] == 7.0


def test_scan_stacks_batches_per_call(data):
    scanned = Pipeline(linear_loss).optimize(optax.sgd(0.05)).scan(4).jit()
    per_step = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    recorder = Recorder()
    state = start(scanned, data)
    final = scanned.fit(state, data, epochs=2, batch_size=BATCH, progress=False, hooks=[recorder])
    assert int(final.step) == 14
    assert [c[1] for c in recorder.calls if c[0] == "step"] == [4, 7, 11, 14]  # 4 + 3 per epoch
    assert len(recorder.run.history) == 14
    reference = per_step.fit(state, data, epochs=2, batch_size=BATCH, progress=False)
    np.testing.assert_allclose(final.params["w"], reference.params["w"], rtol=1e-5)


def test_eval_data_gives_accuracy_each_epoch():
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    def loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 2)).astype(np.float32)
    labels = np.argmax(x @ np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]), axis=-1).astype(np.int32)
    train, test = {"x": x[:64], "label": labels[:64]}, {"x": x[64:], "label": labels[64:]}
    trainer = Pipeline(loss).model(Linear(), input="x").optimize(optax.adam(0.1)).jit()
    recorder = Recorder()
    state = trainer.init(jax.random.key(0), train)
    final = trainer.fit(state, train, epochs=3, batch_size=16, eval_data=test, progress=False, hooks=[recorder])
    history = recorder.run.eval_history
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0]
    logits = Linear().apply({"params": final.params}, test["x"])
    np.testing.assert_allclose(history[-1]["eval_accuracy"], np.mean(np.argmax(logits, -1) == test["label"]), rtol=1e-6)
    assert history[-1]["eval_accuracy"] > 0.8


def test_progress_bar_in_a_terminal(trainer, data, capsys):
    trainer.fit(start(trainer, data), data, epochs=1, batch_size=BATCH, eval_data=data, progress=True)
    out, err = capsys.readouterr()
    assert "7/7" in err and "step" in err and "loss=" in err
    assert "epoch 1: eval_loss=" in out + err


def test_a_failing_step_reports_and_keeps_the_state(data):
    def broken(params, batch):
        return batch["x"] @ params["w"]  # not a scalar

    trainer = Pipeline(broken).optimize(optax.sgd(0.05)).jit()
    recorder = Recorder()
    state = start(trainer, data)
    with pytest.raises(PipelineError, match="must return one number"):
        trainer.fit(state, data, epochs=1, batch_size=BATCH, progress=False, hooks=[recorder])
    assert isinstance(recorder.run.error, PipelineError) and recorder.calls[-1] == ("end", 0)
    np.testing.assert_array_equal(state.params["w"], np.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0, "batch_size": BATCH}, r"`epochs` must be a positive int"),
        ({"epochs": 1}, r"needs `batch_size`, an int from 1 to the 56 examples in the data; got None"),
        (
            {"epochs": 1, "batch_size": 100},
            r"from 1 to the 56 examples in the data; got 100.\nFor example batch_size=56",
        ),
    ],
)
def test_bad_arguments(trainer, data, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        trainer.fit(start(trainer, data), data, progress=False, **kwargs)


def test_bad_data_and_state(trainer, data):
    with pytest.raises(PipelineError, match=r"same number of examples along axis 0, got sizes \{'x': 56, 'y': 5\}"):
        trainer.fit(start(trainer, data), {"x": data["x"], "y": data["y"][:5]}, batch_size=BATCH, progress=False)
    with pytest.raises(PipelineError, match=r"`fit` needs the TrainState from `init`, got dict"):
        trainer.fit({"w": np.zeros(3)}, data, batch_size=BATCH, progress=False)
