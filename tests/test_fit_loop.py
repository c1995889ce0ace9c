"""`fit`'s loop: steps per call, the non-finite guard, bad input, resumable iterators, `History`."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError

N, BATCH = 56, 8  # 7 steps per epoch


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


@pytest.fixture(scope="module")
def trainer():
    return Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()


def start(trainer, data):
    return trainer.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})


def host_order_fit(trainer, state, data, steps):
    """Today's loop by hand: host permutation of (data_key, epoch), one jitted step per batch."""
    per_epoch = N // BATCH
    for step in range(steps):
        epoch, offset = divmod(step, per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
        index = order[offset * BATCH : (offset + 1) * BATCH]
        state, _ = trainer(state, {k: v[index] for k, v in data.items()})
    return state


class Calls:
    """Records the step after each compiled call; fine with calls of several steps."""

    accepts_calls = True

    def __init__(self):
        self.ends, self.run = [], None

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        self.run = run
        self.ends.append(run.step)


# --- steps per call ---------------------------------------------------------------------------------


def test_calls_end_at_epoch_ends_and_checkpoint_periods(trainer, data, tmp_path):
    pipe = trainer.checkpoint(tmp_path / "ckpt", every=3, keep=None)
    calls = Calls()
    final = pipe.fit(start(trainer, data), data, epochs=3, batch_size=BATCH, progress=False, hooks=[calls])
    assert int(final.step) == 21 and calls.ends[-1] == 21
    ends = [0, *calls.ends]
    for a, b in zip(ends, ends[1:], strict=False):  # no call crosses an epoch end or a multiple of 3
        assert b > a and (a // 7 == (b - 1) // 7) and (a // 3 == (b - 1) // 3)
    assert {7, 14} <= set(calls.ends)
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [3, 6, 9, 12, 15, 18, 21]  # exactly at the multiples, as with one step per call
    assert re.fullmatch(r"\d+ steps? per call \(auto\), data on the device .*", calls.run.per_call)
    np.testing.assert_array_equal(
        final.params["w"], host_order_fit(trainer, start(trainer, data), data, 21).params["w"]
    )


def test_a_hook_written_for_every_step_still_sees_every_step(trainer, data):
    class EveryStep:
        def __init__(self):
            self.steps = []

        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            self.steps.append((run.step, float(metrics["loss"])))  # a scalar, as when fit ran one step per call

    hook = EveryStep()
    trainer.fit(start(trainer, data), data, epochs=1, batch_size=BATCH, progress=False, hooks=[hook])
    assert [s for s, _ in hook.steps] == list(range(1, 8))


def test_progress_line_says_what_runs_per_call(trainer, data, capsys):
    trainer.fit(start(trainer, data), data, epochs=2, batch_size=BATCH, progress=True, device_data=False)
    out, err = capsys.readouterr()
    assert re.search(
        r"fit: \d+ steps? per call \(auto\), data streamed from the host \(.*device_data=False\)", out + err
    )


@pytest.mark.parametrize("device_data", [True, False, "auto"])
def test_device_data_choices_give_the_same_bits(trainer, data, device_data):
    calls = Calls()
    final = trainer.fit(
        start(trainer, data), data, epochs=2, batch_size=BATCH, progress=False, device_data=device_data, hooks=[calls]
    )
    want = host_order_fit(trainer, start(trainer, data), data, 14)
    np.testing.assert_array_equal(final.params["w"], want.params["w"])
    where = "streamed from the host" if device_data is False else "on the device"
    assert where in calls.run.per_call


def test_an_iterable_is_streamed_in_its_own_order(trainer, data):
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, N, BATCH)]
    final = trainer.fit(start(trainer, data), batches, epochs=3, progress=False)
    state = start(trainer, data)
    for batch in batches * 3:
        state, _ = trainer(state, batch)
    np.testing.assert_array_equal(final.params["w"], state.params["w"])


def test_a_pipeline_without_jit_is_called_as_built(data):
    eager = Pipeline(linear_loss).optimize(optax.sgd(0.05))
    calls = Calls()
    final = eager.fit(start(eager, data), data, epochs=2, batch_size=BATCH, progress=False, hooks=[calls])
    assert int(final.step) == 14 and "the pipeline called as built" in calls.run.per_call
    want = host_order_fit(eager.jit(), start(eager, data), data, 14)
    np.testing.assert_allclose(final.params["w"], want.params["w"], rtol=1e-6)


