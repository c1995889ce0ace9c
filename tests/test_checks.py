"""Argument mistakes of `init`, `fit`, `evaluate` and `TensorBoard`: a PipelineError naming the argument."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError, StageKind, Training
from jaxpipe._plugins.registry import reset
from jaxpipe._training.checks import check_batch_dtypes, check_evaluate_args, check_state

pytestmark = pytest.mark.usefixtures("example_plugin_only")


def linear_loss(params: Any, batch: Any) -> jax.Array:
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


DATA = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.float32)}
PARAMS = {"w": jnp.zeros(3)}


def identity(fn: Any, **options: Any) -> Any:
    del options  # none
    return fn


def _make_params(state: Any, key: jax.Array, batch: Any) -> Any:
    """A model-like share of init: makes parameters when none are given, as the Flax plugin's `.model` does."""
    del key  # deterministic
    made = {"w": jnp.zeros(batch["x"].shape[-1])}
    return state.replace(params=made if state.params is None else state.params)


def _needs_params(state: Any, key: jax.Array, batch: Any) -> Any:
    """An optimizer-like share: reads the parameters, makes none."""
    del key, batch  # only the parameters
    return state.replace(opt_state=jax.tree.map(jnp.zeros_like, state.params))


MODEL = StageKind("fake_model", identity, keeps_signature=True, training=Training(init=_make_params))
OPTIMIZER = StageKind("fake_optimizer", identity, keeps_signature=True, training=Training(init=_needs_params))


# --- init ---------------------------------------------------------------------------------------


def test_init_with_params_and_a_stage_that_makes_them_is_ambiguous() -> None:
    trainer = Pipeline(linear_loss).then(MODEL).then(OPTIMIZER)
    with pytest.raises(PipelineError) as info:
        trainer.init(jax.random.key(0), DATA, params=PARAMS)
    err = info.value
    assert (err.stage, err.stage_name) == (1, "fake_model")
    assert "`init` got `params`, but `.fake_model()` initialises the parameters itself" in str(err)
    assert "state = trainer.init(key, sample_batch)" in str(err)
    assert trainer.init(jax.random.key(0), DATA).params["w"].shape == (3,)  # without params: fine
    given = Pipeline(linear_loss).then(OPTIMIZER).init(jax.random.key(0), DATA, params=PARAMS)  # no maker: fine
    jax.tree.map(np.testing.assert_array_equal, given.params, PARAMS)  # kept (init runs compiled: a copy)


