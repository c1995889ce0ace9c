"""Spreading a pipeline over the 8 CPU devices: ``.pmap``, ``.shard`` (``jax.shard_map``), ``.jit(mesh=...)``.

Each result is checked against the same computation on one device, and each
built pipeline against the hand-written JAX it stands for (same lowered program).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import Pipeline, PipelineError

DEVICES = 8


def loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)


def example_loss(w, x):
    """The loss of one example (x has no batch axis)."""
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def mean_loss(w, x):
    """The per-device loss averaged over the mesh axis: `jax.grad` then sums the gradient over devices."""
    return jax.lax.pmean(loss(w, x), "data")


def sgd_step(w, x):
    """The classic pmap step: gradients averaged with `pmean` across the axis."""
    grads = jax.lax.pmean(jax.grad(loss)(w, x), "batch")
    return w - 0.1 * grads


def shard_sgd_step(w, x):
    return w - 0.1 * jax.grad(mean_loss)(w, x)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == DEVICES, "the root conftest gives 8 CPU devices"
    return jax.make_mesh((DEVICES,), ("data",))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(32, 5)).astype(np.float32)


def per_device(x):
    return x.reshape(DEVICES, -1, *x.shape[1:])


def normalized(text):
    """Lowered text without the module's name, which carries the Python function's name."""
    return re.sub(r"module @\S+", "module", text)


# --- .pmap ---------------------------------------------------------------------------------------------------------


def mean_grads(w, x):
    return jax.lax.pmean(jax.grad(loss)(w, x), "batch")


def test_pmap_grads_with_pmean_equal_one_device(inputs):
    w, x = inputs
    pipe = Pipeline(mean_grads).pmap(axis_name="batch", in_axes=(None, 0))
    for copy in np.asarray(pipe(w, per_device(x))):  # every device: the gradient of the whole batch
        np.testing.assert_allclose(copy, jax.grad(loss)(w, x), rtol=1e-5, atol=1e-6)
    local = Pipeline(loss).grad().pmap(axis_name="batch", in_axes=(None, 0))  # no pmean: each device's slice
    np.testing.assert_allclose(local(w, per_device(x)).mean(axis=0), jax.grad(loss)(w, x), rtol=1e-5, atol=1e-6)
    assert local.explain() == "jax.pmap(jax.grad(loss), axis_name='batch', in_axes=(None, 0))"


def test_pmap_training_step_equals_one_device(inputs):
    w, x = inputs
    pipe = Pipeline(sgd_step).pmap(axis_name="batch")
    replicated = np.broadcast_to(w, (DEVICES, *w.shape))
    one = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x))
    w_one = w
    for _ in range(3):
        replicated = pipe(replicated, per_device(x))
        w_one = one(w_one, x)
    for copy in np.asarray(replicated):  # every device holds the same parameters
        np.testing.assert_allclose(copy, w_one, rtol=1e-5, atol=1e-6)
    hand = jax.pmap(sgd_step, axis_name="batch")
    assert normalized(pipe.hlo(replicated, per_device(x))) == normalized(
        hand.lower(replicated, per_device(x)).as_text()
    )


def test_pmap_per_example_grads(inputs):
    w, x = inputs
    pipe = Pipeline(example_loss).grad().vmap(in_axes=(None, 0)).pmap(in_axes=(None, 0))
    got = np.asarray(pipe(w, per_device(x))).reshape(len(x), *w.shape)
    np.testing.assert_allclose(got, jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(w, x), rtol=1e-5, atol=1e-6)


# --- .shard (jax.shard_map) ---------------------------------------------------------------------------------------


def test_shard_grads_equal_one_device_and_hand_written(mesh, inputs):
    w, x = inputs
    pipe = Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("data")), out_specs=P()).jit()
    np.testing.assert_allclose(pipe(w, x), jax.grad(loss)(w, x), rtol=1e-5, atol=1e-6)
    auto = Mesh(mesh.devices, ("data",), axis_types=(AxisType.Auto,))
    hand = jax.jit(jax.shard_map(jax.grad(mean_loss), mesh=auto, in_specs=(P(), P("data")), out_specs=P()))
    assert normalized(pipe.hlo(w, x)) == normalized(hand.lower(w, x).as_text())
    assert pipe.explain() == (
        "mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))  # the mesh's devices with Auto axes\n\n"
        "jax.jit(jax.shard_map(jax.grad(mean_loss), mesh=mesh, in_specs=(P(), P('data',)), out_specs=P()))"
    )


@pytest.mark.parametrize("place", [False, True], ids=["numpy", "placed"])
def test_shard_accepts_numpy_and_placed_inputs_on_an_explicit_mesh(mesh, inputs, place):
    assert mesh.axis_types == (AxisType.Explicit,)  # jax.make_mesh's default, which shard_map alone rejects unplaced
    w, x = inputs
    expected = jax.grad(loss)(w, x)
    if place:
        w, x = jax.device_put(w, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("data")))
    pipe = Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("data")), out_specs=P())
    np.testing.assert_allclose(pipe(w, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pipe.jit()(w, x), expected, rtol=1e-5, atol=1e-6)


def test_shard_per_example_grads_stay_split(mesh, inputs):
    w, x = inputs
    # check_vma=False: no device-varying types, so `jax.grad` does not sum a replicated `w`'s gradient over devices
    # (with them, each example's gradient would come back summed with the other devices' examples).
    split = (
        Pipeline(example_loss).grad().vmap(in_axes=(None, 0)).shard(mesh, (P(), P("data")), P("data"), check_vma=False)
    )
    pipe = split.jit()
    got = pipe(w, x)
    np.testing.assert_allclose(got, jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(w, x), rtol=1e-5, atol=1e-6)
    assert got.sharding.spec == P("data")
    assert {shard.data.shape for shard in got.addressable_shards} == {(len(x) // DEVICES, *w.shape)}


def test_shard_training_step_equals_one_device(mesh, inputs):
    w, x = inputs
    pipe = Pipeline(shard_sgd_step).shard(mesh, in_specs=(P(), P("data")), out_specs=P()).jit()
    one = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x))
    w_mesh, w_one = w, w
    for _ in range(3):
        w_mesh, w_one = pipe(w_mesh, x), one(w_one, x)
    np.testing.assert_allclose(w_mesh, w_one, rtol=1e-5, atol=1e-6)


def test_sharded_hlo_and_timing_show_the_per_device_program(mesh, inputs):
    w, x = inputs
    pipe = Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("data")), out_specs=P()).jit()
    compiled = pipe.hlo(w, x, optimized=True)  # XLA's program for one device: a block of 32 / 8 rows
    assert "f32[4,5]" in compiled and "f32[32,5]" not in compiled
    assert "all-reduce" in compiled
    assert "tensor<4x5xf32>" in pipe.hlo(w, x)  # the shard_map body, per device
    timing = pipe.timing(w, x, number=2, repeat=2)
    assert timing.compile is not None and timing.compile > 0 and timing.best > 0


def test_jit_timing_magic_times_a_sharded_pipeline(mesh, inputs):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jaxpipe")
    try:
        w, x = inputs
        pipe = Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("data")), out_specs=P()).jit()
        shell.user_ns.update(pipe=pipe, w=w, x=x)
        result = shell.run_cell("%jit_timing -o -n 2 -r 1 pipe(w, x)")
        assert result.success, result.error_in_exec
        assert result.result.compile > 0 and result.result.best > 0
    finally:
        shell.run_line_magic("unload_ext", "jaxpipe")


# --- .jit(mesh=..., in_shardings=PartitionSpecs) ------------------------------------------------------------------


def test_jit_with_mesh_and_specs_is_jit_with_named_shardings(mesh, inputs):
    w, x = inputs
    pipe = Pipeline(loss).grad().jit(mesh=mesh, in_shardings=(P(), P("data")), out_shardings=P())
    hand = jax.jit(
        jax.grad(loss),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=NamedSharding(mesh, P()),
    )
    got = pipe(w, x)
    np.testing.assert_allclose(got, jax.grad(loss)(w, x), rtol=1e-5, atol=1e-6)
    assert got.sharding == NamedSharding(mesh, P())
    assert pipe.hlo(w, x) == hand.lower(w, x).as_text()
    assert "f32[4,5]" in pipe.hlo(w, x, optimized=True)
    assert pipe.explain() == (
        "mesh = jax.make_mesh((8,), ('data',))\n\n"
        "jax.jit(jax.grad(loss), in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data',))), "
        "out_shardings=NamedSharding(mesh, P()))"
    )
    assert Pipeline(loss).jit().explain() == "jax.jit(loss)"


def test_jit_keeps_named_shardings_given_directly(mesh, inputs):
    w, x = inputs
    data = NamedSharding(mesh, P("data"))
    pipe = Pipeline(example_loss).vmap(in_axes=(None, 0)).jit(in_shardings=(None, data), out_shardings=data)
    got = pipe(w, x)
    assert got.sharding == data
    np.testing.assert_allclose(got, jax.vmap(example_loss, in_axes=(None, 0))(w, x), rtol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_mesh_axis_is_named_with_the_axes_there_are(mesh):
    with pytest.raises(
        PipelineError, match=r"stage 2 \(shard\)(.|\n)*names mesh axis 'batch'(.|\n)*has axes \('data',\)"
    ):
        Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("batch")), out_specs=P())
    with pytest.raises(PipelineError, match=r"`out_specs` names mesh axis 'model'"):
        Pipeline(mean_loss).shard(mesh, in_specs=(P(), P("data")), out_specs=P("model"))
    with pytest.raises(PipelineError, match=r"stage 1 \(jit\)(.|\n)*`in_shardings` names mesh axis 'batch'"):
        Pipeline(loss).jit(mesh=mesh, in_shardings=(P(), P("batch")))
    with pytest.raises(PipelineError, match=r"`axis_names` names 'model'"):
        Pipeline(mean_loss).shard(mesh, in_specs=(P(), P("data")), out_specs=P(), axis_names={"model"})


def test_specs_that_do_not_match_the_arguments(mesh, inputs):
    w, x = inputs
    with pytest.raises(PipelineError, match=r"`in_specs` has 1 entry but `mean_loss` takes 2 positional arguments"):
        Pipeline(mean_loss).shard(mesh, in_specs=(P("data"),), out_specs=P())
    with pytest.raises(PipelineError, match=r"`in_shardings` has 3 entries but `loss` takes 2"):
        Pipeline(loss).jit(mesh=mesh, in_shardings=(P(), P("data"), P()))
    with pytest.raises(
        PipelineError, match=r"P\('data', None, None\) splits 3 dimensions, but `x` has shape \(32, 5\)"
    ):
        Pipeline(mean_loss).shard(mesh, in_specs=(P(), P("data", None, None)), out_specs=P())(w, x)
    with pytest.raises(PipelineError, match=r"has 2 specs but the function was called with 3 arguments"):
        Pipeline(lambda *a: jnp.sum(a[0]), name="f").shard(mesh, in_specs=(P(), P()), out_specs=P())(w, w, w)
    with pytest.raises(PipelineError, match=r"must hold jax.sharding.PartitionSpec values, got str 'data'"):
        Pipeline(mean_loss).shard(mesh, in_specs=(P(), "data"), out_specs=P())
    with pytest.raises(
        PipelineError, match=r"holds PartitionSpecs, which name axes of a mesh, but `.jit\(\)` got no mesh"
    ):
        Pipeline(loss).jit(in_shardings=(P(), P("data")))
    with pytest.raises(PipelineError, match=r"needs a `jax.sharding.Mesh` as `mesh`, got str"):
        Pipeline(mean_loss).shard("data", in_specs=(P(), P("data")), out_specs=P())


def test_a_dimension_the_mesh_cannot_split_evenly(mesh, inputs):
    w, x = inputs
    pipe = Pipeline(mean_loss).grad().shard(mesh, in_specs=(P(), P("data")), out_specs=P()).jit()
    with pytest.raises(
        PipelineError, match=r"dimension 0 of `x` has size 30, which mesh axis 'data' \(8\) cannot split"
    ):
        pipe(w, x[:30])