# --- the non-finite guard ---------------------------------------------------------------------------


DIVERGES_AT = 12  # the first step whose loss is not finite, with sgd(30.0) on this data


@pytest.fixture(scope="module")
def diverging(data):
    """A learning rate that overflows: a run that diverges, as a real one does."""
    trainer = Pipeline(linear_loss).optimize(optax.sgd(30.0)).jit()
    state = host_order_fit(trainer, start(trainer, data), data, DIVERGES_AT - 1)
    assert np.isfinite(state.params["w"]).all()
    return trainer


@pytest.mark.parametrize("device_data", [True, False])
def test_a_non_finite_loss_stops_with_the_step_epoch_batch_and_metric(diverging, data, device_data):
    at = DIVERGES_AT
    calls = Calls()
    message = r"at step 12 \(epoch 2, batch 5 of 7\): the step gave non-finite .*loss=inf"
    with pytest.raises(PipelineError, match=message) as caught:
        diverging.fit(
            start(diverging, data),
            data,
            epochs=3,
            batch_size=BATCH,
            progress=False,
            device_data=device_data,
            hooks=[calls],
        )
    kept = caught.value.state
    assert int(kept.step) == at - 1 and calls.run.step == at - 1 and len(calls.run.history) == at - 1
    want = host_order_fit(diverging, start(diverging, data), data, at - 1)
    np.testing.assert_array_equal(kept.params["w"], want.params["w"])
    assert isinstance(calls.run.error, PipelineError)


@pytest.mark.parametrize("device_data", [True, False])
def test_a_full_call_that_goes_non_finite_is_replayed_to_the_last_finite_step(data, device_data):
    """Full calls carry no guard (they cost exactly their steps); the state before one is kept and replayed."""
    trainer = Pipeline(linear_loss).optimize(optax.sgd(30.0)).jit()  # as `diverging`
    calls = Calls()
    with pytest.raises(PipelineError, match=r"at step 12 \(epoch 2, batch 5 of 7\)") as caught:
        trainer.fit(
            start(trainer, data),
            data,
            epochs=3,
            batch_size=BATCH,
            progress=False,
            device_data=device_data,
            hooks=[calls],
            steps_per_call=7,  # full calls of one epoch, whatever the machine's speed
        )
    assert calls.ends == [7] and calls.run.per_call.startswith("7 steps per call")  # steps 8-14: a full call
    kept = caught.value.state
    assert int(kept.step) == DIVERGES_AT - 1
    want = host_order_fit(trainer, start(trainer, data), data, DIVERGES_AT - 1)
    np.testing.assert_array_equal(kept.params["w"], want.params["w"])


def test_on_nonfinite_stop_returns_the_last_finite_state_and_checkpoints_it(diverging, data, tmp_path):
    pipe = diverging.checkpoint(tmp_path / "ckpt", every=2, keep=None)
    with pytest.warns(RuntimeWarning, match=r"at step 12 "):
        final = pipe.fit(start(diverging, data), data, epochs=3, batch_size=BATCH, progress=False, on_nonfinite="stop")
    assert int(final.step) == DIVERGES_AT - 1 and np.isfinite(final.params["w"]).all()
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [2, 4, 6, 8, 10, 11]  # the last finite state, saved at the end; nothing after
    restored = pipe.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored.params["w"], final.params["w"])


def test_on_nonfinite_raise_keeps_the_checkpoints_from_before(diverging, data, tmp_path):
    pipe = diverging.checkpoint(tmp_path / "ckpt", every=2, keep=2)
    with pytest.raises(PipelineError, match="non-finite"):
        pipe.fit(start(diverging, data), data, epochs=3, batch_size=BATCH, progress=False)
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [8, 10]  # keep=2 never rotated a good one out for a bad one


def test_the_guard_without_jit_keeps_the_state_before_the_call(data):
    eager = Pipeline(linear_loss).optimize(optax.sgd(30.0))
    with pytest.raises(PipelineError, match=r"at step 12 \(epoch 2, batch 5 of 7\)") as caught:
        eager.fit(start(eager, data), data, epochs=3, batch_size=BATCH, progress=False)
    assert int(caught.value.state.step) == DIVERGES_AT - 1 and np.isfinite(caught.value.state.params["w"]).all()


