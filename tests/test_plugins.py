"""Plugins found through real entry points: throwaway distributions on sys.path."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import Pipeline, PipelineError, PluginError, PluginWarning, UnknownStageError
from jaxpipe._plugins import plugin_manager, reset
from jaxpipe.cli import plugins_report

FIRST_PARTY = "flax,optax,orbax"  # blocked here: these tests are about the plugin machinery

SCALE_PLUGIN = """
    import functools
    import jaxpipe

    def scale(fn, factor=2.0):
        '''Multiplies the outputs by `factor`.'''
        @functools.wraps(fn)
        def scaled(*args, **kwargs):
            return factor * fn(*args, **kwargs)
        return scaled

    @jaxpipe.hookimpl
    def jaxpipe_register_stages():
        return [jaxpipe.StageKind("scale", scale, jax_name="scaling.scale", keeps_signature=True)]
"""


def stage_plugin(stage: str) -> str:
    """A plugin registering a do-nothing stage called ``stage``."""
    return f"""
    import jaxpipe

    def passthrough(fn):
        return fn

    @jaxpipe.hookimpl
    def jaxpipe_register_stages():
        return [jaxpipe.StageKind({stage!r}, passthrough)]
    """


@pytest.fixture
def install(install: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """conftest's ``install``, with the first-party plugins blocked: these tests are about the machinery."""
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", FIRST_PARTY)
    return install


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(w * x))


W, X = jnp.array([0.5, 1.0, 2.0]), jnp.array([1.0, -1.0, 0.5])


def test_a_plugin_stage_is_a_method_in_dir_and_in_jaxpipe_plugins(install: Any) -> None:
    module = install("scaling", SCALE_PLUGIN)
    pipe = Pipeline(loss).grad().scale(factor=3.0).jit()
    assert "scale" in dir(Pipeline(loss))
    assert repr(pipe) == "Pipeline(loss).grad().scale(factor=3.0).jit()"
    assert pipe.explain() == "jax.jit(scaling.scale(jax.grad(loss), factor=3.0))"
    hand = jax.jit(sys.modules[module].scale(jax.grad(loss), factor=3.0))
    np.testing.assert_array_equal(pipe(W, X), hand(W, X))
    np.testing.assert_allclose(pipe(W, X), 3.0 * jax.grad(loss)(W, X))
    assert pipe.hlo(W, X) == hand.lower(W, X).as_text()
    report = plugins_report()
    assert (
        f"scaling ({module}, jaxpipe-test-scaling 0.1)\n  .scale(factor=2.0)  Multiplies the outputs by `factor`."
        in report
    )
    assert pipe.stages[1].kind.plugin == "scaling"