@pytest.fixture
def first_party_plugins(example_plugin_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flax, Optax and Orbax plugins loaded (example_plugin_only resets them after)."""
    del example_plugin_only  # set up first, so this setting wins
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "")
    reset()


@pytest.mark.usefixtures("first_party_plugins")
def test_init_with_params_and_a_flax_model_is_ambiguous() -> None:
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")

    def mse(outputs: jax.Array, batch: Any) -> jax.Array:
        return jnp.mean((outputs[:, 0] - batch["y"]) ** 2)

    trainer = Pipeline(mse).model(nn.Dense(1), input="x").optimize(optax.sgd(0.1))
    with pytest.raises(PipelineError, match=r"stage 1 \(model\)[\s\S]*`init` got `params`, but `.model\(\)`"):
        trainer.init(jax.random.key(0), DATA, params={"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros(1)})


@pytest.mark.parametrize(
    "batch, where, found",
    [
        ({"x": DATA["x"], "label": np.array(["cat"] * 8)}, "sample_batch['label']", "dtype <U3 (str values)"),
        ({"x": DATA["x"], "label": np.array([object()] * 8)}, "sample_batch['label']", "dtype object"),
        ({"x": DATA["x"], "label": ["cat"] * 8}, "sample_batch['label'][0]", "a str 'cat'"),
    ],
)
def test_init_names_a_batch_column_that_is_not_numbers(batch: Any, where: str, found: str) -> None:
    with pytest.raises(TypeError) as info:  # a PipelineTypeError
        Pipeline(linear_loss).then(OPTIMIZER).init(jax.random.key(0), batch, params=PARAMS)
    assert isinstance(info.value, PipelineError)
    assert f"`{where}` is " in str(info.value) and found in str(info.value)
    assert "np.unique(labels, return_inverse=True)" in str(info.value)


# --- the checks the training loop calls ----------------------------------------------------------


def _state(step: Any) -> Any:
    return Pipeline(linear_loss).then(OPTIMIZER).init(jax.random.key(0), DATA, params=PARAMS).replace(step=step)


@pytest.mark.parametrize(
    "step, builtin, expected",
    [
        (-1, ValueError, "`state.step` must be 0 or more"),
        (jnp.asarray(-3, jnp.int32), ValueError, "got -3"),
        (1.5, TypeError, "`state.step` must be a scalar integer"),
        (jnp.asarray(2.0), TypeError, "of dtype float32"),
        (jnp.zeros(2, jnp.int32), TypeError, "must be a scalar integer"),
    ],
)
def test_check_state_refuses_a_negative_or_fractional_step(step: Any, builtin: type, expected: str) -> None:
    with pytest.raises(builtin, match=expected):
        check_state(_state(step))
    check_state(_state(jnp.asarray(5, jnp.int32)))  # a step from a run: fine
    check_state(_state(7))


def test_check_state_refuses_what_is_not_a_state() -> None:
    for wrong in (None, {"params": PARAMS}, PARAMS):
        with pytest.raises(TypeError, match=r"`fit` needs the training state as `state`[\s\S]*trainer.init\("):
            check_state(wrong)


def test_check_batch_dtypes_accepts_numbers() -> None:
    check_batch_dtypes({"x": DATA["x"], "label": np.arange(8), "mask": np.ones(8, bool), "w": jnp.ones(8)})
    check_batch_dtypes((DATA["x"], np.arange(8)))


@pytest.mark.parametrize(
    "data, batch_size, builtin, expected",
    [
        (DATA, 2.5, TypeError, "`batch_size` must be a positive int or None, got float 2.5"),
        (DATA, "8", TypeError, "got str '8'"),
        (DATA, True, TypeError, "got bool True"),
        (DATA, -1, ValueError, "got -1"),
        (DATA, 0, ValueError, "got 0"),
        (None, 8, TypeError, "`evaluate` needs `data` as a dict of arrays"),
        ([DATA["x"], DATA["y"]], 8, TypeError, "got list"),
        ({"x": DATA["x"], "label": np.array(["a"] * 8)}, 8, TypeError, "`data['label']` is an array of dtype <U1"),
    ],
)
def test_check_evaluate_args(data: Any, batch_size: Any, builtin: type, expected: str) -> None:
    with pytest.raises(builtin) as info:
        check_evaluate_args(_state(0), data, batch_size)
    assert isinstance(info.value, PipelineError) and expected in str(info.value)
    with pytest.raises(TypeError, match="`evaluate` needs the training state as `state`, got NoneType None"):
        check_evaluate_args(None, DATA, 8)
    check_evaluate_args(_state(0), DATA, None)
    check_evaluate_args(_state(0), DATA, np.int64(4))


# --- wired into fit and evaluate (by the training loop's owner) ------------------------------------


@pytest.mark.parametrize("batch_size", [2.5, "8", -1, 0])
def test_evaluate_checks_its_arguments(batch_size: Any) -> None:
    trainer = Pipeline(linear_loss).then(OPTIMIZER)
    with pytest.raises(PipelineError, match="`batch_size` must be a positive int or None"):
        jaxpipe.evaluate(trainer, _state(0), DATA, batch_size)


@pytest.mark.parametrize("state, data", [(None, DATA), ("state", None), ("state", [DATA["x"]])])
def test_evaluate_checks_its_state_and_data(state: Any, data: Any) -> None:
    trainer = Pipeline(linear_loss).then(OPTIMIZER)
    with pytest.raises(PipelineError, match="`evaluate` needs"):
        jaxpipe.evaluate(trainer, _state(0) if state == "state" else state, data)


@pytest.mark.usefixtures("first_party_plugins")
def test_fit_checks_the_state_and_the_data() -> None:
    optax = pytest.importorskip("optax")
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.1)).jit()
    state = trainer.init(jax.random.key(0), DATA, params=PARAMS)
    with pytest.raises(PipelineError, match="`state.step` must be 0 or more"):
        trainer.fit(state.replace(step=jnp.asarray(-1, jnp.int32)), DATA, batch_size=4)
    with pytest.raises(PipelineError, match=r"`data\['label'\]` is an array of dtype <U3"):
        trainer.fit(state, {**DATA, "label": np.array(["cat"] * 8)}, batch_size=4)


# --- TensorBoard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("logdir", [None, 123, b"runs"])
def test_tensorboard_needs_a_path(logdir: Any) -> None:
    with pytest.raises(TypeError) as info:
        jaxpipe.TensorBoard(logdir)
    assert isinstance(info.value, PipelineError)
    assert f"`TensorBoard` needs `logdir`, the run's log directory, as a str or path; got {type(logdir).__name__}" in (
        str(info.value)
    )
    assert "jaxpipe.TensorBoard('runs/mnist')" in str(info.value)


def test_tensorboard_refuses_an_empty_logdir_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="`TensorBoard` got an empty `logdir`"):
        jaxpipe.TensorBoard("")
    file = tmp_path / "events.txt"
    file.write_text("not a directory")
    with pytest.raises(PipelineError, match=r"`logdir` '.*events.txt' is an existing file, not a directory"):
        jaxpipe.TensorBoard(file)
    assert jaxpipe.TensorBoard(tmp_path / "new").logdir == str(tmp_path / "new")  # made when a run starts


def test_tensorboard_without_tensorboardx_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(
        PipelineError, match=r"tensorboardX, which is not installed[\s\S]*pip install jaxpipe\[tensorboard\]"
    ):
        jaxpipe.TensorBoard(tmp_path)
