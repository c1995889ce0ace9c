"""Installed plugins cannot end a run; the pipeline's own and the user's hooks can (rule in hookspecs.py).

Throwaway plugins are real distributions on sys.path, found through their entry points.
"""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import Pipeline, PluginWarning
from jaxpipe._plugins import plugin_manager, reset


def hook_plugin(hook: str, raise_: str, args: str = "run, state, metrics", marker: str = "") -> str:
    """A plugin whose ``hook`` raises ``raise_`` (counting its calls), and whose fit_end records it ran."""
    return f"""
    import jaxpipe
    calls = []
    ends = []

    @jaxpipe.hookimpl{marker}
    def {hook}({args}):
        calls.append(run.step)
        raise {raise_}

    @jaxpipe.hookimpl
    def jaxpipe_fit_end(run, state):
        ends.append(run.step)
    """


def linear_loss(params: Any, batch: Any) -> jax.Array:
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


N, BATCH, EPOCHS = 32, 8, 2  # 4 steps per epoch, 8 in all
X = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
DATA = {"x": X, "y": (X @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


def train(pipe: Pipeline, **kwargs: Any) -> Any:
    state = pipe.init(jax.random.key(0), DATA, params={"w": jnp.zeros(3)})
    return pipe.fit(state, DATA, epochs=EPOCHS, batch_size=BATCH, progress=False, **kwargs)


def reference() -> Any:
    return train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit())


def test_a_raising_fit_step_is_one_warning_and_training_and_saving_go_on(
    install: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = install("flaky", hook_plugin("jaxpipe_fit_step", "ValueError('boom')"))
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "flaky")
    expected = reference()  # the same run without the plugin
    monkeypatch.delenv("JAXPIPE_DISABLE_PLUGINS")
    reset()
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=4).jit()
    with pytest.warns(PluginWarning) as caught:
        final = train(pipe)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'flaky'" in message and "jaxpipe_fit_step" in message and "ValueError: boom" in message
    assert "off for the rest of this run" in message
    plugin = sys.modules[module]
    assert plugin.calls == [1]  # disabled after the first failure
    assert plugin.ends == [EPOCHS * N // BATCH]  # its other hooks still run
    assert int(final.step) == EPOCHS * N // BATCH
    np.testing.assert_array_equal(final.params["w"], expected.params["w"])  # training unaffected
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["4", "8"]  # saving too
    with pytest.warns(PluginWarning):  # a new run gives the hook a new chance
        train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit())
    assert plugin.calls == [1, 1]


def test_a_raising_firstresult_hook_leaves_the_answer_to_the_others(install: Any, tmp_path: Path) -> None:
    flaky = hook_plugin("jaxpipe_fit_resume", "RuntimeError('cannot resume')", "run, state", "(tryfirst=True)")
    install("flaky", flaky)  # asked before the checkpointer
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=4).jit()
    with pytest.warns(PluginWarning, match="jaxpipe_fit_resume"):
        train(pipe)  # saves step 8
    resumed = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=4).jit()
    with pytest.warns(PluginWarning, match="jaxpipe_fit_resume"):
        state = resumed.fit(
            resumed.init(jax.random.key(1), DATA, params={"w": jnp.ones(3)}),
            DATA,
            epochs=EPOCHS,
            batch_size=BATCH,
            progress=False,
        )
    assert int(state.step) == EPOCHS * N // BATCH  # the checkpointer still resumed


def test_system_exit_in_a_hook_or_at_import_is_contained(install: Any) -> None:
    install("exiter", hook_plugin("jaxpipe_fit_start", "SystemExit(3)", "run, state"))
    install("quitter", "import sys\nsys.exit('no')")
    with pytest.warns(PluginWarning) as caught:
        final = reference()
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "'exiter' raised in jaxpipe_fit_start" in messages[0] and "SystemExit: 3" in messages[0]
    assert "'quitter'" in messages[1] and "could not be loaded" in messages[1] and "SystemExit: no" in messages[1]
    assert int(final.step) == EPOCHS * N // BATCH


