"""Data-parallel training with ``.data_parallel(mesh)`` on 8 CPU devices, against the same training on one."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import Pipeline, PipelineError

DEVICES = 8
BATCH = 32


class MLP(nn.Module):
    """Dense layers with dropout and BatchNorm: both must behave as on one device."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(3)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(128, 6)).astype(np.float32), "label": rng.integers(0, 3, 128)}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((DEVICES,), ("data",))


@pytest.fixture(scope="module")
def trainer():
    return Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(1e-2))


@pytest.fixture(scope="module")
def one_device(trainer, data):
    """Two epochs on one device: the reference every sharded run must reproduce."""
    pipe = trainer.jit()
    return pipe.fit(pipe.init(jax.random.key(0), data), data, epochs=2, batch_size=BATCH, progress=False)


def assert_same_state(got, want):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6),
        (got.params, got.opt_state, got.model_state),
        (want.params, want.opt_state, want.model_state),
    )
    assert int(got.step) == int(want.step)


def test_eight_devices_train_to_the_same_params_as_one(trainer, mesh, data, one_device):
    pipe = trainer.data_parallel(mesh, axis="data").jit()
    state = pipe.init(jax.random.key(0), data)
    replicated = NamedSharding(Mesh(mesh.devices, ("data",), axis_types=(AxisType.Auto,)), P())
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(state))  # init placed it on the mesh
    state = pipe.fit(state, data, epochs=2, batch_size=BATCH, progress=False)
    assert_same_state(state, one_device)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(state))


def test_the_step_is_the_hand_written_one(trainer, mesh, data):
    """Same lowered program as the explained JAX: sharding constraints around the unchanged step."""
    pipe = trainer.data_parallel(mesh).jit()
    state = pipe.init(jax.random.key(0), data)
    batch = {k: v[:BATCH] for k, v in data.items()}
    train_step = trainer.build()
    auto = Mesh(mesh.devices, ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(auto, P())

    def step_on_mesh(state, batch):
        state = jax.lax.with_sharding_constraint(state, jax.tree.map(lambda _: replicated, state))
        batch = jax.lax.with_sharding_constraint(batch, jax.tree.map(lambda _: NamedSharding(auto, P("data")), batch))
        state, metrics = train_step(state, batch)
        state = jax.lax.with_sharding_constraint(state, jax.tree.map(lambda _: replicated, state))
        return state, jax.lax.with_sharding_constraint(metrics, jax.tree.map(lambda _: replicated, metrics))

    def normalized(text):
        return re.sub(r"module @\S+", "module", text)

    assert normalized(pipe.hlo(state, batch)) == normalized(jax.jit(step_on_mesh).lower(state, batch).as_text())
    explained = pipe.explain()
    assert "mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))" in explained
    assert "jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P('data',)))" in explained
    assert explained.endswith("jax.jit(step_on_mesh)")
    compiled = pipe.hlo(state, batch, optimized=True)  # XLA's program for one device
    arguments = re.search(r"entry_computation_layout=\{\((.*?)\)->", compiled).group(1)
    assert "f32[4,6]" in arguments and "f32[32,6]" not in arguments  # its block: 32 / 8 rows of 6 features
    assert "all-reduce" in compiled  # the gradients summed over devices


def test_sharded_params_where_asked_and_scan(trainer, data, one_device):
    """A 4 x 2 mesh: the batch over 'data', the wide kernels split over 'model'; 4 steps per call."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))

    def split_wide(path, x):
        del path  # decided by shape alone
        return P(None, "model") if x.ndim == 2 and x.shape[1] == 32 else P()

    pipe = trainer.data_parallel(mesh, axis="data", param_specs=split_wide).scan(4).jit()
    state = pipe.init(jax.random.PRNGKey(0), data)  # a legacy uint32 key works as well
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")  # (6, 32)
    assert state.opt_state[0].mu["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert state.params["Dense_1"]["kernel"].sharding.spec == P()  # (32, 3)
    state = pipe.fit(state, data, epochs=2, batch_size=BATCH, progress=False)
    # the legacy key holds the same bits as jax.random.key(0), so this run must match the one-device run
    legacy = jax.random.wrap_key_data(jax.random.PRNGKey(0))
    assert jax.random.key_data(legacy).tolist() == jax.random.key_data(jax.random.key(0)).tolist()
    assert_same_state(state, one_device)
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")


def test_fit_over_an_iterable_of_batches(trainer, mesh, data):
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, 128, BATCH)]
    plain = trainer.jit()
    want = plain.fit(plain.init(jax.random.key(1), data), batches, progress=False)
    pipe = trainer.data_parallel(mesh).jit()
    got = pipe.fit(pipe.init(jax.random.key(1), data), batches, progress=False)
    assert_same_state(got, want)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_a_batch_the_data_axis_does_not_divide(trainer, mesh, data):
    pipe = trainer.data_parallel(mesh).jit()
    state = pipe.init(jax.random.key(0), data)
    with pytest.raises(
        PipelineError,
        match=r"stage 3 \(data_parallel\)(.|\n)*size 12, which mesh axis 'data' \(8\) cannot split evenly(.|\n)*"
        r"multiple of 8(.|\n)*choose a batch_size",
    ):
        pipe.fit(state, data, batch_size=12, progress=False)
    with pytest.raises(PipelineError, match=r"dimension 0 of the batch's `\['image'\]` has size 12"):
        pipe(state, {k: v[:12] for k, v in data.items()})


def test_a_mesh_axis_that_does_not_exist(trainer, mesh):
    with pytest.raises(
        PipelineError,
        match=r"stage 3 \(data_parallel\)(.|\n)*`axis='batch'` is not an axis of the mesh(.|\n)*\('data',\)",
    ):
        trainer.data_parallel(mesh, axis="batch")


def test_other_bad_options(trainer, mesh):
    with pytest.raises(PipelineError, match=r"comes after `.jit\(\)`(.|\n)*before `.scan\(\)`/`.jit\(\)`"):
        trainer.jit().data_parallel(mesh)
    with pytest.raises(PipelineError, match=r"needs a `jax.sharding.Mesh` as `mesh`, got tuple"):
        trainer.data_parallel((8,))
    with pytest.raises(PipelineError, match=r"`param_specs` must be a function \(path, array\) -> PartitionSpec"):
        trainer.data_parallel(mesh, param_specs=P("data"))


def test_a_replicated_scalar_loss_needs_no_change(mesh):
    """A hand-written step on (params, batch): the same gradients with the batch split over devices."""

    def step(state, batch):
        grads = jax.grad(lambda w: jnp.mean((batch @ w) ** 2))(state)
        return state - 0.1 * grads, {"norm": jnp.linalg.norm(grads)}

    w, x = jnp.ones((6, 2)), jnp.arange(96.0).reshape(16, 6) / 96
    pipe = Pipeline(step).data_parallel(mesh).jit()
    got, metrics = pipe(w, x)
    want, want_metrics = jax.jit(step)(w, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["norm"], want_metrics["norm"], rtol=1e-5)
    assert got.sharding.is_fully_replicated and len(got.sharding.device_set) == DEVICES
