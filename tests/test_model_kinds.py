"""`.model()` for the models JAX users have: Equinox, Flax's VAE shape, nanoGPT-style Linen; `predict`; keys for a
plain loss; metrics paid for only when asked. Each against its hand-written JAX."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import jaxpipe
from jaxpipe import Pipeline, PipelineError


def assert_trees_equal(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(return_X_y=True)
    images = (images[:40] / 16).astype(np.float32).reshape(-1, 1, 8, 8)  # Equinox's layout: channels first
    return {"image": images, "label": labels[:40].astype(np.int32)}


# --- Equinox's MNIST CNN example (docs/examples/mnist.ipynb), shrunk to 8x8 digits ---------------------------


class CNN(eqx.Module):
    layers: list

    def __init__(self, key):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
            eqx.nn.MaxPool2d(kernel_size=2),
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(48, 32, key=key2),
            jax.nn.sigmoid,
            eqx.nn.Linear(32, 16, key=key3),
            jax.nn.relu,
            eqx.nn.Linear(16, 10, key=key4),
            jax.nn.log_softmax,
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def cross_entropy(y, pred_y):  # the example's loss
    pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
    return -jnp.mean(pred_y)


def test_equinox_mnist_cnn_is_the_equinox_example_step(digits):
    model, optim = CNN(jax.random.key(1)), optax.adamw(3e-3)

    def loss(pred_y, batch):
        return cross_entropy(batch["label"], pred_y)

    trainer = Pipeline(loss).model(model, input="image").optimize(optim).jit()
    state = trainer.init(jax.random.key(0), digits)

    # the example's step, as written there
    def example_loss(model, x, y):
        pred_y = jax.vmap(model)(x)
        return cross_entropy(y, pred_y)

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        loss_value, grads = eqx.filter_value_and_grad(example_loss)(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss_value

    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    assert_trees_equal(state.params, eqx.filter(model, eqx.is_inexact_array))
    hand = model
    for _ in range(3):
        state, metrics = trainer(state, digits)
        hand, opt_state, value = make_step(hand, opt_state, digits["image"], digits["label"])
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, eqx.filter(hand, eqx.is_inexact_array))
    assert_trees_equal(state.key, trainer.init(jax.random.key(0), digits).key)  # draws nothing: no split
    expected = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(hand, digits["image"])
    np.testing.assert_array_equal(trainer.predict(state, digits["image"]), expected)


class DropoutNet(eqx.Module):
    linear: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear, self.dropout, self.out = (
            eqx.nn.Linear(64, 16, key=k1),
            eqx.nn.Dropout(0.5),
            eqx.nn.Linear(16, 10, key=k2),
        )

    def __call__(self, x, *, key=None):
        return self.out(self.dropout(jax.nn.relu(self.linear(x.ravel())), key=key))


def softmax_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def test_equinox_dropout_gets_a_key_per_example_and_inference_mode_in_eval(digits):
    model, tx = DropoutNet(jax.random.key(2)), optax.sgd(0.1)
    trainer = Pipeline(softmax_loss).model(model, input="image").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), digits)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @jax.jit
    def hand_step(params, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            model = eqx.combine(params, static)
            keys = jax.random.split(dropout_key, len(batch["image"]))
            return softmax_loss(jax.vmap(model)(batch["image"], key=keys), batch)

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    opt_state, key = tx.init(params), state.key
    for _ in range(2):
        state, metrics = trainer(state, digits)
        params, opt_state, key, value = hand_step(params, opt_state, key, digits)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.key, key)
    inference = eqx.nn.inference_mode(eqx.combine(params, static))
    expected = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(inference, digits["image"])
    np.testing.assert_array_equal(trainer.predict(state, {"image": digits["image"]}, batch_size=16), expected)
    evaluated = jaxpipe.evaluate(trainer, state, digits)
    np.testing.assert_allclose(evaluated["loss"], softmax_loss(expected, digits), rtol=1e-6)


def test_a_plain_loss_asks_for_a_key(digits):
    """An Equinox dropout model without `.model`: the whole module is the parameters, its loss takes a key."""
    model, tx = DropoutNet(jax.random.key(3)), optax.adam(1e-2)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, batch, key):
        model = eqx.combine(params, static)
        logits = jax.vmap(model)(batch["image"], key=jax.random.split(key, len(batch["image"])))
        return softmax_loss(logits, batch)

    trainer = Pipeline(loss).optimize(tx).jit()
    state = trainer.init(jax.random.key(0), digits, params=params)

    @eqx.filter_jit
    def hand_step(model, opt_state, key, batch):
        key, subkey = jax.random.split(key)
        value, grads = eqx.filter_value_and_grad(lambda m: loss(eqx.filter(m, eqx.is_inexact_array), batch, subkey))(
            model
        )
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, key, value

    hand, opt_state, key = model, tx.init(params), state.key
    for _ in range(3):
        state, metrics = trainer(state, digits)
        hand, opt_state, key, value = hand_step(hand, opt_state, key, digits)
        np.testing.assert_array_equal(metrics["loss"], value)
    assert_trees_equal(state.params, eqx.filter(hand, eqx.is_inexact_array))
    assert_trees_equal(state.key, key)
    assert "key, loss_key = jax.random.split(state.key)" in trainer.explain()


# --- Flax's VAE example: __call__(self, x, z_rng), a key stream named in input= -------------------------------


class VAE(nn.Module):
    latents: int = 4

    @nn.compact
    def __call__(self, x, z_rng):
        h = nn.relu(nn.Dense(16)(x))
        mean, logvar = nn.Dense(self.latents)(h), nn.Dense(self.latents)(h)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)  # reparameterize
        return nn.Dense(x.shape[-1])(nn.relu(nn.Dense(16)(z))), mean, logvar


def vae_loss(outputs, batch):
    recon_x, mean, logvar = outputs
    bce = optax.sigmoid_binary_cross_entropy(recon_x, batch["image"]).sum(-1).mean()
    kld = (-0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)).mean()
    return bce + kld


def test_flax_vae_gets_a_fresh_z_rng_each_step(digits):
    batch = {"image": digits["image"].reshape(len(digits["image"]), -1)}
    model, tx = VAE(), optax.adam(1e-3)
    trainer = Pipeline(vae_loss).model(model, input=("image", "z_rng")).optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    params_key = jax.random.split(jax.random.key(0), 3)[0]
    assert_trees_equal(state.params, jax.jit(model.init)(params_key, batch["image"], params_key)["params"])

    @jax.jit
    def train_step(params, opt_state, key, batch):  # the example's step, z_rng split off each step
        key, z_rng = jax.random.split(key)
        grads = jax.grad(lambda p: vae_loss(model.apply({"params": p}, batch["image"], z_rng), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    params, opt_state, key = state.params, tx.init(state.params), state.key
    for _ in range(3):
        state, _ = trainer(state, batch)
        params, opt_state, key = train_step(params, opt_state, key, batch)
    assert_trees_equal(state.params, params)
    assert_trees_equal(state.key, key)
    recon, _, _ = trainer.predict(state, batch)  # state.key for z_rng (one key per call: batch_size would change it)
    expected = jax.jit(lambda p, x, k: model.apply({"params": p}, x, k)[0])(params, batch["image"], state.key)
    np.testing.assert_array_equal(recon, expected)


def test_a_parameter_no_input_serves_is_explained():
    with pytest.raises(PipelineError, match=r"takes \(x, z_rng\)[\s\S]*input=\('image', 'z_rng'\)"):
        Pipeline(vae_loss).model(VAE(), input="image")
    trainer = Pipeline(vae_loss).model(VAE(), input=("image", "z")).optimize(optax.sgd(0.1))
    with pytest.raises(PipelineError, match=r"no key 'z'; its keys are \['image'\][\s\S]*takes \(x, z_rng\)"):
        trainer.init(jax.random.key(0), {"image": np.ones((2, 64), np.float32)})


# --- Linen modules that define their own init (nanoGPT) or take no train flag --------------------------------


class GPTish(nn.Module):
    @nn.compact
    def __call__(self, idx, deterministic=True):
        x = nn.Embed(16, 8)(idx)
        x = nn.Dropout(0.1)(x, deterministic=deterministic)
        return nn.Dense(16)(x)

    def init(self, rng):  # nanoGPT's: its own signature, never to be called with Flax's
        return super().init(rng, jnp.zeros((1, 4), jnp.int32))


def test_a_module_with_its_own_init_and_a_deterministic_flag():
    model, tx = GPTish(), optax.sgd(0.1)

    def lm_loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"]).mean()

    batch = {"idx": np.arange(8, dtype=np.int32).reshape(2, 4), "target": np.ones((2, 4), np.int32)}
    trainer = Pipeline(lm_loss).model(model, input="idx").optimize(tx).jit()
    state = trainer.init(jax.random.key(0), batch)
    params_key = jax.random.split(jax.random.key(0), 3)[0]
    assert_trees_equal(
        state.params, jax.jit(lambda k, x: nn.Module.init(model, k, x))(params_key, batch["idx"])["params"]
    )

    @jax.jit
    def hand_step(params, key):
        key, dropout_key = jax.random.split(key)

        def logits_fn(p):
            return model.apply({"params": p}, batch["idx"], deterministic=False, rngs={"dropout": dropout_key})

        grads = jax.grad(lambda p: lm_loss(logits_fn(p), batch))(params)
        return optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])

    expected = hand_step(state.params, state.key)
    state, _ = trainer(state, batch)
    assert_trees_equal(state.params, expected)


# --- predict for Linen and NNX ------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x))))


def test_predict_is_module_apply_and_the_nnx_call(digits):
    data = {"image": digits["image"].reshape(40, -1), "label": digits["label"]}
    trainer = Pipeline(softmax_loss).model(MLP(), input="image").optimize(optax.sgd(0.1)).jit()
    state, _ = trainer(trainer.init(jax.random.key(0), data), data)
    expected = jax.jit(lambda p, x: MLP().apply({"params": p}, x))(state.params, data["image"])
    np.testing.assert_array_equal(trainer.predict(state, data, batch_size=16), expected)
    np.testing.assert_array_equal(trainer.predict(state, data["image"]), expected)

    module = nnx.Sequential(nnx.Linear(64, 10, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    nnx_trainer = Pipeline(softmax_loss).model(module, input="image").optimize(optax.sgd(0.1)).jit()
    state, _ = nnx_trainer(nnx_trainer.init(jax.random.key(0), data), data)
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def nnx_call(params, x):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return model(x)

    np.testing.assert_array_equal(
        nnx_trainer.predict(state, data["image"], batch_size=7), nnx_call(state.params, data["image"])
    )
    with pytest.raises(PipelineError, match=r"needs a stage that runs a model"):
        Pipeline(softmax_loss).optimize(optax.sgd(0.1)).predict(state, data)


# --- metrics paid for only when asked; explain agrees with what runs; help; errors ---------------------------


def test_grad_norm_is_computed_only_when_asked(digits):
    data = {"image": digits["image"].reshape(40, -1), "label": digits["label"]}
    plain = Pipeline(softmax_loss).model(MLP(), input="image").optimize(optax.sgd(0.1)).jit()
    state = plain.init(jax.random.key(0), data)
    assert "sqrt" not in str(jax.make_jaxpr(plain)(state, data))
    assert set(plain(state, data)[1]) == {"loss"}
    asked = Pipeline(softmax_loss).model(MLP(), input="image")
    asked = asked.optimize(optax.sgd(0.1), metrics=("grad_norm", "update_norm", "param_norm")).jit()
    new, metrics = asked(state, data)
    assert str(jax.make_jaxpr(asked)(state, data)).count("sqrt") == 3
    grads = jax.grad(
        lambda p: (
            Pipeline(softmax_loss)
            .model(MLP(), input="image")
            .build()
            .train(p, data, jax.random.split(state.key)[1], {})[0]
        )
    )(state.params)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(new.params), rtol=1e-6)
    with pytest.raises(PipelineError, match=r"names 'grad_nrom'[\s\S]*Did you mean 'grad_norm'"):
        Pipeline(softmax_loss).optimize(optax.sgd(0.1), metrics=("grad_nrom",))


def test_explain_prints_the_key_scheme_that_runs():
    text = Pipeline(softmax_loss).model(MLP(), input="image", rng="fold_in").optimize(optax.sgd(0.1)).explain()
    assert "key, dropout_key = state.key, jax.random.fold_in(state.key, state.step)" in text
    assert "jax.random.split(state.key)" not in text
    eqx_text = Pipeline(softmax_loss).model(DropoutNet(jax.random.key(0)), input="image").explain()
    assert "eqx.partition(model, eqx.is_inexact_array)" in eqx_text
    assert "outputs = jax.vmap(model)(batch['image'], key=keys)" in eqx_text


def test_help_documents_every_option():
    model_doc = Pipeline(softmax_loss).model.__doc__
    for option in ("input:", "label:", "rng:", "rng_names:", "Equinox", "NNX", 'input=("image", "z_rng")'):
        assert option in model_doc
    optimize_doc = Pipeline(softmax_loss).optimize.__doc__
    for option in ("learning_rate:", "per_example:", "metrics:", "loss(params, batch, key)"):
        assert option in optimize_doc


class Stateful(eqx.Module):
    norm: eqx.nn.BatchNorm

    def __init__(self):
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch")

    def __call__(self, x, state):
        return self.norm(x, state)


def test_non_modules_and_stateful_equinox_fail_short_with_the_route_that_works():
    with pytest.raises(PipelineError, match=r"eqx.nn.State[\s\S]*in \.norm"):
        Pipeline(softmax_loss).model(Stateful(), input="image")
    with pytest.raises(PipelineError, match=r"needs a Flax module .* got function\.\n[\s\S]*optimize\(tx\)") as info:
        Pipeline(softmax_loss).model(lambda x: x, input="image")
    assert len(str(info.value).splitlines()) <= 4