def test_keyboard_interrupt_in_a_plugin_hook_stops_fit_like_ctrl_c(install: Any, tmp_path: Path) -> None:
    source = """
    import jaxpipe

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(run, state, metrics):
        if run.step == 3:
            raise KeyboardInterrupt
    """
    install("stopper", source)
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=100).jit()
    runs: list[Any] = []

    class Keep:
        @jaxpipe.hookimpl
        def jaxpipe_fit_end(self, run: Any, state: Any) -> None:
            runs.append(run)

    with pytest.warns(PluginWarning, match="KeyboardInterrupt in jaxpipe_fit_step.*fit stops after this step"):
        with pytest.raises(KeyboardInterrupt) as caught:  # like Ctrl-C: raised again once the end hooks saved
            train(pipe, hooks=[Keep()])
    final = caught.value.state
    assert int(final.step) == 3 and runs[0].interrupted
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()] == ["3"]  # the end hooks saved


def test_keyboard_interrupt_after_a_stop_was_asked_for_interrupts_at_once(install: Any) -> None:
    source = """
    import jaxpipe

    @jaxpipe.hookimpl
    def jaxpipe_fit_step(run, state, metrics):
        if run.step == 2:
            raise KeyboardInterrupt  # as a second Ctrl-C landing in this hook would
    """
    install("stopper", source)

    class FirstCtrlC:  # registered for the run, so called before the installed plugin
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            if run.step == 2:
                run.stop()

    with pytest.raises(KeyboardInterrupt):
        train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), hooks=[FirstCtrlC()])


def test_the_users_own_hooks_and_stage_hooks_are_not_isolated(install: Any) -> None:
    class Mine:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            raise ValueError("my bug")

    with pytest.raises(ValueError, match="my bug"):
        train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), hooks=[Mine()])

    failing_save = """
    import jaxpipe

    class Saver:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            raise OSError('disk full')

    def saving(fn):
        return fn

    @jaxpipe.hookimpl
    def jaxpipe_register_stages():
        saver = jaxpipe.Training(run_hooks=lambda options: Saver())
        return [jaxpipe.StageKind('saving', saving, keeps_signature=True, training=saver)]
    """
    install("saver", failing_save)
    reset()  # load it
    with pytest.raises(OSError, match="disk full"):  # a stage's save that fails is never just a warning
        train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).saving().jit())


