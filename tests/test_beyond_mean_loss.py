"""Training code that strays from "mean loss of a supervised model", each against its hand-written step.

Flax's NNX MNIST CNN (``__call__(self, x, rngs)``), an L2 penalty in the loss as in Flax's imagenet example,
own per-step key schemes, and Optax's DP-SGD example with per-example gradients.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.example_libraries import stax

import jaxpipe
from jaxpipe import Pipeline, PipelineError


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def mnist():
    rng = np.random.default_rng(0)
    return {"image": rng.random((8, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return {"image": rng.normal(size=(12, 8)).astype(np.float32), "label": rng.integers(0, 4, 12).astype(np.int32)}


# --- Flax's NNX MNIST CNN (examples/mnist/train.py), unchanged in behaviour -------------------------------


class CNN(nnx.Module):
    """A simple CNN model."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        x = self.linear2(x)
        return x


def test_flax_nnx_mnist_cnn_matches_the_functional_nnx_step(mnist):
    module, tx = CNN(rngs=nnx.Rngs(0)), optax.sgd(0.1, 0.9)  # the example's model and optimizer
    trainer = Pipeline(loss).model(module, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), mnist)
    before = nnx.to_pure_dict(nnx.state(module, nnx.Param))

    # Flax's performance guide: split outside the step, merge inside; the step's dropout key into nnx.Rngs.
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    @jax.jit
    def hand_step(params, rest, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            model.train()
            logits = model(batch["image"], nnx.Rngs(dropout_key))
            return loss(logits, batch), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        (value, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, key, value

    assert_trees_equal(state.params, params)
    opt_state, key = tx.init(params), state.key
    for _ in range(3):
        state, metrics = trainer(state, mnist)
        params, rest, opt_state, key, value = hand_step(params, rest, opt_state, key, mnist)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.model_state, rest)
    assert_trees_equal(state.key, key)
    assert_trees_equal(nnx.to_pure_dict(nnx.state(module, nnx.Param)), before)  # the user's module is untouched

    # evaluation runs the model as the example's eval_step does: model.eval(), model(x, None)
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    logits = model(mnist["image"], None)
    evaluated = jaxpipe.evaluate(trainer, state, mnist)
    np.testing.assert_allclose(evaluated["loss"], loss(logits, mnist), rtol=1e-5)
    np.testing.assert_allclose(evaluated["accuracy"], np.mean(np.argmax(logits, -1) == mnist["label"]))


def test_a_call_signature_the_stage_cannot_serve_fails_when_added():
    class TwoInputs(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x, mask, rngs):
            return self.linear(x * mask)

    with pytest.raises(PipelineError, match=r"calls `TwoInputs.__call__\(batch\['image'\], rngs=...\)`[\s\S]*input="):
        Pipeline(loss).model(TwoInputs(nnx.Rngs(0)), input="image")
    Pipeline(loss).model(TwoInputs(nnx.Rngs(0)), input=("image", "mask"))  # each argument named: accepted


# --- the loss sees the parameters, the step and the model state -------------------------------------------


class ResNetBlock(nn.Module):
    """A tiny Linen network in the shape of Flax's imagenet ResNet: BatchNorm, then Dropout."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


WEIGHT_DECAY = 1e-4


def l2_loss(logits, batch, *, params):
    """Flax's imagenet example: cross-entropy plus weight_decay / 2 times the squared kernels (ndim > 1)."""
    weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
    return loss(logits, batch) + WEIGHT_DECAY * 0.5 * weight_l2


def test_l2_penalty_in_the_loss_matches_the_imagenet_style_step(batch):
    model, tx = ResNetBlock(), optax.sgd(0.1, 0.9, nesterov=True)
    trainer = Pipeline(l2_loss).model(model, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)

    @jax.jit
    def hand_step(params, batch_stats, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            logits, new_model_state = model.apply(
                {"params": params, "batch_stats": batch_stats},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
            return loss(logits, batch) + WEIGHT_DECAY * 0.5 * weight_l2, new_model_state

        (value, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_model_state["batch_stats"], opt_state, key, value

    params, stats, opt_state, key = state.params, state.model_state["batch_stats"], tx.init(state.params), state.key
    for _ in range(3):
        state, metrics = trainer(state, batch)
        params, stats, opt_state, key, value = hand_step(params, stats, opt_state, key, batch)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.model_state["batch_stats"], stats)


def test_loss_gets_only_the_keywords_it_names(batch):
    seen = {}

    def warmup_loss(logits, batch, *, step, model_state):
        seen.update(step=step, model_state=model_state)
        return loss(logits, batch) * jnp.minimum(1.0, (step + 1) / 2)

    model, tx = ResNetBlock(), optax.sgd(0.1)
    trainer = Pipeline(warmup_loss).model(model, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    plain = Pipeline(loss).model(model, input="image").optimize(tx).jit()
    plain_state = plain.init(jax.random.key(0), batch)
    state, first = trainer(state, batch)
    _, plain_first = plain(plain_state, batch)
    np.testing.assert_array_equal(first["loss"], plain_first["loss"] * 0.5)  # step 0: half weight
    assert set(seen["model_state"]) == {"batch_stats"}
    _, second = trainer(state, batch)
    _, plain_second = plain(state, batch)
    np.testing.assert_array_equal(second["loss"], plain_second["loss"])  # step 1: full weight
    assert np.isfinite(jaxpipe.evaluate(trainer, state, batch)["loss"])  # evaluation passes state.step


def test_a_loss_keyword_outside_the_list_fails_when_added():
    def weird(logits, batch, *, temperature):
        return logits.sum()

    with pytest.raises(PipelineError, match=r"may also name keyword parameters params, step, model_state"):
        Pipeline(weird).model(ResNetBlock(), input="image")


# --- per-step keys ----------------------------------------------------------------------------------------


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(4)(x)


class NoisyMLP(nn.Module):
    """Two named streams, as in a Linen model with `rngs={"dropout": ..., "noise": ...}`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        if train:
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(4)(x)


def _linen_hand_step(model, tx, keys):
    """The hand-written Linen step with the key scheme ``keys(key, step) -> (key, rngs dict)``."""

    @jax.jit
    def hand_step(params, opt_state, key, step, batch):
        key, rngs = keys(key, step)

        def loss_fn(params):
            return loss(model.apply({"params": params}, batch["image"], train=True, rngs=rngs), batch)

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    return hand_step


def two_streams(key, step):
    del step  # split-based, like the default
    key, dropout, noise = jax.random.split(key, 3)
    return key, {"dropout": dropout, "noise": noise}


@pytest.mark.parametrize(
    ("module", "rng", "keys"),
    [
        (DropoutMLP(), "split", lambda k, s: (jax.random.split(k)[0], {"dropout": jax.random.split(k)[1]})),
        (DropoutMLP(), "fold_in", lambda k, s: (k, {"dropout": jax.random.fold_in(k, s)})),
        (NoisyMLP(), two_streams, two_streams),
    ],
    ids=["split", "fold_in", "named-streams"],
)
def test_each_linen_key_scheme_matches_its_hand_written_step(batch, module, rng, keys):
    tx = optax.adam(1e-2)
    trainer = Pipeline(loss).model(module, input="image", rng=rng).optimize(tx).jit()
    state = trainer.init(jax.random.key(3), batch)
    hand_step = _linen_hand_step(module, tx, keys)
    params, opt_state, key = state.params, tx.init(state.params), state.key
    for step in range(3):
        state, metrics = trainer(state, batch)
        params, opt_state, key, value = hand_step(params, opt_state, key, step, batch)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.key, key)


class NnxNoisy(nnx.Module):
    """An NNX model with its own `dropout` and `noise` streams."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(8, 4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.noise = rngs.noise.fork()

    def __call__(self, x):
        x = x + 0.1 * jax.random.normal(self.noise(), x.shape)
        return self.linear(self.dropout(x))


def test_nnx_named_streams_from_an_rng_function(batch):
    module, tx = NnxNoisy(nnx.Rngs(params=0, dropout=1, noise=2)), optax.sgd(0.1)
    trainer = Pipeline(loss).model(module, input="image", rng=two_streams).optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    params, rng_state, rest = (nnx.to_pure_dict(s) for s in (params, rng_state, rest))

    @jax.jit
    def hand_step(params, opt_state, key, batch):
        key, keys = two_streams(key, None)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rng_state, rest)
            model.train()
            nnx.reseed(model, dropout=keys["dropout"], noise=keys["noise"])
            return loss(model(batch["image"]), batch)

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    opt_state, key = tx.init(params), state.key
    for _ in range(3):
        state, metrics = trainer(state, batch)
        params, opt_state, key, value = hand_step(params, opt_state, key, batch)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.key, key)


class Deterministic(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


@pytest.mark.parametrize("module", [Deterministic(), nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))])
def test_a_model_that_draws_no_random_numbers_gets_no_split(batch, module):
    tx = optax.sgd(0.1)
    trainer = Pipeline(loss).model(module, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    program = str(jax.make_jaxpr(trainer)(state, batch))
    assert "random_split" not in program and "random_bits" not in program and "threefry" not in program
    first_key = state.key
    for _ in range(2):
        state, _ = trainer(state, batch)
    assert_trees_equal(state.key, first_key)  # the key is left as it is

    dropout = Pipeline(loss).model(DropoutMLP(), input="image").optimize(tx).jit()
    dropout_state = dropout.init(jax.random.key(0), batch)
    assert "random_split" in str(jax.make_jaxpr(dropout)(dropout_state, batch))
    next_state, _ = dropout(dropout_state, batch)
    assert_trees_equal(next_state.key, jax.random.split(dropout_state.key)[0])  # a model that draws: split


def test_bad_rng_option_fails_when_added():
    with pytest.raises(PipelineError, match=r"`rng` is how each step gets the model's keys"):
        Pipeline(loss).model(DropoutMLP(), input="image", rng="counter")


# --- per-example gradients: Optax's DP-SGD example --------------------------------------------------------

init_random_params, predict = stax.serial(
    stax.Conv(16, (8, 8), padding="SAME", strides=(2, 2)),
    stax.Relu,
    stax.MaxPool((2, 2), (1, 1)),
    stax.Conv(32, (4, 4), padding="VALID", strides=(2, 2)),
    stax.Relu,
    stax.MaxPool((2, 2), (1, 1)),
    stax.Flatten,
    stax.Dense(32),
    stax.Relu,
    stax.Dense(10),
)


def dp_loss(params, batch):
    images, labels = batch
    logits = predict(params, images)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dpsgd():
    return optax.contrib.dpsgd(learning_rate=0.25, l2_norm_clip=1.5, noise_multiplier=1.3, seed=1337)


@pytest.fixture(scope="module")
def dp_batch(mnist):
    return mnist["image"], mnist["label"]


def test_per_example_gradients_reproduce_optax_dpsgd_example(dp_batch):
    _, params = init_random_params(jax.random.PRNGKey(1337), (-1, 28, 28, 1))
    tx = dpsgd()
    trainer = Pipeline(dp_loss).optimize(tx, per_example=True, metrics=("grad_norm",)).jit()
    state = trainer.init(jax.random.key(0), dp_batch, params=params)

    @jax.jit
    def train_step(params, opt_state, batch):  # the example's step, DPSGD = True
        grad_fn = jax.grad(dp_loss)
        batch = jax.tree.map(lambda x: x[:, None], batch)
        grad_fn = jax.vmap(grad_fn, in_axes=(None, 0))
        grads = grad_fn(params, batch)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    opt_state = tx.init(params)
    for _ in range(3):
        state, metrics = trainer(state, dp_batch)
        params, opt_state = train_step(params, opt_state, dp_batch)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.opt_state, opt_state)
    assert metrics["loss"].shape == () and np.isfinite(metrics["grad_norm"])


def test_per_example_with_a_model_stage(batch):
    model, tx = DropoutMLP(), optax.contrib.dpsgd(0.1, 1.0, 0.5, seed=0)
    trainer = Pipeline(loss).model(model, input="image").optimize(tx, per_example=True).jit()
    state = trainer.init(jax.random.key(0), batch)

    @jax.jit
    def hand_step(params, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params, example, key):
            return loss(model.apply({"params": params}, example["image"], train=True, rngs={"dropout": key}), example)

        examples = jax.tree.map(lambda x: x[:, None], batch)
        keys = jax.random.split(dropout_key, len(batch["label"]))
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, examples, keys)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    params, opt_state, key = state.params, tx.init(state.params), state.key
    for _ in range(2):
        state, _ = trainer(state, batch)
        params, opt_state, key = hand_step(params, opt_state, key, batch)
    assert_trees_equal(state.params, params)


