"""The loop's parts and what each guarantees: batch shapes per mode, the end's rule for errors,
the non-finite guard on any metric, examples batched by ``batch_size``, ``steps=``, evaluation
anywhere, early stopping, and steps per call chosen by measurement."""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import NonFiniteError, Pipeline, PipelineError
from jaxpipe._training import loop as fit_loop
from jaxpipe._training.grain import as_batches

N, BATCH = 64, 16  # 4 steps per epoch


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


def start(trainer, data):
    return trainer.init(jax.random.key(0), data, params={"w": jnp.zeros(3)})


def by_hand(trainer, state, data, steps):
    """The hand-written loop: epoch e's order is permutation(fold_in(data_key, e)), one jitted step per batch."""
    per_epoch = N // BATCH
    for step in range(steps):
        epoch, offset = divmod(step, per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
        state, _ = trainer(state, {k: v[order[offset * BATCH : (offset + 1) * BATCH]] for k, v in data.items()})
    return state


# --- issue 20: every mode hands the step the batch a hand-written loop would ---------------------------


class Flatten(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))  # fails, or trains on the wrong thing, on [1, B, ...]


def shaped_loss(logits, batch):
    return jnp.mean((logits - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def shaped():
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(N, 2, 4)).astype(np.float32), "y": rng.normal(size=(N, 3)).astype(np.float32)}


JIT_OPTIONS = [{}, {"keep_unused": True}, {"static_argnames": ()}, {"donate_argnums": ()}]


