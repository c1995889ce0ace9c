"""The Optax plugin's `.optimize(tx)` stage against the hand-written Flax + Optax step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError, TrainState


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(10)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 100)


def chain():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(SCHEDULE))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(16, 8)).astype(np.float32), "label": rng.integers(0, 10, 16).astype(np.int32)}


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float32)}


def hand_written_step(model, tx):
    """The step a Flax + Optax tutorial writes, on jaxpipe's TrainState."""

    def train_step(state, batch):
        key, dropout_key = jax.random.split(state.key)

        def loss_fn(params):
            logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key})
            return loss(logits, batch)

        value, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), metrics

    return jax.jit(train_step)


def _host(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(_host(x), _host(y))


@pytest.fixture(scope="module")
def contract(batch):
    """The issue's trainer: a Linen model, clipping and AdamW with warmup and cosine decay, jit."""
    model, tx = MLP(), chain()
    trainer = Pipeline(loss).model(model, input="image").optimize(tx, metrics=("grad_norm", "learning_rate")).jit()
    return model, tx, trainer, trainer.init(jax.random.key(0), batch)


def test_step_is_the_hand_written_step(contract, batch):
    model, tx, trainer, state = contract
    hand = hand_written_step(model, tx)
    assert trainer.hlo(state, batch) == hand.lower(state, batch).as_text()
    ours, theirs = state, state
    for _ in range(3):
        ours, our_metrics = trainer(ours, batch)
        theirs, their_metrics = hand(theirs, batch)
        assert_trees_equal(our_metrics, their_metrics)
    assert_trees_equal(ours, theirs)
    assert int(ours.step) == 3
    assert set(our_metrics) == {"loss", "grad_norm"}


def test_plain_loss_without_model(regression):
    tx = optax.sgd(0.1)
    trainer = Pipeline(linear_loss).optimize(tx, metrics=("grad_norm",)).jit()
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = trainer.init(jax.random.key(0), regression, params=params)
    new, metrics = trainer(state, regression)

    @jax.jit
    def train_step(params, opt_state, batch):
        value, grads = jax.value_and_grad(linear_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {"loss": value, "grad_norm": optax.tree.norm(grads)}

    hand_params, hand_metrics = train_step(params, tx.init(params), regression)
    assert_trees_equal(new.params, hand_params)
    assert_trees_equal(metrics, hand_metrics)
    assert jnp.array_equal(jax.random.key_data(new.key), jax.random.key_data(state.key))  # no dropout, no split


def test_aux_metrics_are_carried(regression):
    def loss_with_metrics(params, batch):
        errors = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return jnp.mean(errors**2), {"max_error": jnp.max(jnp.abs(errors))}

    trainer = Pipeline(loss_with_metrics).optimize(optax.sgd(0.1), metrics=("grad_norm",)).jit()
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    state = trainer.init(jax.random.key(0), regression, params=params)
    _, metrics = trainer(state, regression)
    expected = jnp.max(jnp.abs(regression["x"] @ params["w"] - regression["y"]))
    np.testing.assert_allclose(metrics["max_error"], expected, rtol=1e-6)
    assert set(metrics) == {"loss", "grad_norm", "max_error"}


def test_learning_rate_from_inject_hyperparams(regression):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE))
    trainer = Pipeline(linear_loss).optimize(tx).jit()
    state = trainer.init(jax.random.key(0), regression, params={"w": jnp.zeros(3), "b": jnp.zeros(())})
    for step in range(3):
        state, metrics = trainer(state, regression)
        np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(step), rtol=1e-6)


def test_learning_rate_option_reports_the_schedule(regression):
    trainer = Pipeline(linear_loss).optimize(chain(), learning_rate=SCHEDULE).jit()
    state = trainer.init(jax.random.key(0), regression, params={"w": jnp.zeros(3), "b": jnp.zeros(())})
    rates = []
    for _ in range(3):
        state, metrics = trainer(state, regression)
        rates.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(rates, [SCHEDULE(0), SCHEDULE(1), SCHEDULE(2)], rtol=1e-6)
    assert rates[0] == 0.0 and rates[2] > rates[1] > 0.0


