"""Whole training programs as their authors write them, each through ``.model``/``.optimize``/``fit`` with no
workaround, bit-identical to the hand-written JAX.

(a) PureJaxRL's PPO update: the trainer's step called inside the user's own jitted ``lax.scan`` over shuffled
    minibatches (``_update_minbatch`` in ``purejaxrl/ppo.py``).
(b) Optax's gradient-accumulation notebook (``optax.MultiSteps``) with an EMA of the parameters, trained by ``fit``
    and evaluated on the EMA.

Each pair is written out in full below (the jaxpipe version first), so their lengths can be compared.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline

pytestmark = pytest.mark.slow  # each compiles two whole programs


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- (a) PPO: the trainer's step inside the user's jitted scan over minibatches --------------------------------------


class ActorCritic(nn.Module):
    actions: int = 2

    @nn.compact
    def __call__(self, x):
        actor = nn.Dense(self.actions)(nn.tanh(nn.Dense(16)(x)))
        critic = nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))
        return actor, jnp.squeeze(critic, axis=-1)


CLIP_EPS, VF_COEF, ENT_COEF = 0.2, 0.5, 0.01
MINIBATCHES, STEPS = 4, 32


def ppo_loss(outputs, batch):
    """PureJaxRL's ``_loss_fn`` on the network's outputs: clipped value loss, clipped surrogate, entropy."""
    logits, value = outputs
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, batch["action"][:, None], axis=-1)[:, 0]
    value_clipped = batch["value"] + (value - batch["value"]).clip(-CLIP_EPS, CLIP_EPS)
    value_loss = 0.5 * jnp.maximum(jnp.square(value - batch["target"]), jnp.square(value_clipped - batch["target"]))
    value_loss = value_loss.mean()
    ratio = jnp.exp(log_prob - batch["log_prob"])
    gae = (batch["gae"] - batch["gae"].mean()) / (batch["gae"].std() + 1e-8)
    loss_actor = -jnp.minimum(ratio * gae, jnp.clip(ratio, 1.0 - CLIP_EPS, 1.0 + CLIP_EPS) * gae).mean()
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1).mean()
    total = loss_actor + VF_COEF * value_loss - ENT_COEF * entropy
    return total, {"value_loss": value_loss, "actor_loss": loss_actor, "entropy": entropy}


def ppo_tx():
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adam(2.5e-4, eps=1e-5))  # PureJaxRL's


@pytest.fixture(scope="module")
def trajectories():
    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "obs": rng.normal(size=(STEPS, 4)).astype(f32),
        "action": rng.integers(0, 2, STEPS).astype(np.int32),
        "log_prob": np.log(np.full(STEPS, 0.5, f32)),
        "value": rng.normal(size=STEPS).astype(f32),
        "gae": rng.normal(size=STEPS).astype(f32),
        "target": rng.normal(size=STEPS).astype(f32),
    }


def shuffled_minibatches(key, batch):
    """PureJaxRL's ``_update_epoch``: permute the rollout, cut it into minibatches."""
    permutation = jax.random.permutation(key, STEPS)
    shuffled = jax.tree.map(lambda x: jnp.take(x, permutation, axis=0), batch)
    return jax.tree.map(lambda x: x.reshape((MINIBATCHES, -1) + x.shape[1:]), shuffled)


def ppo_with_jaxpipe(trajectories, key, epochs):
    trainer = Pipeline(ppo_loss).model(ActorCritic(), input="obs").optimize(ppo_tx())
    state = trainer.init(key, trajectories, keys=lambda k: (k, k, k))

    @jax.jit
    def update_epoch(state, key):
        return jax.lax.scan(trainer, state, shuffled_minibatches(key, trajectories))

    losses = []
    for epoch in range(epochs):
        state, metrics = update_epoch(state, jax.random.fold_in(key, epoch))
        losses.append(metrics["loss"])
    return state.params, state.opt_state, losses