@pytest.mark.parametrize("jit_options", JIT_OPTIONS, ids=["plain", "keep_unused", "static_argnames", "donate"])
@pytest.mark.parametrize("kind", ["arrays", "arrays-streamed", "list", "iterator", "grain"])
def test_every_mode_and_data_kind_gives_the_step_the_hand_written_batch(shaped, jit_options, kind):
    step = Pipeline(shaped_loss).model(Flatten(), input="x").optimize(optax.sgd(0.1))
    trainer = step.jit(**jit_options) if jit_options else step.jit()
    state = trainer.init(jax.random.key(0), {k: v[:BATCH] for k, v in shaped.items()})
    batches = [{k: v[i : i + BATCH] for k, v in shaped.items()} for i in range(0, N, BATCH)]
    kwargs: dict = {"epochs": 2, "progress": False}
    if kind.startswith("arrays"):
        data = shaped
        kwargs.update(batch_size=BATCH, device_data=kind == "arrays")
        want = state
        for epoch in range(2):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
            for i in range(N // BATCH):
                want, _ = trainer(want, {k: v[order[i * BATCH : (i + 1) * BATCH]] for k, v in shaped.items()})
    else:
        if kind == "list":
            data = batches
        elif kind == "iterator":
            data = iter(batches * 2)
            kwargs.pop("epochs")
        else:
            grain = pytest.importorskip("grain")
            data = grain.MapDataset.source(batches)
        want = state
        for batch in batches * 2:
            want, _ = trainer(want, batch)
    shapes = []

    class Shapes:
        @jaxpipe.hookimpl
        def jaxpipe_place_batch(self, run, batch, whole):
            shapes.append(tuple(np.shape(batch["x"])))

    got = trainer.fit(state, data, hooks=[Shapes()], **kwargs)
    assert int(got.step) == 2 * N // BATCH
    assert all(s[-2:] == (2, 4) and s[-3] == BATCH for s in shapes), shapes  # never an extra axis of 1 per step
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_docstring_says_which_jit_options_fall_back_and_why():
    doc = jaxpipe.fit.__doc__
    assert "static_argnums" in doc and "in_shardings" in doc and "keep_unused" in doc and "as built" in doc


# --- issue 16: nothing lost when something else fails ---------------------------------------------------


class RaisesAtEnd:
    @jaxpipe.hookimpl
    def jaxpipe_fit_end(self, run, state):
        raise RuntimeError("my end hook broke")


class BrokenBar:
    def __init__(self, **kwargs):
        self.n = 0

    def update(self, n):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass

    def write(self, text):
        pass

    def close(self):
        raise OSError("the terminal went away")


@pytest.mark.parametrize("breaks", ["end hook", "progress close"])
def test_a_raising_end_hook_or_display_still_saves_the_final_checkpoint(data, tmp_path, breaks):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit().checkpoint(tmp_path / "ck", every=4)
    kwargs = {"hooks": [RaisesAtEnd()]} if breaks == "end hook" else {"progress": BrokenBar}
    error = RuntimeError if breaks == "end hook" else OSError
    with pytest.raises(error):
        trainer.fit(start(trainer, data), data, steps=15, batch_size=BATCH, **({"progress": False} | kwargs))
    steps = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert steps[-1] == 15, steps  # the final save ran although the user's code raised first
    assert not [p for p in (tmp_path / "ck").iterdir() if "tmp" in p.name]


def test_the_first_callback_error_is_raised_and_later_ones_are_noted(data):
    class AlsoRaises:
        @jaxpipe.hookimpl
        def jaxpipe_fit_end(self, run, state):
            raise ValueError("second")

    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    with pytest.raises((RuntimeError, ValueError)) as caught:
        trainer.fit(start(trainer, data), data, batch_size=BATCH, progress=False, hooks=[RaisesAtEnd(), AlsoRaises()])
    notes = "".join(getattr(caught.value, "__notes__", []))
    assert "also raised at the end of fit" in notes


def vector_metric_loss(params, batch):
    loss = linear_loss(params, batch)
    per_class = jnp.stack([loss, jnp.where(params["w"][0] > 0.3, jnp.nan, 1.0), 2.0])
    return loss, {"per_class": per_class}


@pytest.mark.parametrize("jit", [True, False])
def test_a_nan_in_any_element_of_a_vector_metric_stops_the_run(data, jit):
    step = Pipeline(vector_metric_loss).optimize(optax.sgd(0.05))
    trainer = step.jit() if jit else step
    with pytest.raises(NonFiniteError, match=r"per_class=nan") as caught:
        trainer.fit(start(trainer, data), data, epochs=20, batch_size=BATCH, progress=False)
    kept = int(caught.value.state.step)  # the metric reads the step's input: it is NaN once w[0] > 0.3
    assert float(caught.value.state.params["w"][0]) > 0.3 and caught.value.step == kept + 1
    before = by_hand(step.jit(), start(trainer, data), data, kept - 1)
    assert float(before.params["w"][0]) <= 0.3  # so the step before it was finite, and trained on


DIVERGES = 12


def test_host_mode_scan_stops_where_it_says_and_keeps_no_rows_after(data):
    """A pipeline called as built runs .scan(5)'s steps as one: the state goes back to the call's start."""
    eager = Pipeline(linear_loss).optimize(optax.sgd(30.0)).scan(5)  # no .jit(): called as built
    history = jaxpipe.History()
    with pytest.warns(RuntimeWarning, match=r"at step \d+ .*before the call that held it \(step (\d+)") as caught:
        final = eager.fit(
            start(eager, data), data, epochs=10, batch_size=BATCH, progress=False, on_nonfinite="stop", hooks=[history]
        )
    said = int(__import__("re").search(r"\(step (\d+):", str(caught[0].message)).group(1))
    assert int(final.step) == said and said % 4 in (0, 1, 2, 3)
    assert all(row["step"] <= said for row in history.steps)
    assert all(math.isfinite(row["loss"]) for row in history.steps)
    with pytest.raises(NonFiniteError) as raised:
        eager.fit(start(eager, data), data, epochs=10, batch_size=BATCH, progress=False)
    assert int(raised.value.state.step) == said and f"(step {said}:" in str(raised.value)


def test_a_list_of_examples_is_batched_by_batch_size(data):
    records = [{"x": data["x"][i], "y": data["y"][i]} for i in range(N)]
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    final = trainer.fit(start(trainer, data), records, epochs=2, batch_size=BATCH, progress=False)
    assert int(final.step) == 2 * N // BATCH
    want = start(trainer, data)
    for _ in range(2):
        for i in range(0, N, BATCH):
            want, _ = trainer(want, {k: v[i : i + BATCH] for k, v in data.items()})
    np.testing.assert_array_equal(final.params["w"], want.params["w"])
    with pytest.raises(PipelineError, match=r"(?s)single examples.*batch_size=32"):
        trainer.fit(start(trainer, data), records, progress=False)


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        (None, r"`hooks` must be a list of hook objects, got NoneType"),
        ("abc", r"`hooks` must be a list of hook objects, got str"),
        ([jaxpipe.History], r"`hooks` holds the class History, not an object of it.\nPass History\(\)"),
    ],
)
def test_bad_hooks_are_named(data, hooks, message):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    with pytest.raises(PipelineError, match=message):
        trainer.fit(start(trainer, data), data, batch_size=BATCH, progress=False, hooks=hooks)


def test_a_progress_factory_returning_none_is_named(data):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    with pytest.raises(PipelineError, match=r"`progress` returned a NoneType without update, close"):
        trainer.fit(start(trainer, data), data, batch_size=BATCH, progress=lambda **kw: None)