def test_one_manager_per_process_with_per_run_registration() -> None:
    reset()
    pm = plugin_manager()
    before = set(map(id, pm.get_plugins()))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            seen[self.name].append(id(run))
            if run.step == 1:
                barrier.wait(timeout=30)  # both runs are registered at once from here on

    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    threads = [threading.Thread(target=train, args=(pipe,), kwargs={"hooks": [Recorder(n)]}) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert plugin_manager() is pm
    assert len(seen["a"]) == len(seen["b"]) == EPOCHS * N // BATCH
    assert len(set(seen["a"])) == len(set(seen["b"])) == 1 and seen["a"][0] != seen["b"][0]  # each its own run
    assert set(map(id, pm.get_plugins())) == before  # the run's objects are gone again


def test_a_run_started_inside_a_hook_and_the_run_around_it_keep_their_hooks_apart() -> None:
    seen: dict[str, list[int]] = {"outer": [], "inner": []}
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()

    class Outer:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            seen["outer"].append(run.step)
            if run.step == 2:  # e.g. a hook that fine-tunes a copy: a whole run inside this one
                train(pipe, hooks=[Inner()])

    class Inner:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            seen["inner"].append(run.step)

    train(pipe, hooks=[Outer()])
    steps = list(range(1, EPOCHS * N // BATCH + 1))
    assert seen == {"outer": steps, "inner": steps}


# --- hook wrappers of installed plugins ---------------------------------------------------------------------


WRAPPERS = {
    "raises before its yield": "raise ValueError('boom')\n        yield",
    "raises after its yield": "result = yield\n        raise ValueError('boom')",
    "returns the wrong kind": "yield\n        return 'not a list'",
    "never yields": "return []\n        yield",
    "yields twice": "result = yield\n        yield\n        return result",
    "is no generator": "return []",
}


def wrapper_plugin(hook: str, args: str, body: str, marker: str = "wrapper=True") -> str:
    """A plugin with a ``hook`` wrapper running ``body`` (counting its calls), and a plain fit_end that records."""
    source = f"""
    import jaxpipe
    calls = []
    ends = []

    @jaxpipe.hookimpl({marker})
    def {hook}({args}):
        calls.append(1)
        BODY

    @jaxpipe.hookimpl
    def jaxpipe_fit_end(run, state):
        ends.append(run.step)
    """
    return source.replace("BODY", body)


@pytest.mark.parametrize("body", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_a_broken_wrapper_is_one_warning_and_the_wrapped_hooks_answer_unchanged(
    install: Any, tmp_path: Path, body: str
) -> None:
    expected = reference()
    module = install("wrapping", wrapper_plugin("jaxpipe_fit_step", "run, state, metrics", body))
    reset()  # load it: reference() loaded the plugins before it was installed
    steps: list[int] = []

    class Mine:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            steps.append(run.step)

    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=4).jit()
    with pytest.warns(PluginWarning) as caught:
        final = train(pipe, hooks=[Mine()])
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "'wrapping'" in message and "jaxpipe_fit_step" in message and "off for the rest of this run" in message
    plugin = sys.modules[module]
    assert len(plugin.calls) == 1  # off after the first failure
    assert plugin.ends == [EPOCHS * N // BATCH]  # its other hooks still run
    assert steps == list(range(1, EPOCHS * N // BATCH + 1))  # the wrapped hooks ran every step
    np.testing.assert_array_equal(final.params["w"], expected.params["w"])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["4", "8"]


def test_a_well_behaved_wrapper_still_wraps(install: Any) -> None:
    source = """
    import jaxpipe
    seen = []

    @jaxpipe.hookimpl(wrapper=True)
    def jaxpipe_fit_step(run, state, metrics):
        seen.append(('before', run.step))
        result = yield
        seen.append(('after', run.step))
        return result
    """
    module = install("wrapping", source)
    reference()
    steps = range(1, EPOCHS * N // BATCH + 1)
    assert sys.modules[module].seen == [(when, s) for s in steps for when in ("before", "after")]


ON_ERROR = {
    "re-raises": "yield",
    "raises another": "try:\n            yield\n        except ValueError:\n            raise RuntimeError('mine')",
    "swallows": "try:\n            return (yield)\n        except ValueError:\n            return []",
}


@pytest.mark.parametrize("name", ON_ERROR)
def test_the_wrapped_hooks_error_propagates_unchanged_whatever_the_wrapper_does(install: Any, name: str) -> None:
    install("wrapping", wrapper_plugin("jaxpipe_fit_step", "run, state, metrics", ON_ERROR[name]))
    mine = ValueError("my bug")

    class Mine:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run: Any, state: Any, metrics: Any) -> None:
            raise mine

    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as raised:
        warnings.simplefilter("always")
        train(Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit(), hooks=[Mine()])
    assert raised.value is mine
    plugin_warnings = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert len(plugin_warnings) == (name != "re-raises")
    assert all("'wrapping'" in message for message in plugin_warnings)


def test_a_firstresult_wrapper_returning_the_wrong_kind_keeps_the_wrapped_answer(install: Any, tmp_path: Path) -> None:
    module = install("wrapping", wrapper_plugin("jaxpipe_fit_resume", "run, state", "yield\n        return 'a state'"))
    pipe = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(tmp_path / "ck", every=4).jit()
    with pytest.warns(PluginWarning, match=r"jaxpipe_fit_resume.*a str"):
        train(pipe)  # nothing to resume: the wrapped answer is None, the wrapper's 'a state' is refused
    with pytest.warns(PluginWarning, match=r"jaxpipe_fit_resume.*a str"):
        state = train(pipe)  # the checkpointer's answer (step 8) passes through
    assert int(state.step) == EPOCHS * N // BATCH
    assert len(sys.modules[module].calls) == 2


def test_an_old_style_hookwrapper_that_raises_is_one_warning(install: Any) -> None:
    body = "outcome = yield\n        raise ValueError('boom')"
    install("wrapping", wrapper_plugin("jaxpipe_fit_step", "run, state, metrics", body, "hookwrapper=True"))
    with pytest.warns(PluginWarning) as caught:
        final = reference()
    assert len(caught) == 1 and "raised in jaxpipe_fit_step" in str(caught[0].message)
    assert int(final.step) == EPOCHS * N // BATCH
