"""The open training state: ``TrainState.extra``, post-step stages (``.after_step``, ``.ema``), ``init(keys=)``,
and ``init`` inside ``jax.jit(jax.vmap(...))``, each against hand-written JAX."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(8, 4)).astype(np.float32), "label": rng.integers(0, 3, 8).astype(np.int32)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- TrainState.extra ---------------------------------------------------------------------------------------------


def test_extra_is_an_empty_dict_after_the_older_fields_and_a_pytree(batch):
    state = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1)).init(jax.random.key(0), batch)
    assert state.extra == {}
    older = TrainState(state.step, state.params, state.opt_state, state.key, state.model_state, state.data_key)
    assert older.extra == {}  # positional construction as before
    mine = state.replace(extra={"seen": jnp.int32(3)})
    assert jax.tree.leaves(jax.tree.map(lambda x: x, mine).extra) == [3]
    assert len(jax.tree.leaves(mine)) == len(jax.tree.leaves(state)) + 1


def test_extra_is_carried_through_the_step(batch):
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), batch).replace(extra={"seen": jnp.int32(3)})
    state, _ = trainer(state, batch)
    assert int(state.extra["seen"]) == 3


# --- post-step stages ---------------------------------------------------------------------------------------------


def test_after_step_updates_extra_inside_the_compiled_step(batch):
    def count(old, new):
        return new.replace(extra={**new.extra, "norm": optax.tree.norm(new.params), "steps": old.extra["steps"] + 1})

    tx = optax.sgd(0.1)
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(tx).after_step(count).jit()
    state = trainer.init(jax.random.key(0), batch)
    state = state.replace(extra={"steps": jnp.int32(0), "norm": jnp.float32(0)})
    plain = Pipeline(loss).model(MLP(), input="x").optimize(tx).jit()
    reference = state.replace(extra={})
    for _ in range(2):
        state, _ = trainer(state, batch)
        reference, _ = plain(reference, batch)
    assert int(state.extra["steps"]) == 2
    np.testing.assert_array_equal(state.extra["norm"], optax.tree.norm(reference.params))
    assert_trees_equal(state.params, reference.params)
    assert "return count(state, new_state), metrics" in trainer.explain()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.model(MLP(), input="x").ema(0.9), r"goes after `\.optimize\(\)`"),
        (lambda p: p.model(MLP(), input="x").optimize(optax.sgd(0.1)).jit().ema(0.9), r"goes before `\.jit\(\)`"),
        (lambda p: p.model(MLP(), input="x").optimize(optax.sgd(0.1)).scan(2).ema(), r"goes before `\.scan\(\)`"),
        (lambda p: p.model(MLP(), input="x").optimize(optax.sgd(0.1)).ema(1.0), r"in \[0, 1\), got 1\.0"),
        (lambda p: p.model(MLP(), input="x").optimize(optax.sgd(0.1)).after_step(3), "takes a function"),
    ],
)
def test_post_step_stages_are_checked_when_added(make, message):
    with pytest.raises(PipelineError, match=message):
        make(Pipeline(loss))


@pytest.mark.slow
def test_ema_is_optax_incremental_update_inside_the_step(batch):
    tx, decay = optax.adam(1e-2), 0.9
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(tx).ema(decay).jit()
    state = trainer.init(jax.random.key(0), batch)
    assert_trees_equal(state.extra["ema_params"], state.params)
    plain = Pipeline(loss).model(MLP(), input="x").optimize(tx).jit()

    @jax.jit
    def hand(state, ema):
        state, _ = plain.build()(state, batch)
        return state, optax.incremental_update(state.params, ema, step_size=1 - decay)

    reference, ema = state.replace(extra={}), state.params
    for _ in range(3):
        state, _ = trainer(state, batch)
        reference, ema = hand(reference, ema)
    assert_trees_equal(state.extra["ema_params"], ema)
    assert_trees_equal(state.params, reference.params)
    model = MLP()
    logits = model.apply({"params": ema}, batch["x"])
    evaluated = jaxpipe.evaluate(trainer, state, batch, params=state.extra["ema_params"])
    np.testing.assert_allclose(evaluated["loss"], loss(logits, batch), rtol=1e-6)


@pytest.mark.slow
def test_ema_on_a_state_without_its_field_says_so(batch):
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1)).ema(0.9)
    state = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1)).init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match=r'no extra\["ema_params"\]'):
        trainer(state, batch)


def test_fit_eval_params_must_be_a_function(batch):
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), batch)
    with pytest.raises(PipelineError, match="`eval_params` is a function of the state"):
        trainer.fit(state, batch, batch_size=4, eval_data=batch, eval_params="ema_params", progress=False)


# --- init(keys=) -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_keys_reproduce_a_script_that_initialises_with_the_key_itself(batch):
    """``params = model.init(jax.random.key(0), x)["params"]``, as most Flax scripts write."""
    key = jax.random.key(0)
    theirs = MLP().init(key, batch["x"])["params"]
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1))
    default = trainer.init(key, batch)
    assert not np.array_equal(default.params["Dense_0"]["kernel"], theirs["Dense_0"]["kernel"])
    same = trainer.init(key, batch, keys=lambda k: (k, k, k))
    assert_trees_equal(same.params, theirs)
    assert_trees_equal((same.key, same.data_key), (key, key))
    by_role = trainer.init(key, batch, keys={"params": key})
    assert_trees_equal(by_role.params, theirs)
    _, step_key, data_key = jaxpipe.split_init_key(key)  # roles left out: the default
    assert_trees_equal((by_role.key, by_role.data_key), (step_key, data_key))


def test_keys_of_another_shape_say_what_they_should_be(batch):
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.sgd(0.1))
    with pytest.raises(PipelineError, match=r"dict of keys by role \('params', 'step', 'data'\), got a dict"):
        trainer.init(jax.random.key(0), batch, keys={"model": jax.random.key(1)})
    with pytest.raises(PipelineError, match="must return three keys"):
        trainer.init(jax.random.key(0), batch, keys=lambda k: jax.random.split(k, 2))


# --- init inside jax.jit(jax.vmap(...)) --------------------------------------------------------------------------

VMAP_INIT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    from jaxpipe import Pipeline

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))

    def loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    batch = {"x": np.ones((4, 3), np.float32), "label": np.zeros(4, np.int32)}
    trainer = Pipeline(loss).model(MLP(), input="x").optimize(optax.adam(1e-2)).ema(0.9)

    def train(key):  # PureJaxRL's shape: init and the training loop in one function, vmapped over seeds
        state = trainer.init(key, batch)
        state, metrics = jax.lax.scan(lambda s, _: trainer(s, batch), state, None, length=5)
        return state.params, metrics["loss"]

    keys = jax.random.split(jax.random.key(0), 4)
    params, losses = jax.block_until_ready(jax.jit(jax.vmap(train))(keys))
    for i in range(4):  # each seed as a run of its own
        alone = trainer.init(keys[i], batch)
        for _ in range(5):
            alone, _ = trainer(alone, batch)
        for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[i], rtol=1e-5, atol=1e-6)
    print("ok", losses.shape)
    """
)


@pytest.mark.slow
def test_init_inside_jit_of_vmap_over_seeds_finishes(tmp_path):
    """Reported to hang on XLA:CPU; run in a subprocess with a time limit, so a hang fails instead of stalling."""
    script = tmp_path / "vmap_init.py"
    script.write_text(VMAP_INIT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "(4,", "5)"]