def test_a_huge_scan_for_a_short_run_stacks_only_the_run(data):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).scan(10**9).jit()
    final = trainer.fit(start(trainer, data), data, steps=3, batch_size=BATCH, progress=False)
    assert int(final.step) == 3


def test_a_run_hook_returning_the_wrong_kind_is_named(data):
    class BadResume:
        @jaxpipe.hookimpl
        def jaxpipe_fit_resume(self, run, state):
            return {"step": 3}

    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    with pytest.raises(
        PipelineError, match=r"`jaxpipe_fit_resume` of .*BadResume.* returned a dict, not a jaxpipe.TrainState"
    ):
        trainer.fit(start(trainer, data), data, batch_size=BATCH, progress=False, hooks=[BadResume()])


@pytest.mark.parametrize(
    ("hook", "source", "result"),
    [
        ("jaxpipe_fit_resume", "return {'step': 1}", "a dict"),
        ("jaxpipe_place_state", "return 'placed'", "a str"),
        ("jaxpipe_fit_progress", "return 7", "a int without update, close"),
        ("jaxpipe_batch_shards", "return -3", "-3, not a positive int"),
    ],
)
def test_an_installed_plugin_returning_the_wrong_kind_is_isolated(install, data, hook, source, result):
    args = {
        "jaxpipe_fit_resume": "run, state",
        "jaxpipe_place_state": "pipeline, state",
        "jaxpipe_fit_progress": "run",
        "jaxpipe_batch_shards": "run",
    }[hook]
    install("wrongkind", f"import jaxpipe\n\n@jaxpipe.hookimpl\ndef {hook}({args}):\n    {source}\n")
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    with pytest.warns(jaxpipe.PluginWarning, match=rf"'wrongkind' returned {result}"):
        final = trainer.fit(start(trainer, data), data, epochs=2, batch_size=BATCH, progress=True)
        want = by_hand(trainer, start(trainer, data), data, 8)  # init asks the plugin too, and ignores it too
    np.testing.assert_array_equal(final.params["w"], want.params["w"])


# --- issue 17: steps=, evaluation anywhere, early stopping -------------------------------------------------


def test_steps_trains_that_many_steps_across_epochs_in_order(data):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    final = trainer.fit(start(trainer, data), data, steps=10, batch_size=BATCH, progress=False)
    assert int(final.step) == 10
    np.testing.assert_array_equal(final.params["w"], by_hand(trainer, start(trainer, data), data, 10).params["w"])
    half = trainer.fit(start(trainer, data), data, steps=5, batch_size=BATCH, progress=False)
    resumed = trainer.fit(half, data, steps=10, batch_size=BATCH, progress=False)  # the run's total, as epochs
    np.testing.assert_array_equal(resumed.params["w"], final.params["w"])
    with pytest.raises(PipelineError, match="`epochs` or `steps`, not both"):
        trainer.fit(start(trainer, data), data, steps=5, epochs=1, batch_size=BATCH)


def test_steps_from_a_generator_stops_at_the_count(data):
    def forever():
        for i in itertools.count():
            j = (i * BATCH) % N
            yield {k: v[j : j + BATCH] for k, v in data.items()}

    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    final = trainer.fit(start(trainer, data), forever(), steps=7, progress=False)
    assert int(final.step) == 7


class EvalLoss:
    """A hand-written loss that says how it evaluates."""

    def __call__(self, params, batch, model_state=None):
        return linear_loss(params, batch)

    def train(self, params, batch, key, model_state):
        return linear_loss(params, batch), ({}, model_state)

    def evaluate(self, params, batch, model_state):
        return {"loss": linear_loss(params, batch), "w0": params["w"][0] * jnp.ones(())}


@pytest.mark.parametrize("eval_kind", ["arrays", "list", "function", "grain"])
def test_eval_every_n_steps_on_any_eval_data(data, eval_kind):
    trainer = Pipeline(EvalLoss()).optimize(optax.sgd(0.05)).jit()
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, N, BATCH)]
    eval_data = {
        "arrays": data,
        "list": batches,
        "function": lambda: iter(batches),
        "grain": pytest.importorskip("grain").MapDataset.source(batches) if eval_kind == "grain" else None,
    }[eval_kind]
    seen = []

    class Seen:
        @jaxpipe.hookimpl
        def jaxpipe_fit_evaluated(self, run, state, metrics):
            seen.append((run.step, metrics["eval_loss"], float(state.params["w"][0])))

    trainer.fit(
        start(trainer, data),
        data,
        steps=10,
        batch_size=BATCH,
        eval_data=eval_data,
        eval_every=3,
        progress=False,
        hooks=[Seen()],
    )
    assert [s for s, _, _ in seen] == [3, 6, 9, 10]
    for step, loss, _ in seen:
        state = trainer.fit(start(trainer, data), data, steps=step, batch_size=BATCH, progress=False)
        assert loss == pytest.approx(float(linear_loss(state.params, data)), rel=1e-5)


