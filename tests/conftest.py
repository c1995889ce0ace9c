"""Test-session hygiene shared by the test modules."""

from __future__ import annotations

import contextlib
import gc
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jaxpipe._plugins import reset


def pytest_sessionfinish() -> None:
    """Closes the widgets tests made, before interpreter exit would, noisily.

    Widgets made before an in-process nbclient run imported ipykernel belong to
    comm's default manager, but close through ipykernel's afterwards; at exit
    each such ``Widget.__del__`` prints a KeyError. Closing them here, quietly,
    keeps the test log to what the tests say.
    """
    ipywidgets = sys.modules.get("ipywidgets")
    if ipywidgets is None:
        return
    for widget in [obj for obj in gc.get_objects() if isinstance(obj, ipywidgets.Widget)]:
        with contextlib.suppress(KeyError):
            widget.close()
        widget.comm = None  # closed, or its comm's manager is gone: nothing left to close at exit


@pytest.fixture
def example_plugin_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the example plugin (jaxpipe-nancheck) besides the built-ins, loaded afresh, and reset after.

    Use it for a whole module with ``pytestmark = pytest.mark.usefixtures("example_plugin_only")``.
    """
    monkeypatch.setenv("JAXPIPE_DISABLE_PLUGINS", "flax,optax,orbax")
    reset()
    yield
    reset()


# What `pytest -m "not slow"` leaves out (CI runs everything): whole modules that are slow, need a browser
# or start processes, and the slowest tests of the fast modules (measured with --durations; each over about
# a second on 2 CPU cores). Marked here, in one place, so the fast set stays under a minute as a whole.
MODULE_MARKS = {
    "test_browser.py": ("slow", "browser"),
    "test_multiprocess.py": ("slow", "multiprocess"),
    "test_kill_resume.py": ("slow", "multiprocess"),
    "test_whole_programs.py": ("slow", "multiprocess"),
    "test_notebooks.py": ("slow",),
    "test_demo.py": ("slow",),
    "test_reproducibility.py": ("slow",),
    "test_checkpoint.py": ("slow",),
    "test_checkpoint_robust.py": ("slow",),
    "test_checkpoint_best.py": ("slow",),
    "test_data_parallel.py": ("slow",),
    "test_flax_plugin.py": ("slow",),
    "test_beyond_mean_loss.py": ("slow",),
    "test_model_kinds.py": ("slow",),
    "test_grain.py": ("slow", "multiprocess"),
    "test_stop_kernel.py": ("slow",),
    "test_readme.py": ("slow",),
    "test_fit_parts.py": ("slow",),
    "test_train_state.py": ("slow",),
    "test_fit_order.py": ("slow",),
}
SLOW_TESTS = {
    "test_plugin_isolation.py": {"test_a_broken_wrapper_is_one_warning_and_the_wrapped_hooks_answer_unchanged"},
    "test_magics.py": {"test_in_a_kernel_the_magics_show_html_and_the_inspector"},
    "test_optax_plugin.py": {
        "test_legacy_prng_key",
        "test_step_is_the_hand_written_step",
        "test_learning_rate_from_inject_hyperparams",
        "test_multisteps_accumulates_like_hand_written",
    },
    "test_fit.py": {"test_eval_data_gives_accuracy_each_epoch", "test_fit_trains_the_total_epochs_in_keyed_order"},
    "test_sharding.py": {"test_shard_accepts_numpy_and_placed_inputs_on_an_explicit_mesh"},
    "test_public_api.py": {"test_import_jaxpipe_stays_light"},
    "test_spec.py": {"test_fuzzed_text_gives_a_pipeline_or_a_pipeline_error"},
    "test_cli.py": {
        "test_the_library_needs_neither_scikit_learn_nor_matplotlib",
        "test_help_lists_both_commands",
        "test_plugins_reports_a_broken_plugin_and_lists_the_rest",
        "test_bad_usage_exits_2_with_argparse_help",
        "test_plugins_lists_stages_by_plugin_with_readable_signatures",
    },
    "test_prng.py": {"test_flax_dropout_in_apply_and_per_example_grads"},
    "test_pipeline.py": {"test_random_stage_sequences_match_hand_composition"},
    "test_tensorboard.py": {"test_a_run_resumed_after_a_crash_shows_each_step_once"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in MODULE_MARKS.get(item.path.name, ()):
            item.add_marker(getattr(pytest.mark, name))
        if getattr(item, "originalname", item.name) in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """``install(entry_point_name, source)``: a distribution on sys.path with that entry point, as pip would.

    Writes ``<name>-0.1.dist-info/`` (METADATA, entry_points.txt) and the module; returns the module's
    (unique) import name. Plugins load afresh before and after the test.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install_plugin(name: str, source: str) -> str:
        module = f"jaxpipe_test_{name}_{uuid.uuid4().hex[:8]}"
        info = site / f"jaxpipe_test_{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: jaxpipe-test-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[jaxpipe]\n{name} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        return module

    reset()
    yield install_plugin
    reset()
    for module in modules:
        sys.modules.pop(module, None)