def test_a_plugin_that_fails_to_import_is_one_warning_and_the_rest_works(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    install("broken", "raise ImportError('needs libfoo 2.0')")
    with pytest.warns(PluginWarning) as caught:
        pipe = Pipeline(loss).scale()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "jaxpipe plugin 'broken'" in message and "ImportError: needs libfoo 2.0" in message
    assert "JAXPIPE_DISABLE_PLUGINS=broken" in message  # how to silence it
    np.testing.assert_allclose(pipe(W, X), 2.0 * loss(W, X))
    assert Pipeline(loss).grad().jit().check_finite()(W, X).shape == (3,)  # the installed example plugin too


def test_a_register_hook_that_raises_is_one_warning(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    install(
        "raising",
        """
        import jaxpipe

        @jaxpipe.hookimpl
        def jaxpipe_register_stages():
            raise RuntimeError("registry offline")
        """,
    )
    with pytest.warns(PluginWarning) as caught:
        assert "scale" in dir(Pipeline(loss))
    assert len(caught) == 1
    assert "'raising' failed in jaxpipe_register_stages" in str(caught[0].message)
    assert "RuntimeError: registry offline" in str(caught[0].message)


def test_a_plugin_returning_something_else_than_stage_kinds_is_skipped(install: Any) -> None:
    install(
        "sloppy",
        """
        import jaxpipe

        @jaxpipe.hookimpl
        def jaxpipe_register_stages():
            return ["scale"]
        """,
    )
    with pytest.warns(PluginWarning, match="returned 'scale', not a jaxpipe.StageKind"):
        dir(Pipeline(loss))


def test_a_misspelt_hook_name_fails_loudly_for_that_plugin_only(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    module = install(
        "typo",
        """
        import jaxpipe

        @jaxpipe.hookimpl
        def jaxpipe_register_stage():  # missing "s"
            return []
        """,
    )
    with pytest.warns(PluginWarning) as caught:
        pm = plugin_manager()
    assert len(caught) == 1
    assert "'typo' implements a hook that jaxpipe does not define" in str(caught[0].message)
    assert "jaxpipe_register_stage" in str(caught[0].message)
    assert not pm.has_plugin("typo") and pm.has_plugin("scaling")
    assert module in sys.modules  # it was imported, then unregistered
    Pipeline(loss).scale()


def test_jaxpipe_disable_plugins_blocks_by_name(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install("scaling", SCALE_PLUGIN)
    blocked = install("heavy", stage_plugin("heavy_stage"))
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", f"{FIRST_PARTY}, heavy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # blocking is silent
        assert "scale" in dir(Pipeline(loss))
        with pytest.raises(UnknownStageError, match="no stage called `heavy_stage`"):
            Pipeline(loss).heavy_stage()
    assert blocked not in sys.modules  # never imported
    assert "blocked by JAXPIPE_DISABLE_PLUGINS: flax, heavy, optax, orbax" in plugins_report()


def test_two_plugins_with_one_stage_name_get_an_error_naming_both(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    install("first", stage_plugin("clip"))
    install("second", stage_plugin("clip"))
    with pytest.raises(PluginError) as info:
        Pipeline(loss).grad().clip()
    err = info.value
    assert set(err.plugins) == {"first", "second"}
    assert (err.stage, err.stage_name) == (2, "clip")
    assert "stage `clip` is registered by " in str(err) and "'first'" in str(err) and "'second'" in str(err)
    assert "JAXPIPE_DISABLE_PLUGINS=" in str(err)
    assert "clip" not in dir(Pipeline(loss))
    report = plugins_report()
    assert "conflict: stage `clip` is registered by first and second" in report or "by second and first" in report
    Pipeline(loss).scale()  # the other plugins are unaffected


def test_a_plugin_cannot_take_a_built_in_name(install: Any) -> None:
    install("shadow", stage_plugin("jit"))
    install("shadow_method", stage_plugin("explain"))
    with pytest.warns(PluginWarning) as caught:
        assert "explain" in dir(Pipeline(loss))
    pipe = Pipeline(loss).then("jit")
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["shadow", "shadow_method"]
    assert pipe.stages[0].kind.plugin == "jaxpipe"
    assert pipe.explain() == "jax.jit(loss)"


def test_plugin_stage_options_are_checked_like_built_ins(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    with pytest.raises(PipelineError) as info:
        Pipeline(loss).scale(factr=2.0)
    assert (info.value.stage, info.value.stage_name) == (1, "scale")
    assert "`.scale()` has no option `factr`. Did you mean `factor`?" in str(info.value)
    assert "Its options are factor=2.0." in str(info.value)


def test_reset_forgets_plugins(install: Any) -> None:
    install("scaling", SCALE_PLUGIN)
    assert "scale" in dir(Pipeline(loss))
    install("later", stage_plugin("scale_again"))  # installed while the process runs
    assert "scale_again" not in dir(Pipeline(loss))  # plugins load once per process ...
    reset()
    assert {"scale", "scale_again"} <= set(dir(Pipeline(loss)))  # ... until reset()


# --- the example plugin (examples/jaxpipe-nancheck), installed and used as a user would ---------------


@pytest.fixture
def first_party_blocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", FIRST_PARTY)
    reset()
    yield
    reset()


def model(params: dict[str, Any], x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sqrt(params["layer"]["w"] * x) + params["b"])


PARAMS = {"layer": {"w": jnp.array([1.0, 4.0])}, "b": jnp.array(0.5)}


@pytest.mark.usefixtures("first_party_blocked")
def test_check_finite_passes_finite_outputs_through_unchanged() -> None:
    pipe = Pipeline(model).grad().jit().check_finite()
    hand = jax.jit(jax.grad(model))
    jax.tree.map(np.testing.assert_array_equal, pipe(PARAMS, jnp.ones(2)), hand(PARAMS, jnp.ones(2)))
    assert pipe.hlo(PARAMS, jnp.ones(2)) == hand.lower(PARAMS, jnp.ones(2)).as_text()  # the program is unchanged
    assert pipe.explain() == "jaxpipe_nancheck.check_finite(jax.jit(jax.grad(model)))"
    assert Pipeline(model).check_finite()(PARAMS, jnp.ones(2)) == model(PARAMS, jnp.ones(2))  # eager works too


@pytest.mark.usefixtures("first_party_blocked")
def test_check_finite_names_the_leaf_holding_a_nan() -> None:
    pipe = Pipeline(model).grad().jit().check_finite()
    bad = {"layer": {"w": jnp.array([1.0, -4.0])}, "b": jnp.array(0.5)}
    with pytest.raises(PipelineError) as info:
        pipe(bad, jnp.ones(2))
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert str(err).startswith("`model` returned 1 NaN in output leaf ['layer']['w'] (float32[2], 2 values).")
    assert "jax_debug_nans" in str(err)
    assert (err.path, err.nan_count, err.inf_count) == ("['layer']['w']", 1, 0)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("first_party_blocked")
def test_check_finite_inf_option() -> None:
    def reciprocal(x: jax.Array) -> jax.Array:
        return 1.0 / x

    with pytest.raises(FloatingPointError, match=r"returned 1 Inf in the output \(float32\[3\], 3 values\)"):
        Pipeline(reciprocal).jit().check_finite()(jnp.array([1.0, 0.0, 2.0]))
    out = Pipeline(reciprocal).jit().check_finite(inf=False)(jnp.array([1.0, 0.0, 2.0]))
    assert np.isinf(out[1])
    with pytest.raises(PipelineError, match="`inf` must be True or False") as info:
        Pipeline(reciprocal).check_finite(inf="no")
    assert (info.value.stage, info.value.stage_name) == (1, "check_finite")


@pytest.mark.usefixtures("first_party_blocked")
def test_check_finite_before_jit_is_refused_when_added_with_where_to_put_it() -> None:
    with pytest.raises(PipelineError) as info:
        Pipeline(model).grad().check_finite()
    assert (info.value.stage, info.value.stage_name) == (2, "check_finite")
    assert "goes after `.jit()`, not before: Pipeline(model).grad().jit().check_finite()." in str(info.value)
    with pytest.raises(PipelineError, match=r"`.check_finite\(\)` .* must be the last stage") as info:
        Pipeline(model).check_finite().jit()  # a transform added after it: refused when added
    assert (info.value.stage, info.value.stage_name) == (2, "jit")
