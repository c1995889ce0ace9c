"""The stage abstraction: declared properties instead of names, one fold that places errors,
the Pipeline as a wrapper, and equal pipelines sharing their compiled step."""

from __future__ import annotations

import inspect
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpipe
from jaxpipe import CompileEvents, Pipeline, PipelineError, PluginError, StageKind, Training
from jaxpipe._plugins import reset

pytestmark = pytest.mark.usefixtures("example_plugin_only")


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(w * x) ** 2)


W, X = jnp.arange(3.0), jnp.linspace(0.0, 1.0, 3)


def identity(fn: Any) -> Any:
    return fn


# --- PipelineError.at: a new located error, the original untouched ----------------------


def test_at_returns_a_located_copy_and_leaves_the_original_as_it_was() -> None:
    err = PluginError("it broke", plugins=("a", "b"), stage_name="clip")
    located = err.at(3, "clip", "Pipeline(f).grad().clip()")
    assert str(located) == "stage 3 (clip) of Pipeline(f).grad().clip():\nit broke"
    assert type(located) is PluginError and located.plugins == ("a", "b")
    assert (located.stage, located.stage_name, located.detail) == (3, "clip", "it broke")
    assert str(err) == "it broke" and err.stage is None


def test_within_places_a_stage_error_known_only_by_name() -> None:
    pipe = Pipeline(loss).grad().vmap(in_axes=(None, 0))
    err = PipelineError("bad axes", stage_name="vmap").within(pipe)
    assert (err.stage, err.pipeline) == (2, repr(pipe))
    unknown = PipelineError("elsewhere", stage_name="scan")
    assert unknown.within(pipe) is unknown


# --- declared properties, not names ------------------------------------------------------


def test_a_stage_declared_last_refuses_stages_after_it_whatever_its_name() -> None:
    finale = StageKind("finale", identity, keeps_signature=True, last=True)
    with pytest.raises(PipelineError, match=r"(?s)stage 2 \(jit\).*`\.jit\(\)` comes after `\.finale\(\)`"):
        Pipeline(loss).then(finale).jit()


def test_scan_steps_come_from_the_declared_steps_per_call() -> None:
    from jaxpipe._core.steps import scan_steps

    twice = StageKind("twice", lambda fn, k: fn, steps_per_call=lambda options: options["k"])
    assert scan_steps(Pipeline(loss).then(twice, k=3)) == 3
    assert scan_steps(Pipeline(loss).scan(5)) == 5
    assert scan_steps(Pipeline(loss).jit()) == 1


def test_data_parallel_refuses_to_follow_any_stage_that_compiles_whatever_its_name() -> None:
    mesh = jax.make_mesh((1,), ("data",))
    compiled = StageKind("my_jit", jax.jit, "jax.jit", keeps_signature=True, compiles=True)
    with pytest.raises(PipelineError, match=r"comes after `\.my_jit\(\)`"):
        Pipeline(loss).then(compiled).data_parallel(mesh)


def test_explain_sees_the_stage_context_like_check() -> None:
    seen: list[Any] = []

    def explain(ctx: jaxpipe.StageContext, inner: str, options: dict[str, Any]) -> str:
        seen.append((ctx.fn_name, [s.name for s in ctx.stages], ctx.signature, ctx.wrapped()))
        return f"spy({inner})"

    spy = StageKind("spy", identity, keeps_signature=True, explain=explain)
    pipe = Pipeline(loss).grad().then(spy)
    assert pipe.explain() == "spy(jax.grad(loss))"
    ((name, before, signature, wrapped),) = seen
    assert (name, before, signature) == ("loss", ["grad"], inspect.signature(loss))
    np.testing.assert_array_equal(wrapped(W, X), jax.grad(loss)(W, X))


# --- one fold: every walk numbers and places errors the same way ---------------------------


def test_build_places_a_rejected_option_at_its_stage() -> None:
    def refuse(fn: Any, level: int = 0) -> Any:
        raise ValueError(f"level {level} is too high")

    kind = StageKind("refuse", refuse, "refuse")
    with pytest.raises(PipelineError, match=r"(?s)stage 2 \(refuse\) of .*level 3 is too high") as info:
        Pipeline(loss).grad().then(kind, level=3).build()
    assert isinstance(info.value.__cause__, ValueError)


def test_init_places_a_stage_share_error_at_its_stage() -> None:
    def share(state: Any, key: Any, batch: Any, **options: Any) -> Any:
        raise PipelineError("no parameters here", stage_name="share")

    kind = StageKind("share", identity, keeps_signature=True, training=Training(init=share))
    pipe = Pipeline(loss).jit().then(kind)
    with pytest.raises(PipelineError, match=r"stage 2 \(share\)") as info:
        pipe.init(jax.random.key(0), {"x": X})
    assert info.value.detail == "no parameters here"


