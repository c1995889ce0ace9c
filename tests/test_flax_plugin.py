"""The Flax plugin's `.model(module, input=...)` stage: Linen and NNX, against hand-written Flax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpipe
from jaxpipe import Pipeline, PipelineError


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(4)(x)


class BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(4)(nn.relu(x))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(12, 8)).astype(np.float32), "label": rng.integers(0, 4, 12).astype(np.int32)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def sgd_trainer(batch):
    model = MLP()
    trainer = Pipeline(loss).model(model, input="image").optimize(optax.sgd(0.1)).jit()
    return model, trainer, trainer.init(jax.random.key(7), batch)


def test_init_is_module_init_with_the_params_key(sgd_trainer, batch):
    model, _, state = sgd_trainer
    params_key, _, _ = jax.random.split(jax.random.key(7), 3)
    assert_trees_equal(state.params, model.init(params_key, batch["image"], train=False)["params"])
    assert state.model_state == {}


def test_eval_loss_and_predictions_are_module_apply(batch):
    model = MLP()
    params = jax.jit(model.init)(jax.random.key(0), batch["image"])["params"]
    model_loss = Pipeline(loss).model(model, input="image").build()
    assert isinstance(model_loss, jaxpipe.TrainLoss)
    outputs = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, batch["image"])
    np.testing.assert_array_equal(jax.jit(model_loss.predict)(params, batch), outputs)
    np.testing.assert_allclose(jax.jit(model_loss)(params, batch), loss(outputs, batch), rtol=1e-6)
    grads = Pipeline(loss).model(model, input="image").grad().jit()(params, batch)
    expected = jax.jit(jax.grad(lambda p: loss(model.apply({"params": p}, batch["image"]), batch)))(params)
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_each_step_splits_a_fresh_dropout_key(batch):
    model = MLP()
    model_loss = Pipeline(loss).model(model, input="image").build()
    trainer = Pipeline(loss).model(model, input="image").optimize(optax.sgd(0.0)).jit()
    state = trainer.init(jax.random.key(0), batch)
    losses = []
    for _ in range(2):
        key, dropout_key = jax.random.split(state.key)
        expected, _ = jax.jit(model_loss.train)(state.params, batch, dropout_key, state.model_state)
        state, metrics = trainer(state, batch)
        np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
        assert jnp.array_equal(jax.random.key_data(state.key), jax.random.key_data(key))
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]  # same params (lr 0), a new dropout mask


def test_batch_norm_statistics_are_carried(batch):
    model, tx = BatchNormMLP(), optax.sgd(0.1)
    trainer = Pipeline(loss).model(model, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.split(jax.random.key(0), 3)[0], batch["image"], train=False
    )
    assert_trees_equal(state.model_state, {"batch_stats": variables["batch_stats"]})

    @jax.jit
    def hand_step(params, batch_stats, opt_state, batch):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
            )
            return loss(logits, batch), updates["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    for _ in range(2):
        state, _ = trainer(state, batch)
        params, stats, opt_state = hand_step(params, stats, opt_state, batch)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.model_state["batch_stats"], stats)
    assert not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)
    evaluated = jaxpipe.evaluate(trainer, state, batch)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, batch["image"]
    )
    np.testing.assert_allclose(evaluated["loss"], loss(logits, batch), rtol=1e-5)
    accuracy = np.mean(np.argmax(logits, -1) == batch["label"])
    np.testing.assert_allclose(evaluated["accuracy"], accuracy, rtol=1e-6)


def test_nnx_module_matches_the_functional_nnx_step(batch):
    module, tx = NnxMLP(nnx.Rngs(0)), optax.adam(1e-2)
    trainer = Pipeline(loss).model(module, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(1), batch)
    before = nnx.to_pure_dict(nnx.state(module, nnx.Param))

    # Flax's performance guide: split outside, merge inside the jitted step; dropout keys threaded in.
    graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    params, rng_state, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rng_state), nnx.to_pure_dict(rest)

    @jax.jit
    def hand_step(params, rest, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rng_state, rest)
            model.train()
            nnx.reseed(model, default=dropout_key)
            logits = model(batch["image"])
            return loss(logits, batch), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        (value, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, key, value

    assert_trees_equal(state.params, params)
    opt_state, key = tx.init(params), state.key
    for _ in range(3):
        state, metrics = trainer(state, batch)
        params, rest, opt_state, key, value = hand_step(params, rest, opt_state, key, batch)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.model_state, rest)
    assert_trees_equal(nnx.to_pure_dict(nnx.state(module, nnx.Param)), before)  # the user's module is untouched
    evaluated = jaxpipe.evaluate(trainer, state, batch)

    @jax.jit
    def eval_loss(params, rest, batch):
        model = nnx.merge(graphdef, params, rng_state, rest)
        model.eval()
        return loss(model(batch["image"]), batch)

    np.testing.assert_allclose(evaluated["loss"], eval_loss(params, rest, batch), rtol=1e-5)


class Flagged(nn.Module):
    """Returns 1 in training mode and 0 in evaluation mode, whatever its flag is called."""

    flag: str

    @nn.compact
    def __call__(self, x, **flags):
        bias = self.param("bias", nn.initializers.zeros, ())
        training = flags[self.flag] if self.flag != "deterministic" else not flags[self.flag]
        return jnp.full(x.shape[:1], float(training)) + bias


@pytest.mark.parametrize("flag", ["train", "training", "deterministic"])
def test_train_flag_is_set_per_mode(flag, batch, monkeypatch):
    import jaxpipe_flax._model as model_module

    module = Flagged(flag)
    monkeypatch.setattr(model_module, "_mode_flags", lambda m: (flag,))  # **flags hides the name from inspect
    model_loss = Pipeline(lambda out, batch: out.sum(), name="total").model(module, input="image").build()
    params = {"bias": jnp.zeros(())}
    assert float(model_loss(params, batch)) == 0.0
    value, _ = model_loss.train(params, batch, jax.random.key(0), {})
    assert float(value) == 12.0


def test_train_flag_is_read_from_the_signature():
    from jaxpipe_flax._model import _mode_flags

    assert _mode_flags(MLP()) == ("train",)
    assert _mode_flags(NnxMLP(nnx.Rngs(0))) == ()

    class Deterministic(nn.Module):
        def __call__(self, x, *, deterministic: bool):
            return x

    assert _mode_flags(Deterministic()) == ("deterministic",)


def test_input_tuple_and_whole_batch():
    class Pair(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            return nn.Dense(2)(a) * b[:, None]

    class WholeBatch(nn.Module):
        @nn.compact
        def __call__(self, batch):
            return nn.Dense(2)(batch["a"])

    batch = {"a": np.ones((3, 4), np.float32), "b": np.arange(3, dtype=np.float32)}
    square = Pipeline(lambda out, batch: jnp.mean(out**2), name="square")
    pair = square.model(Pair(), input=("a", "b")).optimize(optax.sgd(0.1)).jit()
    state = pair.init(jax.random.key(0), batch)
    expected = jax.jit(lambda p, a, b: jnp.mean(Pair().apply({"params": p}, a, b) ** 2))
    _, metrics = pair(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected(state.params, batch["a"], batch["b"]), rtol=1e-6)
    whole = square.model(WholeBatch()).optimize(optax.sgd(0.1)).jit()
    state = whole.init(jax.random.key(0), batch)
    assert set(state.params) == {"Dense_0"}


def test_custom_rng_stream(batch):
    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            noise = jax.random.normal(self.make_rng("noise"), x.shape) if train else 0.0
            return nn.Dense(4)(x + noise)

    trainer = Pipeline(loss).model(Noisy(), input="image", rng_names=("noise",)).optimize(optax.sgd(0.0)).jit()
    state = trainer.init(jax.random.key(0), batch)
    state, first = trainer(state, batch)
    _, second = trainer(state, batch)
    assert float(first["loss"]) != float(second["loss"])


def test_missing_input_key_is_a_pipeline_error(sgd_trainer, batch):
    trainer = Pipeline(loss).model(MLP(), input="pixels").optimize(optax.sgd(0.1)).jit()
    with pytest.raises(PipelineError, match=r"no key 'pixels'; its keys are \['image', 'label'\]") as info:
        trainer.init(jax.random.key(0), batch)
    assert (info.value.stage, info.value.stage_name) == (1, "model")
    _, good, state = sgd_trainer
    with pytest.raises(PipelineError, match=r"stage 1 \(model\)[\s\S]*no key 'image'; its keys are \['label', 'x'\]"):
        good(state, {"x": batch["image"], "label": batch["label"]})


def test_wrong_shapes_and_keys_are_pipeline_errors(sgd_trainer, batch):
    _, trainer, state = sgd_trainer
    narrow = {"image": batch["image"][:, :5], "label": batch["label"]}
    with pytest.raises(PipelineError, match=r"rejected inputs of shape \(12, 5\) float32[\s\S]*sample batch"):
        trainer(state, narrow)
    with pytest.raises(PipelineError, match=r"`loss` reads batch\['label'\], but the batch has keys \['image'\]"):
        trainer(state, {"image": batch["image"]})
    with pytest.raises(PipelineError, match="a batch must be a dict of arrays, got tuple"):
        trainer(state, (batch["image"], batch["label"]))


def test_non_scalar_loss_names_the_model_stage(batch):
    def per_example(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    trainer = Pipeline(per_example).model(MLP(), input="image").optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match=r"`per_example` must return one number.*\(12,\)") as info:
        trainer(state, batch)
    assert info.value.stage == 1


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        (MLP, {"input": "image"}, r"needs a module instance, got the class MLP"),
        (lambda x: x, {"input": "image"}, r"needs a Flax module"),
        (MLP(), {"input": 3}, r"`input` names the batch key\(s\)"),
        (MLP(), {"input": "image", "rng_names": "dropout"}, r"`rng_names` must be a tuple"),
    ],
)
def test_bad_options_fail_when_added(module, options, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline(loss).model(module, **options)


def test_loss_must_take_outputs_and_batch():
    def one_argument(logits):
        return logits.sum()

    with pytest.raises(PipelineError, match=r"calls `one_argument\(outputs, batch\)`"):
        Pipeline(one_argument).model(MLP(), input="image")


def test_explain_shows_apply_with_the_train_flag():
    text = Pipeline(loss).model(MLP(), input="image").explain()
    assert "model = MLP(...)" in text
    assert "model.apply(" in text and "batch['image'], train=True" in text
    assert "rngs={'dropout': dropout_key}, mutable=list(model_state)" in text
    assert text.endswith("model_loss")
    nnx_text = Pipeline(loss).model(NnxMLP(nnx.Rngs(0)), input="image").explain()
    assert "nnx.merge(graphdef, params, rng_state, model_state)" in nnx_text
    assert "nnx.reseed(model, default=dropout_key)" in nnx_text


def test_param_summary_of_trained_params(sgd_trainer, batch):
    _, trainer, state = sgd_trainer
    state, _ = trainer(state, batch)
    summary = jaxpipe.param_summary(state.params)
    assert summary.count == 8 * 16 + 16 + 16 * 4 + 4
    assert [row[0] for row in summary.rows] == ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
    assert ("Dense_0/kernel", (8, 16), "float32", 128) in summary.rows
    assert str(summary).splitlines()[-1] == "total: 212 parameters in 4 arrays, 848 B"