def test_on_nonfinite_ignore_trains_on(diverging, data):
    calls = Calls()
    final = diverging.fit(
        start(diverging, data), data, epochs=3, batch_size=BATCH, progress=False, on_nonfinite="ignore", hooks=[calls]
    )
    assert int(final.step) == 21 and not math.isfinite(calls.run.history[DIVERGES_AT - 1]["loss"])


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_of", "kwargs", "message"),
    [
        (
            lambda d: [d["x"], d["y"]],
            {},
            r"(?s)`data` is a list of 2 arrays.*iterable of batches.*'label': Y\}",
        ),
        (lambda d: (d["x"], d["y"]), {}, r"(?s)`data` is a tuple of 2 arrays.*Put the arrays in a dict"),
        (lambda d: "train.npz", {}, r"`data` must be a dict of arrays or an iterable of batches, got str"),
        (lambda d: None, {}, r"`data` must be a dict of arrays or an iterable of batches, got NoneType"),
        (lambda d: d, {"eval_batch_size": 0}, r"`eval_batch_size` must be a positive int or None, got 0"),
        (lambda d: d, {"eval_batch_size": -1}, r"`eval_batch_size` must be a positive int or None, got -1"),
        (lambda d: d, {"log_every": 0}, r"`log_every` must be a positive int, got 0.\nFor example log_every=10"),
        (lambda d: d, {"log_every": -5}, r"`log_every` must be a positive int, got -5"),
        (lambda d: d, {"eval_data": {}}, r"eval data as a dict of arrays.*got sizes \{\}"),
        (lambda d: d, {"eval_data": {"x": np.zeros((0, 3))}}, r"`eval_data` has no examples"),
        (lambda d: d, {"on_nonfinite": "skip"}, r'`on_nonfinite` must be "raise", "stop" or "ignore"'),
        (lambda d: d, {"device_data": "yes"}, r'`device_data` must be True, False or "auto"'),
    ],
)
def test_bad_input_is_named_with_an_example(trainer, data, data_of, kwargs, message):
    kwargs = {"batch_size": BATCH, **kwargs}
    with pytest.raises(PipelineError, match=message):
        trainer.fit(start(trainer, data), data_of(data), progress=False, **kwargs)


def test_a_sized_iterable_shorter_than_its_len(trainer, data):
    class Short:
        def __len__(self):
            return 7

        def __iter__(self):
            return iter([{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, 40, BATCH)])

    with pytest.raises(PipelineError, match=r"says it has 7 batches \(its `len`\), but in epoch 1 it gave only 5"):
        trainer.fit(start(trainer, data), Short(), epochs=2, progress=False)


def test_a_finished_run_says_so(trainer, data, tmp_path, capsys):
    pipe = trainer.checkpoint(tmp_path / "ckpt", every=100)
    done = pipe.fit(start(trainer, data), data, epochs=1, batch_size=BATCH, progress=False)
    capsys.readouterr()
    again = pipe.fit(start(trainer, data), data, epochs=1, batch_size=BATCH, progress=False)
    err = capsys.readouterr().err
    assert int(again.step) == int(done.step) == 7
    assert "already complete" in err and "raise `epochs`" in err and "resume=False" in err
    assert len(err.strip().splitlines()) == 1


# --- resumable iterators -------------------------------------------------------------------------------


