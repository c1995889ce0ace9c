"""Models bigger than one device: ``.data_parallel(mesh, param_specs=...)`` from Flax annotations and FSDP.

On 8 CPU devices: each sharded state is made sharded (no device holds a whole
kernel after ``init``), trains to one device's numbers, and a checkpoint from
one mesh restores on another mesh and on one device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import Pipeline, PipelineError, sharding_report
from jaxpipe._tools.sharding import collectives
from jaxpipe._training.init import init_program

pytestmark = pytest.mark.slow  # compiles several sharded programs

RULES = [("batch", "data"), ("embed", None), ("mlp", "model")]
STEPS = 4


def dense(features, names):
    return nn.Dense(features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names))


class MLP(nn.Module):
    """Two annotated kernels, (32, 64) and (64, 16), and unannotated biases."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(dense(64, ("embed", "mlp"))(x))
        return dense(16, ("mlp", "embed"))(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(16, 32)).astype(np.float32), "label": rng.integers(0, 16, 16)}


@pytest.fixture(scope="module")
def trainer():
    return Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(1e-2))


def train(pipe, batch):
    state = pipe.init(jax.random.key(0), batch)
    first = state
    for _ in range(STEPS):
        state, metrics = pipe(state, batch)
    return first, state, float(metrics["loss"])


@pytest.fixture(scope="module")
def one_device(trainer, batch):
    return train(trainer.jit(), batch)


def kernel(state, layer="Dense_0"):
    return state.params[layer]["kernel"].value


def largest_shard(x):
    return max(shard.data.size for shard in x.addressable_shards) / x.size


def assert_same(got, want):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        (got.params, got.opt_state),
        (want.params, want.opt_state),
    )


@pytest.mark.parametrize(
    ("shape", "names", "param_specs", "fraction", "spec0", "spec1"),
    [
        ((2, 4), ("data", "model"), "annotations", 1 / 4, P(None, "model"), P("model")),
        ((8,), ("data",), "fsdp", 1 / 8, P(None, "data"), P("data")),
        ((2, 4), ("data", "model"), ("annotations", "fsdp"), 1 / 8, P("data", "model"), P("model", "data")),
    ],
    ids=["annotations-2x4", "fsdp-8", "both-2x4"],
)
def test_sharded_from_init_and_equal_to_one_device(
    trainer, batch, one_device, shape, names, param_specs, fraction, spec0, spec1
):
    mesh = jax.make_mesh(shape, names)
    pipe = trainer.data_parallel(mesh, param_specs=param_specs, rules=None if param_specs == "fsdp" else RULES).jit()
    make, targets = init_program(pipe, jax.random.key(0), batch)
    compiled = make.lower().compile()  # the initialiser itself puts out the shards: no device makes a whole kernel
    assert jax.tree.leaves(compiled.output_shardings) == jax.tree.leaves(targets)
    first, state, final_loss = train(pipe, batch)
    for s in (first, state):
        assert kernel(s).sharding.spec == spec0 and kernel(s, "Dense_1").sharding.spec == spec1
        assert largest_shard(kernel(s)) == fraction
        assert s.opt_state[0].mu["Dense_0"]["kernel"].value.sharding.spec == spec0  # follows its parameter
        assert s.params["Dense_0"]["bias"].sharding.spec == P()  # unannotated, and below FSDP's 1024 elements
    assert_same(first, one_device[0])
    assert_same(state, one_device[1])
    assert abs(final_loss - one_device[2]) <= 1e-5


def test_a_checkpoint_from_a_2x4_mesh_restores_on_fsdp_and_on_one_device(trainer, batch, tmp_path):
    directory = str(tmp_path / "ckpt")
    two_d = trainer.data_parallel(jax.make_mesh((2, 4), ("data", "model")), param_specs="annotations", rules=RULES)
    _, saved, _ = train(two_d.jit(), batch)
    assert two_d.checkpoint(directory).jit().save(saved)
    fsdp_mesh = jax.make_mesh((8,), ("data",))
    for other in (trainer.data_parallel(fsdp_mesh, param_specs="fsdp"), trainer):
        restored = other.checkpoint(directory).jit().init(jax.random.key(1), batch)  # another seed: read back
        assert int(restored.step) == STEPS
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
            (restored.params, restored.opt_state, jax.random.key_data(restored.key)),
            (saved.params, saved.opt_state, jax.random.key_data(saved.key)),
        )
    fresh = trainer.data_parallel(fsdp_mesh, param_specs="fsdp").checkpoint(directory).jit()
    restored = fresh.init(jax.random.key(1), batch)
    assert kernel(restored).sharding == NamedSharding(kernel(restored).sharding.mesh, P(None, "data"))
    assert largest_shard(kernel(restored)) == 1 / 8
    single = trainer.checkpoint(directory).jit().init(jax.random.key(1), batch)
    assert len(kernel(single).sharding.device_set) == 1


