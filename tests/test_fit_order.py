"""`fit` against today's loop, written out by hand: the same batches in the same order, the same bits.

``legacy_fit`` is the loop ``fit`` ran before batches moved to the device: a keyed
permutation per epoch computed on the host, a NumPy gather per step, and one call of
the jitted step per batch. Every way ``fit`` can run now (data on the device, several
steps per call, streamed from the host, ``.scan(k)``, resumed half way) must end with
bit-identical state.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpipe import Pipeline

N, BATCH, EPOCHS = 88, 8, 3  # 11 steps per epoch, 33 in all


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)  # the run depends on the key stream
        x = nn.BatchNorm(use_running_average=not train)(x)  # and on model_state
        return nn.Dense(3)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    return {"x": x, "label": (x @ np.array([1.0, -1.0, 0.5, 2.0]) > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(loss).model(MLP(), input="x").optimize(optax.adam(1e-2)).jit()


def legacy_fit(pipe, state, data, epochs, batch_size, start=0, stop=None):
    """Today's loop by hand: host permutation of (data_key, epoch), host gather, one step per call."""
    per_epoch = N // batch_size
    stop = epochs * per_epoch if stop is None else stop
    for step in range(start, stop):
        epoch, offset = divmod(step, per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
        index = order[offset * batch_size : (offset + 1) * batch_size]
        state, _ = pipe(state, {k: v[index] for k, v in data.items()})
    return state


def leaves(state):
    out = []
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def assert_bitwise(got, want):
    for a, b in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(pipe, data):
    state = pipe.init(jax.random.key(0), data)
    return state, legacy_fit(pipe, state, data, EPOCHS, BATCH)


@pytest.mark.parametrize("options", [{}, {"device_data": True}, {"device_data": False}])
def test_fit_is_bit_identical_to_the_host_loop(pipe, data, reference, options):
    state, want = reference
    got = pipe.fit(state, data, epochs=EPOCHS, batch_size=BATCH, progress=False, **options)
    assert int(got.step) == EPOCHS * (N // BATCH)
    assert_bitwise(got, want)


def test_scan_is_bit_identical_to_the_host_loop(data, reference):
    state, want = reference
    scanned = Pipeline(loss).model(MLP(), input="x").optimize(optax.adam(1e-2)).scan(4).jit()
    got = scanned.fit(state, data, epochs=EPOCHS, batch_size=BATCH, progress=False)
    assert_bitwise(got, want)


def test_resumed_half_way_is_bit_identical(pipe, data, reference):
    state, want = reference
    half = legacy_fit(pipe, state, data, EPOCHS, BATCH, stop=16)  # mid epoch 2
    assert_bitwise(pipe.fit(half, data, epochs=EPOCHS, batch_size=BATCH, progress=False), want)


def test_the_callers_state_stays_usable(pipe, data, reference):
    state, _ = reference
    before = leaves(state)
    pipe.fit(state, data, epochs=1, batch_size=BATCH, progress=False)
    for a, b in zip(leaves(state), before, strict=True):  # not donated away
        np.testing.assert_array_equal(a, b)