def test_dpsgd_without_per_example_is_explained(dp_batch):
    _, params = init_random_params(jax.random.PRNGKey(1337), (-1, 28, 28, 1))
    trainer = Pipeline(dp_loss).optimize(dpsgd()).jit()
    state = trainer.init(jax.random.key(0), dp_batch, params=params)
    with pytest.raises(PipelineError, match=r"expects per-example gradients[\s\S]*per_example=True") as info:
        trainer(state, dp_batch)
    assert isinstance(info.value.__cause__, ValueError)


def test_mean_gradient_transformation_with_per_example_is_explained(batch):
    trainer = Pipeline(loss).model(Deterministic(), input="image").optimize(optax.adam(1e-3), per_example=True).jit()
    state = trainer.init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match=r"treats the per-example gradients as one mean[\s\S]*Drop per_example"):
        trainer(state, batch)


def test_per_example_refuses_batch_statistics(batch):
    trainer = Pipeline(loss).model(ResNetBlock(), input="image").optimize(dpsgd(), per_example=True).jit()
    state = trainer.init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match=r"\['batch_stats'\] \(BatchNorm statistics\)[\s\S]*GroupNorm"):
        trainer(state, batch)


# --- init: a hand-written step, bad keys and empty sample batches ------------------------------------------


def test_init_builds_the_state_for_a_hand_written_step(dp_batch):
    _, params = init_random_params(jax.random.PRNGKey(1337), (-1, 28, 28, 1))
    tx = optax.sgd(0.1)

    def train_step(state, batch):
        grads = jax.grad(dp_loss)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        ), {}

    trainer = Pipeline(train_step).jit()
    state = trainer.init(jax.random.key(0), dp_batch, params=params).replace(opt_state=tx.init(params))
    state, _ = trainer(state, dp_batch)
    expected = jax.jit(lambda p, b: optax.apply_updates(p, tx.update(jax.grad(dp_loss)(p, b), tx.init(p))[0]))(
        params, dp_batch
    )
    assert int(state.step) == 1
    assert_trees_equal(state.params, expected)