# --- the Pipeline as a wrapper ------------------------------------------------------------


def test_a_pipeline_is_a_proper_wrapper_of_its_function() -> None:
    pipe = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    assert pipe.__wrapped__ is loss and pipe.__name__ == "loss"
    assert inspect.signature(pipe) == inspect.signature(loss)
    assert Pipeline(loss, name="objective").__name__ == "objective"
    unknown = Pipeline(loss).then(StageKind("reshape", identity))  # may change the arguments: not claimed
    assert list(inspect.signature(unknown).parameters) == ["args", "kwargs"]


def test_with_fn_keeps_the_stages_and_name_around_another_function() -> None:
    def other(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.cos(w * x))

    pipe = Pipeline(loss, name="objective").grad().jit()
    derived = pipe.with_fn(other)
    assert derived.fn is other and derived.stages == pipe.stages and derived.name == "objective"
    np.testing.assert_allclose(derived(W, X), jax.jit(jax.grad(other))(W, X))
    with pytest.raises(PipelineError, match="needs a function"):
        pipe.with_fn(3)  # type: ignore[arg-type]


# --- equal pipelines share their compiled step --------------------------------------------


def _make() -> Pipeline:
    return Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()


def test_equal_pipelines_share_their_compiled_step() -> None:
    xs = jnp.ones((4, 3))
    first = _make()
    with CompileEvents() as events:
        first(W, xs)
    assert events.compiles == 1
    with CompileEvents() as events:
        again, copy = _make(), Pipeline(first)
        np.testing.assert_array_equal(again(W, xs), first(W, xs))
        np.testing.assert_array_equal(copy(W, xs), first(W, xs))
    assert (events.traces, events.compiles) == (0, 0)
    assert again.build() is first.build() and type(first.build()) is type(jax.jit(loss))
    with CompileEvents() as events:
        Pipeline(loss).grad().vmap(in_axes=(0, 0)).jit()(jnp.ones((4, 3)), xs)
    assert events.compiles == 1  # a different program compiles, of course


def test_a_stage_that_keeps_the_program_shares_the_step_and_warns_once_when_called_directly() -> None:
    hint = "Use `fit`, or `trainer.save(state)` in a loop written by hand."
    saver = StageKind("saver", identity, keeps_signature=True, keeps_program=True, training=Training(outside_fit=hint))
    xs = jnp.ones((5, 3))
    plain = _make()
    plain(W, xs)
    saving = plain.then(saver)
    assert saving.build() is plain.build()
    with CompileEvents() as events, pytest.warns(UserWarning, match=r"(?s)stage 4 \(saver\).*trainer\.save") as record:
        saving(W, xs)
        saving(W, xs)
    assert events.compiles == 0 and len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain(W, xs)  # no such stage: no warning


def test_adding_a_checkpoint_compiles_nothing_new_and_a_direct_call_points_at_fit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "")
    reset()
    step = _make()
    step(W, jnp.ones((2, 3)))
    saving = step.checkpoint(tmp_path / "run")
    assert saving.build() is step.build()  # still the jax.jit object
    with CompileEvents() as events, pytest.warns(UserWarning, match=r"trainer\.fit.*trainer\.save\(state\)") as record:
        saving(W, jnp.ones((2, 3)))
        saving(W, jnp.ones((2, 3)))
    assert events.compiles == 0 and len(record) == 1
    assert not (tmp_path / "run").exists()  # nothing was written: the warning says so


def test_optax_explains_by_what_the_stage_before_is_not_by_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    optax = pytest.importorskip("optax")
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "flax,orbax")
    reset()

    class Trainable:  # a jaxpipe.TrainLoss made by some other plugin's stage
        def __init__(self, loss: Any) -> None:
            self.loss = loss

        def __call__(self, params: Any, batch: Any, model_state: Any = None) -> jax.Array:
            return self.loss(params, batch)

        def train(self, params: Any, batch: Any, key: jax.Array, model_state: Any) -> Any:
            return self.loss(params, batch), ({}, model_state)

    def explain(ctx: jaxpipe.StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
        return "def anything_but_model_loss(...): ...", "anything_but_model_loss"

    trainable = StageKind("trainable", Trainable, explain=explain)
    assert isinstance(Trainable(loss), jaxpipe.TrainLoss)
    with_model = Pipeline(loss).then(trainable).optimize(optax.sgd(0.1)).explain()
    plain = Pipeline(loss).optimize(optax.sgd(0.1)).explain()
    assert "jax.value_and_grad(anything_but_model_loss, has_aux=True)" in with_model and "dropout_key" in with_model
    assert "has_aux" not in plain and "dropout_key" not in plain
