"""Pins the public surface of ``jaxpipe`` (as optax's ``optax_test.py`` does).

Adding a public name? Add it to ``PUBLIC`` below, under its kind; removing or
renaming one breaks users, so the test makes it a deliberate change.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pluggy

import jaxpipe
from jaxpipe import hookspecs

PUBLIC: dict[str, set[str]] = {
    "classes": {
        "CompileEvents",
        "Cost",
        "EarlyStopping",
        "FitRun",
        "History",
        "KeyTree",
        "Memory",
        "ParamSummary",
        "Pipeline",
        "ShardingReport",
        "Stage",
        "StageContext",
        "StageKind",
        "TensorBoard",
        "Timing",
        "Training",
        "TrainLoss",
        "TrainState",
    },
    "errors": {
        "KeyReuseWarning",
        "NonFiniteError",
        "PipelineError",
        "PluginError",
        "PluginWarning",
        "SpecError",
        "UnknownStageError",
    },
    "functions": {
        "after_step_kind",
        "clear_caches",
        "disable_compilation_cache",
        "enable_compilation_cache",
        "evaluate",
        "fit",
        "key_tree",
        "load_ipython_extension",
        "loss_and_metrics",
        "param_summary",
        "sharding_report",
        "split_init_key",
        "unload_ipython_extension",
    },
    "plugin markers": {"hookimpl"},
}

PUBLIC_MODULES = {"errors", "hookspecs"}  # documented modules; the rest start with "_"

# What `import jaxpipe` must not import: each costs 0.1-0.3 s and is needed only by some features.
HEAVY = ("flax", "orbax", "IPython", "ipywidgets", "matplotlib", "sklearn", "tensorboardX", "grain")


def public_names() -> set[str]:
    return {name for name, value in vars(jaxpipe).items() if not name.startswith("_") and not inspect.ismodule(value)}


def test_public_names_are_pinned() -> None:
    expected = set().union(*PUBLIC.values())
    added, removed = public_names() - expected, expected - public_names()
    assert not added, f"new public names {sorted(added)}: add them to PUBLIC in {__file__}"
    assert not removed, f"public names gone: {sorted(removed)}"


def test_each_name_has_its_kind() -> None:
    for name in PUBLIC["classes"]:
        assert inspect.isclass(getattr(jaxpipe, name)), name
    for name in PUBLIC["errors"]:
        assert issubclass(getattr(jaxpipe, name), Exception | Warning), name
    for name in PUBLIC["functions"]:
        assert inspect.isfunction(getattr(jaxpipe, name)), name
        assert getattr(jaxpipe, name).__doc__, f"{name} needs a docstring"
    assert isinstance(jaxpipe.hookimpl, pluggy.HookimplMarker) and jaxpipe.hookimpl.project_name == "jaxpipe"


def test_public_objects_come_from_jaxpipe_and_are_documented() -> None:
    for name in set().union(*PUBLIC.values()) - PUBLIC["plugin markers"]:
        value = getattr(jaxpipe, name)
        assert value.__module__.startswith("jaxpipe"), name
        assert inspect.getdoc(value), f"{name} needs a docstring"


def test_public_modules() -> None:
    modules = {n for n, v in vars(jaxpipe).items() if isinstance(v, types.ModuleType) and not n.startswith("_")}
    assert modules <= PUBLIC_MODULES | {"ipython", "cli"}  # the last two load on use


def test_errors_subclass_builtins() -> None:
    assert issubclass(jaxpipe.PipelineError, ValueError)
    assert issubclass(jaxpipe.UnknownStageError, jaxpipe.PipelineError)
    assert issubclass(jaxpipe.UnknownStageError, AttributeError)  # hasattr() and tab completion
    assert issubclass(jaxpipe.PluginError, jaxpipe.PipelineError)
    assert issubclass(jaxpipe.PluginWarning, UserWarning)
    assert jaxpipe.errors.PipelineError is jaxpipe.PipelineError


def test_hookspecs_are_the_plugin_authors_manual() -> None:
    specs = {n: f for n, f in vars(hookspecs).items() if hasattr(f, "jaxpipe_spec")}
    assert "jaxpipe_register_stages" in specs
    for name, spec in specs.items():
        assert name.startswith("jaxpipe_")
        assert len(inspect.getdoc(spec) or "") > 40, f"{name} needs a docstring for plugin authors"


def test_pipeline_fit_and_init_show_the_training_functions_parameters() -> None:
    from jaxpipe._training import init as training_init

    for method, fn in [(jaxpipe.Pipeline(abs).fit, jaxpipe.fit), (jaxpipe.Pipeline(abs).init, training_init.init)]:
        shown, real = inspect.signature(method).parameters, inspect.signature(fn).parameters
        assert list(shown) == list(real)[1:], f"{method.__name__} should list {fn.__name__}'s parameters but `pipe`"
        assert all(shown[name].kind == real[name].kind and shown[name].default == real[name].default for name in shown)
        doc = inspect.getdoc(method) or ""
        assert doc.splitlines()[0] == (inspect.getdoc(fn) or "").splitlines()[0], "the docstring is the function's"
        assert "pipe:" not in doc and "state" in doc
    fit_params = inspect.signature(jaxpipe.Pipeline(abs).fit).parameters
    assert {"state", "data", "epochs", "batch_size", "eval_data", "log_every", "hooks", "resume"} <= set(fit_params)
    assert not any(p.kind is p.VAR_KEYWORD for p in fit_params.values()), "no **options: the real parameters"
    assert inspect.signature(jaxpipe.Pipeline.fit).parameters["state"].annotation is jaxpipe.TrainState
    assert jaxpipe.Pipeline.fit.__qualname__ == "Pipeline.fit"


def test_the_notebook_helpers_keep_their_documented_paths() -> None:
    from jaxpipe.ipython.display import show_tree  # README, examples/inspector.ipynb
    from jaxpipe.ipython.widgets import show_inspector

    assert inspect.getdoc(show_tree) and inspect.getdoc(show_inspector)


def test_version_matches_the_installed_distribution() -> None:
    assert jaxpipe.__version__ == importlib.metadata.version("jaxpipe")


def test_typed_package() -> None:
    assert (Path(jaxpipe.__file__).parent / "py.typed").exists()


def test_import_jaxpipe_stays_light() -> None:
    code = f"import sys, jaxpipe; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == [], f"`import jaxpipe` imported {out.split()}: import them where they are used"