def test_multisteps_accumulates_like_hand_written(regression):
    tx = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
    trainer = Pipeline(linear_loss).optimize(tx).jit()
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = trainer.init(jax.random.key(0), regression, params=params)
    halves = [{k: v[:16] for k, v in regression.items()}, {k: v[16:] for k, v in regression.items()}]

    @jax.jit
    def hand_step(params, opt_state, batch):
        updates, opt_state = tx.update(jax.grad(linear_loss)(params, batch), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    hand_params, opt_state = params, tx.init(params)
    for step in range(4):
        state, _ = trainer(state, halves[step % 2])
        hand_params, opt_state = hand_step(hand_params, opt_state, halves[step % 2])
        if step == 0:  # the first mini-step only accumulates
            assert_trees_equal(state.params, params)
    for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(hand_params), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state.params["w"], 0.0)


def test_legacy_prng_key(batch):
    model, tx = MLP(), optax.sgd(0.1)
    trainer = Pipeline(loss).model(model, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.PRNGKey(0), batch)
    assert state.key.dtype == jnp.uint32
    new, _ = trainer(state, batch)
    theirs, _ = hand_written_step(model, tx)(state, batch)
    assert_trees_equal(new, theirs)


def test_evaluate_plain_loss(regression):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.1)).jit()
    params = {"w": jnp.ones(3), "b": jnp.ones(())}
    state = trainer.init(jax.random.key(0), regression, params=params)
    result = jaxpipe.evaluate(trainer, state, regression, batch_size=8)
    np.testing.assert_allclose(result["loss"], linear_loss(params, regression), rtol=1e-5)


def test_non_scalar_loss_is_a_pipeline_error(regression):
    def per_example(params, batch):
        return (batch["x"] @ params["w"] - batch["y"]) ** 2

    trainer = Pipeline(per_example).optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), regression, params={"w": jnp.zeros(3)})
    with pytest.raises(PipelineError, match=r"must return one number.*shape \(32,\)[\s\S]*mean") as info:
        trainer(state, regression)
    assert info.value.stage == 1 and info.value.stage_name == "optimize"


def test_metrics_must_be_a_dict(regression):
    trainer = Pipeline(lambda p, b: (linear_loss(p, b), 3.0)).optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), regression, params={"w": jnp.zeros(3), "b": jnp.zeros(())})
    with pytest.raises(PipelineError, match="second item should be a dict of metrics"):
        trainer(state, regression)


def test_not_a_transformation():
    with pytest.raises(PipelineError, match=r"needs an Optax transformation[\s\S]*optax.adam\(1e-3\)") as info:
        Pipeline(loss).optimize(optax.adam)
    assert info.value.stage == 1


def test_bad_learning_rate_option():
    with pytest.raises(PipelineError, match="`learning_rate` is what the step reports"):
        Pipeline(loss).optimize(optax.adam(1e-3), learning_rate="fast")


def test_needs_parameters(regression):
    with pytest.raises(PipelineError, match=r"needs parameters to optimize[\s\S]*params=params") as info:
        Pipeline(linear_loss).optimize(optax.sgd(0.1)).init(jax.random.key(0), regression)
    assert info.value.stage == 1


def test_state_must_be_a_train_state(regression):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.1)).jit()
    with pytest.raises(PipelineError, match="takes the TrainState from `init`"):
        trainer({"w": jnp.zeros(3)}, regression)


def test_explain_is_the_training_step():
    trainer = Pipeline(loss).model(MLP(), input="image").optimize(chain(), learning_rate=SCHEDULE).jit()
    text = trainer.explain()
    assert "def model_loss(params, batch, dropout_key, model_state):" in text
    assert "key, dropout_key = jax.random.split(state.key)" in text
    assert "jax.value_and_grad(model_loss, has_aux=True)" in text
    assert "updates, opt_state = tx.update(grads, state.opt_state, state.params)" in text
    assert "params = optax.apply_updates(state.params, updates)" in text
    assert 'metrics["learning_rate"] = schedule(state.step)' in text
    assert text.endswith("jax.jit(train_step)")
    plain = Pipeline(linear_loss).optimize(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)).explain()
    assert "value, grads = jax.value_and_grad(linear_loss)(state.params, batch)" in plain
    assert 'optax.tree_utils.tree_get(opt_state, "learning_rate")' in plain
    assert "dropout_key" not in plain


def test_train_state_is_a_pytree_with_replace(contract):
    state = contract[3]
    assert isinstance(state, TrainState)
    names = {str(path[0]) for path, _ in jax.tree_util.tree_leaves_with_path(state)}
    assert {".step", ".params", ".opt_state", ".key", ".data_key"} <= names
    assert state.replace(step=jnp.asarray(5)).step == 5 and state.step == 0