@pytest.mark.parametrize("key", [0, 1.5, np.zeros(3, np.uint32), "seed"])
def test_init_with_something_else_than_a_key(batch, key):
    trainer = Pipeline(loss).model(Deterministic(), input="image").optimize(optax.sgd(0.1))
    with pytest.raises(PipelineError, match=r"takes one PRNG key[\s\S]*trainer.init\(jax.random.key\(0\)"):
        trainer.init(key, batch)


def test_init_accepts_a_legacy_prng_key(batch):
    trainer = Pipeline(loss).model(Deterministic(), input="image").optimize(optax.sgd(0.1))
    legacy = trainer.init(jax.random.PRNGKey(0), batch)
    typed = trainer.init(jax.random.key(0), batch)
    assert_trees_equal(legacy.params, typed.params)


@pytest.mark.parametrize("sample", [{}, None, [], {"image": np.zeros((0, 8), np.float32), "label": np.zeros(0)}])
def test_init_with_an_empty_sample_batch(sample):
    trainer = Pipeline(loss).model(Deterministic(), input="image").optimize(optax.sgd(0.1))
    with pytest.raises(PipelineError, match=r"needs a sample batch[\s\S]*\{'image': x\[:8\], 'label': y\[:8\]\}"):
        trainer.init(jax.random.key(0), sample)