def test_rules_from_the_flax_context_and_explain(trainer, batch):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with nn.logical_axis_rules(RULES):
        state = trainer.data_parallel(mesh, param_specs="annotations").jit().init(jax.random.key(0), batch)
    assert kernel(state).sharding.spec == P(None, "model")
    # without rules: logical names that are not mesh axes stay whole
    state = trainer.data_parallel(mesh, param_specs="annotations").jit().init(jax.random.key(0), batch)
    assert kernel(state).sharding.spec == P()
    explained = trainer.data_parallel(mesh, param_specs=("annotations", "fsdp"), rules=RULES).jit().explain()
    assert "params: Flax partitioning annotations through rules=[('batch', 'data')" in explained
    assert "FSDP over 'data' along the largest dimension it divides (>= 1024 elements)" in explained


def test_strict_names_the_unannotated_parameters(trainer, batch):
    pipe = trainer.data_parallel(jax.make_mesh((8,), ("data",)), param_specs="annotations", strict=True).jit()
    with pytest.raises(
        PipelineError, match=r"2 parameters have no partitioning annotation: params\['Dense_0'\]\['bias'\]"
    ):
        pipe.init(jax.random.key(0), batch)


def test_bad_partitioning_options(trainer):
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(PipelineError, match=r"names 'zero'; the sources are \('annotations', 'fsdp'\)"):
        trainer.data_parallel(mesh, param_specs="zero")
    with pytest.raises(PipelineError, match=r"`rules` must be a sequence of \(logical name, mesh axis or None\)"):
        trainer.data_parallel(mesh, param_specs="annotations", rules={"embed": "data"})
    with pytest.raises(PipelineError, match=r"`rules` and `strict` apply to Flax's annotations"):
        trainer.data_parallel(mesh, param_specs="fsdp", strict=True)


def test_an_annotated_dimension_the_mesh_cannot_split(batch):
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dense(6, ("embed", "mlp"))(x)

    pipe = Pipeline(loss).model(Odd(), input="image").optimize(optax.sgd(0.1))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(
        PipelineError, match=r"dimension 1 of `params\['Dense_0'\]\['kernel'\]` has size 6, which mesh axis 'model'"
    ):
        pipe.data_parallel(mesh, param_specs="annotations", rules=RULES).jit().init(jax.random.key(0), batch)


def test_sharding_report_against_the_hand_written_jit(trainer, batch):
    mesh = jax.make_mesh((8,), ("data",))
    pipe = trainer.data_parallel(mesh, param_specs="fsdp").jit()
    state = pipe.init(jax.random.key(0), batch)
    report = sharding_report(pipe, state, batch)
    kernels = (32 * 64 + 64 * 16) * 4
    biases = (64 + 16) * 4
    assert report.param_total_bytes == kernels + biases
    assert report.param_bytes == kernels // 8 + biases  # the kernels split 8 ways, the biases whole
    assert report.opt_state_bytes == 2 * report.param_bytes + 4  # Adam's mu and nu follow them; its int32 count
    assert report.specs["['Dense_0']['kernel'].value"] == P(None, "data")
    shardings = jax.tree.map(lambda x: x.sharding, state)
    mesh = kernel(state).sharding.mesh
    step = trainer.build()

    def step_on_mesh(state, batch):  # what explain() shows: the step between sharding constraints
        state = jax.lax.with_sharding_constraint(state, shardings)
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))
        state, metrics = step(state, batch)
        state = jax.lax.with_sharding_constraint(state, shardings)
        return state, jax.lax.with_sharding_constraint(metrics, NamedSharding(mesh, P()))

    assert report.collectives == collectives(jax.jit(step_on_mesh).lower(state, batch).compile().as_text())
    assert "all-gather" in report.collectives  # each kernel gathered for the forward pass
    assert "params: " not in str(report) and "['Dense_0']['kernel'].value: P(None, 'data')" in str(report)