def test_evaluate_with_other_params_and_bad_arguments(data):
    trainer = Pipeline(EvalLoss()).optimize(optax.sgd(0.05)).jit()
    state = start(trainer, data)
    other = {"w": jnp.ones(3)}
    got = jaxpipe.evaluate(trainer, state, data, params=other)
    assert got["w0"] == 1.0 and got["loss"] == pytest.approx(float(linear_loss(other, data)), rel=1e-6)
    for bad, message in [
        ({"batch_size": 2.5}, r"`batch_size` must be a positive int or None, got float 2.5"),
        ({"batch_size": "8"}, r"got str '8'"),
        ({"batch_size": 0}, r"got 0"),
        ({"batch_size": -1}, r"got -1"),
    ]:
        with pytest.raises(PipelineError, match=message):
            jaxpipe.evaluate(trainer, state, data, **bad)
    with pytest.raises(PipelineError, match=r"`evaluate` needs `data` as a dict of arrays.*got NoneType"):
        jaxpipe.evaluate(trainer, state, None)
    with pytest.raises(PipelineError, match=r"`evaluate` needs `data` as a dict of arrays, got list of 2 arrays"):
        jaxpipe.evaluate(trainer, state, [data["x"], data["y"]])
    with pytest.raises(PipelineError, match=r"`evaluate` needs the training state as `state`, got NoneType"):
        jaxpipe.evaluate(trainer, None, data)


def test_early_stopping_ends_the_run_after_patience_evaluations(data):
    trainer = Pipeline(EvalLoss()).optimize(optax.sgd(30.0)).jit()  # diverges: the eval loss grows
    stopper = jaxpipe.EarlyStopping(monitor="eval_loss", patience=2)
    final = trainer.fit(
        start(trainer, data),
        data,
        epochs=30,
        batch_size=BATCH,
        eval_data=data,
        progress=False,
        hooks=[stopper],
        on_nonfinite="ignore",
    )
    assert stopper.stopped_at is not None and int(final.step) == stopper.stopped_at < 30 * N // BATCH
    assert stopper.best_step is not None and stopper.best_step < stopper.stopped_at
    with pytest.raises(PipelineError, match='`mode` must be "min" or "max"'):
        jaxpipe.EarlyStopping(mode="up")


# --- issue 18: steps per call by measurement -----------------------------------------------------------------


def test_a_loop_measured_slower_than_single_steps_keeps_one_step_per_call(data):
    """The decision, with the two measurements given (timings themselves are the benchmark's business)."""
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    fit_loop.MEASURED.clear()
    trainer.fit(start(trainer, data), data, epochs=3, batch_size=BATCH, progress=False)  # measures both
    key = next(iter(fit_loop.MEASURED.single))
    fit_loop.MEASURED.single[key], fit_loop.MEASURED.loop[key] = 1e-3, 5e-3  # as XLA:CPU's convolutions in a loop
    calls = []

    class Calls:
        accepts_calls = True

        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            calls.append(run.step)
            self.run = run

    hook = Calls()
    final = trainer.fit(start(trainer, data), data, epochs=3, batch_size=BATCH, progress=False, hooks=[hook])
    assert calls == list(range(1, 13)) and hook.run.per_call.startswith("1 step per call (auto): one step per call")
    np.testing.assert_array_equal(final.params["w"], by_hand(trainer, start(trainer, data), data, 12).params["w"])
    fit_loop.MEASURED.clear()


def test_steps_per_call_one_equals_a_loop_of_trainer_calls_to_the_bit(data):
    trainer = Pipeline(linear_loss).optimize(optax.adam(1e-2)).jit()
    final = trainer.fit(start(trainer, data), data, epochs=5, batch_size=BATCH, progress=False, steps_per_call=1)
    np.testing.assert_array_equal(final.params["w"], by_hand(trainer, start(trainer, data), data, 20).params["w"])


def test_as_batches_leaves_a_list_alone():
    assert as_batches([1, 2]) == [1, 2]