# --- the README's "Beyond the mean loss" section runs as written ------------------------------------------


def test_readme_beyond_the_mean_loss_blocks_run():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = re.split(r"\n#{2,3} ", text.split("### Beyond the mean loss\n", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:  # in order, in one namespace, as the README test runs them
        namespace.pop("metrics", None)
        exec(compile(block, "README.md", "exec"), namespace)
        assert int(namespace["state"].step) == 1
        assert np.isfinite(namespace["metrics"]["loss"])


def test_a_stream_without_a_key_is_explained(batch):
    trainer = Pipeline(loss).model(NoisyMLP(), input="image", rng="fold_in").optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match=r"RNG stream that got no key[\s\S]*rng_names=\('dropout', 'noise'\)"):
        trainer(state, batch)


def test_explain_shows_the_key_scheme_rngs_and_per_example_gradients():
    text = Pipeline(loss).model(CNN(nnx.Rngs(0)), input="image", rng="fold_in").optimize(dpsgd(), per_example=True)
    text = text.explain()
    assert "dropout_key = jax.random.fold_in(state.key, state.step)" in text
    assert "outputs = model(batch['image'], rngs=nnx.Rngs(dropout_key))" in text
    assert "jax.vmap(jax.value_and_grad(model_loss, has_aux=True), in_axes=(None, 0, 0, None))" in text
    assert "examples = jax.tree.map(lambda x: x[:, None], batch)" in text


def test_optional_rngs_of_a_module_with_own_streams_keeps_its_streams(batch):
    module = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))  # rngs=None
    trainer = Pipeline(loss).model(module, input="image").optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), batch)
    graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    rng_state, rest = nnx.to_pure_dict(rng_state), nnx.to_pure_dict(rest)

    @jax.jit
    def hand_loss(params, key):
        model = nnx.merge(graphdef, params, rng_state, rest)
        model.train()
        nnx.reseed(model, default=jax.random.split(key)[1])  # today's scheme: the module's own stream
        return loss(model(batch["image"]), batch)

    _, metrics = trainer(state, batch)
    np.testing.assert_array_equal(metrics["loss"], hand_loss(nnx.to_pure_dict(params), state.key))


def test_dpsgd_on_a_mean_gradient_it_would_silently_misread_is_caught():
    def square_loss(params, batch):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    batch = {"x": np.ones((8, 3), np.float32), "y": np.zeros((8, 3), np.float32)}
    params = {"w": jnp.ones((3, 3))}  # dpsgd alone would clip its rows as if they were 3 examples
    trainer = Pipeline(square_loss).optimize(dpsgd()).jit()
    state = trainer.init(jax.random.key(0), batch, params=params)
    with pytest.raises(PipelineError, match=r"shape \(3,\) for a parameter of shape \(3, 3\)[\s\S]*per_example=True"):
        trainer(state, batch)
    fixed = Pipeline(square_loss).optimize(dpsgd(), per_example=True).jit()
    state, _ = fixed(fixed.init(jax.random.key(0), batch, params=params), batch)
    assert state.params["w"].shape == (3, 3)


def test_an_rng_function_of_the_wrong_shape_fails_when_added():
    with pytest.raises(PipelineError, match=r"`rng=only_keys` must return \(next_key, keys\)[\s\S]*def only_keys"):

        def only_keys(key, step):
            return {"dropout": key}

        Pipeline(loss).model(DropoutMLP(), input="image", rng=only_keys)
