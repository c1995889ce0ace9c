"""Same seed, same data: the same parameters, bit for bit, and those of the hand-written seed-style loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from jaxpipe import Pipeline

EPOCHS, BATCH = 2, 64


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x))))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def chain():
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 40))
    )


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(return_X_y=True)
    return {"image": (images[:640] / 16.0).astype(np.float32), "label": labels[:640].astype(np.int32)}


def trainer_for(module):
    return Pipeline(loss).model(module, input="image").optimize(chain()).jit()


def train(trainer, digits, seed=0):
    state = trainer.init(jax.random.key(seed), {k: v[:BATCH] for k, v in digits.items()})
    return trainer.fit(state, digits, epochs=EPOCHS, batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def first_run(digits):
    return train(trainer_for(MLP()), digits)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_same_seed_gives_bit_identical_params(digits, first_run):
    trainer = trainer_for(MLP())  # a fresh pipeline: traced and compiled again
    second = train(trainer, digits)
    for a, b in zip(
        leaves((first_run.params, first_run.opt_state)), leaves((second.params, second.opt_state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    other_seed = train(trainer, digits, seed=1)
    assert not np.array_equal(leaves(first_run.params)[1], leaves(other_seed.params)[1])


def test_nnx_same_seed_gives_bit_identical_params(digits):
    trainer = trainer_for(NnxMLP(nnx.Rngs(0)))
    first, second = train(trainer, digits), train(trainer, digits)
    for a, b in zip(leaves((first.params, first.opt_state)), leaves((second.params, second.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_equals_the_hand_written_seed_style_loop(digits, first_run):
    model, tx = MLP(), chain()
    params_key, key, data_key = jax.random.split(jax.random.key(0), 3)
    params = model.init(params_key, digits["image"][:BATCH], train=False)["params"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, key, batch):
        key, dropout_key = jax.random.split(key)

        def loss_fn(params):
            logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key})
            return loss(logits, batch)

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    size = len(digits["label"])
    for epoch in range(EPOCHS):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), size))
        for i in range(size // BATCH):
            batch = {k: v[order[i * BATCH : (i + 1) * BATCH]] for k, v in digits.items()}
            params, opt_state, key, _ = train_step(params, opt_state, key, batch)

    ours = first_run
    assert int(ours.step) == EPOCHS * (size // BATCH)
    for a, b in zip(leaves(ours.params), leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(ours.key), jax.random.key_data(key))