def ppo_by_hand(trajectories, key, epochs):
    network, tx = ActorCritic(), ppo_tx()
    params = network.init(key, trajectories["obs"])["params"]
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        return ppo_loss(network.apply({"params": params}, batch["obs"]), batch)

    def update_minibatch(carry, batch):
        params, opt_state = carry
        (total_loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), total_loss

    @jax.jit
    def update_epoch(params, opt_state, key):
        return jax.lax.scan(update_minibatch, (params, opt_state), shuffled_minibatches(key, trajectories))

    losses = []
    for epoch in range(epochs):
        (params, opt_state), loss = update_epoch(params, opt_state, jax.random.fold_in(key, epoch))
        losses.append(loss)
    return params, opt_state, losses


def test_ppo_update_inside_the_users_scan_is_the_hand_written_update(trajectories):
    key = jax.random.key(0)
    params, opt_state, losses = ppo_with_jaxpipe(trajectories, key, epochs=3)
    hand_params, hand_opt_state, hand_losses = ppo_by_hand(trajectories, key, epochs=3)
    assert_trees_equal(params, hand_params)
    assert_trees_equal(opt_state, hand_opt_state)
    assert_trees_equal(losses, hand_losses)


# --- (b) gradient accumulation (optax.MultiSteps) with an EMA of the parameters, through fit ------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


SIZE, BATCH, ACCUMULATE, DECAY, EPOCHS = 32, 4, 2, 0.9, 2


@pytest.fixture(scope="module")
def digits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(SIZE + 8, 4)).astype(np.float32)
    y = ((x @ np.array([1.0, -1.0, 0.5, 2.0]) > 0) + (x[:, 0] > 1)).astype(np.int32)
    return {"x": x[:SIZE], "label": y[:SIZE]}, {"x": x[SIZE:], "label": y[SIZE:]}


def accumulation_with_jaxpipe(train, test):
    tx = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=ACCUMULATE)
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(tx).ema(DECAY).jit()
    state = trainer.init(jax.random.key(0), train, keys=lambda k: (k, k, k))
    history = jaxpipe.History()
    state = trainer.fit(
        state, train, epochs=EPOCHS, batch_size=BATCH, eval_data=test, hooks=[history],
        eval_params=lambda state: state.extra["ema_params"], steps_per_call=1, progress=False,
    )  # fmt: skip
    return state.params, state.extra["ema_params"], history.as_dict()["epochs"]["eval_loss"]


def accumulation_by_hand(train, test):
    model, tx = MLP(), optax.MultiSteps(optax.adam(1e-2), every_k_schedule=ACCUMULATE)
    key = jax.random.key(0)
    params = model.init(key, train["x"])["params"]
    opt_state, ema = tx.init(params), params

    def loss_fn(params, batch):
        return loss(model.apply({"params": params}, batch["x"]), batch)

    @jax.jit
    def train_step(params, opt_state, ema, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, optax.incremental_update(params, ema, step_size=1 - DECAY)

    eval_losses = []
    for epoch in range(EPOCHS):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), SIZE))  # fit's documented order
        for start in range(0, SIZE - BATCH + 1, BATCH):
            batch = {k: v[order[start : start + BATCH]] for k, v in train.items()}
            params, opt_state, ema = train_step(params, opt_state, ema, batch)
        eval_losses.append(float(loss_fn(ema, test)))
    return params, ema, eval_losses


def test_gradient_accumulation_with_ema_through_fit_is_the_hand_written_loop(digits):
    train, test = digits
    params, ema, eval_losses = accumulation_with_jaxpipe(train, test)
    hand_params, hand_ema, hand_eval_losses = accumulation_by_hand(train, test)
    assert_trees_equal(params, hand_params)
    assert_trees_equal(ema, hand_ema)
    assert not np.array_equal(jax.tree.leaves(ema)[0], jax.tree.leaves(params)[0])  # an average, not a copy
    np.testing.assert_allclose(eval_losses, hand_eval_losses, rtol=1e-6)  # evaluated on the EMA