class Counting:
    """An iterable whose iterators keep their position with get_state/set_state, counting batches read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return CountingIterator(self)


class CountingIterator:
    def __init__(self, source):
        self.source, self.position = source, 0

    def __next__(self):
        if self.position >= len(self.source.batches):
            raise StopIteration
        self.source.reads += 1
        self.position += 1
        return self.source.batches[self.position - 1]

    def __iter__(self):
        return self

    def get_state(self):
        return f'{{"position": {self.position}}}'.encode()  # bytes, as Grain's DataLoader iterators give

    def set_state(self, state):
        assert isinstance(state, bytes)
        self.position = int(state.decode().split(":")[1].strip(" }"))


class ResumeFrom:
    """Stands in for a checkpointer: gives a saved state and its data position."""

    def __init__(self, state, data_state):
        self.state, self.data_state = state, data_state

    @jaxpipe.hookimpl
    def jaxpipe_fit_resume(self, run, state):
        run.resumed_data_state = self.data_state
        return self.state


class StopAt:
    accepts_calls = True

    def __init__(self, step):
        self.step, self.seen = step, []

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        self.seen.append((run.step, run.data_state))
        if run.step >= self.step:
            run.stop()


def test_a_resumable_iterator_resumes_without_rereading(trainer, data):
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, N, BATCH)]
    straight = trainer.fit(start(trainer, data), Counting(batches), epochs=2, progress=False)
    first = Counting(batches)
    stop = StopAt(10)
    stopped = trainer.fit(start(trainer, data), first, epochs=2, progress=False, hooks=[stop, Calls()], log_every=1)
    step, data_state = stop.seen[-1]
    assert int(stopped.step) == step and data_state == f'{{"position": {step - 7}}}'  # JSON-able: bytes as str
    second = Counting(batches)
    resumed = trainer.fit(
        start(trainer, data), second, epochs=2, progress=False, hooks=[ResumeFrom(stopped, data_state)]
    )
    assert second.reads == 14 - step  # no batch read again to skip it
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])


# --- History -------------------------------------------------------------------------------------------


def test_history_keeps_steps_and_epochs():
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
    history = jaxpipe.History()
    state = trainer.init(jax.random.key(0), train)
    trainer.fit(state, train, epochs=3, batch_size=16, eval_data=test, progress=False, hooks=[history])
    table = history.as_dict()
    assert table["steps"]["step"] == list(range(1, 13)) and table["steps"]["epoch"] == [1] * 4 + [2] * 4 + [3] * 4
    assert table["epochs"]["epoch"] == [1, 2, 3] and table["epochs"]["step"] == [4, 8, 12]
    assert math.isclose(table["epochs"]["loss"][0], sum(table["steps"]["loss"][:4]) / 4)
    assert table["epochs"]["eval_accuracy"][-1] > 0.8
    assert all(type(v) is list for part in table.values() for v in part.values())


# --- stopping and resuming ------------------------------------------------------------------------------


def test_ctrl_c_stops_after_the_current_call_with_several_steps_per_call(trainer, data):
    import os
    import signal

    class InterruptFirst(Calls):
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            super().jaxpipe_fit_step(run, state, metrics)
            if len(self.ends) == 1:
                os.kill(os.getpid(), signal.SIGINT)

    calls = InterruptFirst()
    with pytest.raises(KeyboardInterrupt) as caught:  # Python's convention, once the call has ended and been saved
        trainer.fit(start(trainer, data), data, epochs=3, batch_size=BATCH, progress=False, hooks=[calls])
    stopped = caught.value.state
    assert calls.run.interrupted and int(stopped.step) == calls.ends[-1] == calls.ends[0] < 21
    np.testing.assert_array_equal(
        stopped.params["w"], host_order_fit(trainer, start(trainer, data), data, int(stopped.step)).params["w"]
    )


def test_resume_false_reaches_the_hooks(trainer, data):
    class Seen:
        resume = None

        @jaxpipe.hookimpl
        def jaxpipe_fit_resume(self, run, state):
            Seen.resume = run.resume

    trainer.fit(start(trainer, data), data, epochs=1, batch_size=BATCH, progress=False, hooks=[Seen()], resume=False)
    assert Seen.resume is False


def test_device_data_true_needs_a_dict_of_arrays(trainer, data):
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, N, BATCH)]
    with pytest.raises(PipelineError, match=r"`device_data=True` puts a dict of arrays on the device"):
        trainer.fit(start(trainer, data), batches, progress=False, device_data=True)


@pytest.mark.parametrize("device_data", [True, False])
def test_data_parallel_with_rows_the_mesh_does_not_divide(trainer, data, device_data):
    """60 examples on 8 devices: the data on the device is padded to 64 rows that no permutation picks."""
    mesh = jax.make_mesh((8,), ("data",))
    rows = {k: v[:60] for k, v in data.items()}
    sharded = Pipeline(linear_loss).optimize(optax.sgd(0.05)).data_parallel(mesh).jit()
    calls = Calls()
    got = sharded.fit(
        start(sharded, rows), rows, epochs=2, batch_size=16, progress=False, device_data=device_data, hooks=[calls]
    )
    want = trainer.fit(start(trainer, rows), rows, epochs=2, batch_size=16, progress=False)
    assert int(got.step) == 6 and ("on the device" in calls.run.per_call) == device_data
    np.testing.assert_allclose(np.asarray(got.params["w"]), np.asarray(want.params["w"]), rtol=2e-5, atol=2e-6)
