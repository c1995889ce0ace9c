"""The IPython extension, driven through a real InteractiveShell: %load_ext, the magics, their errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from jaxpipe import Pipeline, Timing
from jaxpipe._prng import KeyReuseWarning
from jaxpipe._tools.compile_cache import CompileEvents, compilation_cache_dir
from jaxpipe.ipython.magics import JaxpipeMagics

MAGICS = {"line": ["jaxpipe_cache", "jit_timing", "prng_tree"], "cell": ["jaxpipe", "jit_timing"]}

LOSS = "def loss(w, x):\n    return jnp.sum((w * x) ** 2)"


@pytest.fixture
def shell():
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "jaxpipe")
    ip.run_cell("import jax, jax.numpy as jnp\nw = jnp.arange(3.0)\nxs = jnp.ones((4, 3))\n" + LOSS)
    yield ip
    ip.run_line_magic("unload_ext", "jaxpipe")


def run(shell, cell):
    result = shell.run_cell(cell)
    assert result.success, result.error_in_exec or result.error_before_exec
    return result.result


def ours(shell):
    """Our magics by kind, and the JaxpipeMagics instances they belong to."""
    tables = shell.magics_manager.magics
    names = {
        kind: sorted(n for n, f in tables[kind].items() if isinstance(getattr(f, "__self__", None), JaxpipeMagics))
        for kind in ("line", "cell")
    }
    owners = {
        id(f.__self__)
        for kind in tables
        for f in tables[kind].values()
        if isinstance(getattr(f, "__self__", None), JaxpipeMagics)
    }
    registered = [m for m in dict.values(shell.magics_manager.registry) if isinstance(m, JaxpipeMagics)]
    return names, len(owners), len(registered)


# --- load, reload, unload ------------------------------------------------------------------


def test_load_reload_and_unload_leave_each_magic_registered_once(shell):
    callbacks = {name: len(cbs) for name, cbs in shell.events.callbacks.items()}
    assert ours(shell) == (MAGICS, 1, 1)
    for _ in range(2):
        shell.run_line_magic("reload_ext", "jaxpipe")
        assert ours(shell) == (MAGICS, 1, 1)
        assert {name: len(cbs) for name, cbs in shell.events.callbacks.items()} == callbacks
    assert "already loaded" in shell.extension_manager.load_extension("jaxpipe")
    shell.run_line_magic("unload_ext", "jaxpipe")
    assert ours(shell) == ({"line": [], "cell": []}, 0, 0)
    assert "JaxpipeMagics" not in dict.keys(shell.magics_manager.registry)
    shell.run_line_magic("load_ext", "jaxpipe")
    assert ours(shell) == (MAGICS, 1, 1)


def test_unload_gives_back_a_magic_that_loading_shadowed(shell):
    shell.run_line_magic("unload_ext", "jaxpipe")

    def jit_timing(line):
        return f"the user's own {line}"

    shell.register_magic_function(jit_timing, "line", "jit_timing")
    try:
        shell.run_line_magic("load_ext", "jaxpipe")
        assert ours(shell)[0] == MAGICS
        shell.run_line_magic("unload_ext", "jaxpipe")
        assert shell.magics_manager.magics["line"]["jit_timing"] is jit_timing
        assert run(shell, "%jit_timing x") == "the user's own x"
    finally:
        del shell.magics_manager.magics["line"]["jit_timing"]
        shell.run_line_magic("load_ext", "jaxpipe")


# --- %%jaxpipe -----------------------------------------------------------------------------


def test_jaxpipe_cell_binds_the_pipeline_and_shows_it(shell, capsys):
    run(shell, "%%jaxpipe per_example\nloss | grad | vmap(in_axes=(None, 0)) | jit  # per-example gradients")
    out = capsys.readouterr().out
    pipe = shell.user_ns["per_example"]
    assert pipe == Pipeline(shell.user_ns["loss"]).grad().vmap(in_axes=(None, 0)).jit()
    assert "per_example = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()" in out
    assert "jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))" in out
    w, xs = shell.user_ns["w"], shell.user_ns["xs"]
    by_hand = jax.jit(jax.vmap(jax.grad(shell.user_ns["loss"]), in_axes=(None, 0)))
    np.testing.assert_allclose(pipe(w, xs), by_hand(w, xs))
    assert pipe.hlo(w, xs) == by_hand.lower(w, xs).as_text()


def test_jaxpipe_run_shows_output_shapes_timing_and_compiles(shell, capsys):
    run(shell, "%%jaxpipe per_example --run w xs\nloss | grad | vmap(in_axes=(None, 0)) | jit")
    out = capsys.readouterr().out
    assert "per_example(w, xs) -> float32[4, 3]" in out
    assert "XLA compiles: 1" in out
    assert "steady median" in out and "compile" in out
    run(shell, "%%jaxpipe pair --run w 2.0\nloss | value_and_grad | jit")
    assert "pair(w, 2.0) ->\n  [0]: float32[]\n  [1]: float32[3]\n" in capsys.readouterr().out


def test_jaxpipe_spec_error_points_at_the_text(shell, capsys):
    result = shell.run_cell("%%jaxpipe p\nloss\n  | grda | jit")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert err.startswith("UsageError: %%jaxpipe p: line 2, column 5: stage 1 (`grda`): there is no stage called")
    assert "      | grda | jit\n        ^" in err
    assert "p" not in shell.user_ns


def test_rerunning_an_unchanged_cell_compiles_nothing_even_after_redefining_its_function(shell):
    define = "scale = 2.0\n" + LOSS.replace("(w * x)", "scale * (w * x)")
    spec = "%%jaxpipe per_example\nloss | grad | vmap(in_axes=(None, 0)) | jit"
    call = "per_example(w, xs)"

    def cells(*sources):
        with CompileEvents() as events:
            for source in sources:
                value = run(shell, source)
        return value, events

    first, events = cells(define, spec, call)
    assert events.compiles >= 1
    pipe = shell.user_ns["per_example"]
    again, events = cells(define, spec, call)  # a new `loss` object, same code and globals
    assert (events.traces, events.compiles) == (0, 0)
    assert shell.user_ns["per_example"] is pipe
    np.testing.assert_array_equal(again, first)

    changed, events = cells(define.replace("** 2", "** 3"), spec, call)  # different code
    assert events.compiles >= 1
    np.testing.assert_allclose(changed, 3 * 2.0 * np.ones((4, 3)) * np.arange(3.0) ** 2)

    run(shell, define)
    run(shell, spec)
    rescaled, events = cells("scale = 5.0", spec, call)  # a global the function reads
    assert events.compiles >= 1
    np.testing.assert_allclose(rescaled, 2.5 * first)


def test_a_pipeline_traced_under_other_globals_is_not_reused(shell):
    run(shell, "scale = 2.0\ndef f(w):\n    return jnp.sum(scale * w ** 2)")
    run(shell, "%%jaxpipe g\nf | grad | jit")
    run(shell, "scale = 3.0")
    np.testing.assert_allclose(run(shell, "g(w)"), 6.0 * np.arange(3.0))  # traced with scale = 3
    run(shell, "scale = 2.0\ndef f(w):\n    return jnp.sum(scale * w ** 2)")
    run(shell, "%%jaxpipe g\nf | grad | jit")
    np.testing.assert_allclose(run(shell, "g(w)"), 4.0 * np.arange(3.0))


def test_closed_over_values_are_part_of_what_must_be_unchanged(shell):
    run(shell, "def make(c):\n    def f(w):\n        return jnp.sum(c * w)\n    return f")
    with CompileEvents() as events:
        run(shell, "f = make(1.0)")
        run(shell, "%%jaxpipe g\nf | grad | jit")
        np.testing.assert_allclose(run(shell, "g(w)"), np.ones(3))
        run(shell, "f = make(1.0)")
        run(shell, "%%jaxpipe g\nf | grad | jit")
        np.testing.assert_allclose(run(shell, "g(w)"), np.ones(3))
        assert events.compiles == 1
        run(shell, "f = make(5.0)")
        run(shell, "%%jaxpipe g\nf | grad | jit")
        np.testing.assert_allclose(run(shell, "g(w)"), 5.0 * np.ones(3))
        assert events.compiles == 2


# --- %jit_timing -----------------------------------------------------------------------------


def test_jit_timing_times_a_pipeline_stage_by_stage(shell, capsys):
    run(
        shell,
        "per_example = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()".replace(
            "Pipeline", "__import__('jaxpipe').Pipeline"
        ),
    )
    timing = run(shell, "%jit_timing -o -n 7 -r 3 per_example(w, xs)")
    assert isinstance(timing, Timing)
    assert all(value > 0 for value in (timing.trace, timing.lower, timing.compile, timing.first_call))
    assert timing.best > 0
    assert (timing.number, timing.repeat) == (7, 3)
    assert timing.notes == (
        "Timed on a fresh copy of the pipeline, so trace, lower and compile are measured on purpose; "
        "calling the pipeline itself reuses the program it compiled before.",
    )
    out = capsys.readouterr().out
    assert "steady best of 3x7" in out and "trace" in out


def test_jit_timing_reports_a_recompilation_with_jax_explanation(shell):
    run(shell, "per_example = __import__('jaxpipe').Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()")
    run(shell, "%jit_timing -n 1 -r 1 per_example(w, xs)")
    timing = run(shell, "%jit_timing -o -n 1 -r 1 per_example(w, jnp.ones((5, 3)))")
    notes = "\n".join(timing.notes)
    assert "recompiled, because the arguments differ from the last timed call: argument 1: " in notes
    assert "float32[4, 3] -> float32[5, 3]" in notes
    assert "JAX's explanation:\nTRACING CACHE MISS:" in notes
    assert "now f32[5,3] and before f32[4,3]" in notes
    same = run(shell, "%jit_timing -o -n 1 -r 1 per_example(w, jnp.ones((5, 3)))")
    assert same.notes == ()


def test_jit_timing_on_a_jitted_function_says_when_its_times_came_from_the_cache(shell):
    run(shell, "f = jax.jit(loss)")
    cold = run(shell, "%jit_timing -o -n 1 -r 1 f(w, w)")
    assert cold.notes == () and cold.compile > 0
    warm = run(shell, "%jit_timing -o -n 1 -r 1 f(w, w)")
    assert "came from JAX's caches" in warm.notes[0]
    static = run(shell, "%jit_timing -o -n 1 -r 1 f(w, jnp.ones(3, jnp.int32))")
    notes = "\n".join(static.notes)
    assert "argument 1: float32[3] -> int32[3]" in notes and "now i32[3] and before f32[3]" in notes
    back = run(shell, "%jit_timing -o -n 1 -r 1 f(w, w)")
    assert "JAX had compiled for these already" in "\n".join(back.notes)


def test_jit_timing_cell_runs_the_setup_then_times_the_last_line(shell):
    timing = run(shell, "%%jit_timing -o -n 2 -r 2\nf = jax.jit(loss)\nbig = jnp.ones((8, 3))\nf(w, big)")
    assert timing.compile > 0 and (timing.number, timing.repeat) == (2, 2)
    assert shell.user_ns["big"].shape == (8, 3)


def test_jit_timing_of_an_eager_function_says_it_runs_op_by_op(shell):
    run(shell, "g = __import__('jaxpipe').Pipeline(loss).grad()")
    for call, name in (("loss(w, w)", "loss"), ("g(w, w)", "Pipeline(loss).grad()")):
        timing = run(shell, f"%jit_timing -o -n 1 -r 1 {call}")
        assert (timing.trace, timing.lower, timing.compile) == (None, None, None)
        assert f"`{name}` is not jitted, so it runs op by op" in timing.notes[0]


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, message",
    [
        ("%jit_timing", "%jit_timing needs a call such as `step(state, batch)`"),
        ("%jit_timing 1 +", "cannot read `1 +`"),
        ("%jit_timing x = 3", "cannot read `x = 3`"),
        ("%jit_timing w", "needs a call such as `step(state, batch)`, got `w`"),
        ("%jit_timing -n 0 loss(w, w)", "-n and -r must be at least 1"),
        ("%jit_timing -r x loss(w, w)", "argument -r/--repeat: invalid int value: 'x'"),
        ("%jit_timing nothing(w)", "`nothing` failed: NameError"),
        ("%jit_timing loss(w, missing)", "`missing` failed: NameError"),
        ("%jit_timing w(1)", "`w` is a ArrayImpl, not a function"),
        ("%jit_timing loss(w, 'open)", "No closing quotation"),
        ("%%jit_timing loss(w, w)\nloss(w, w)", "takes the call on the cell's last line"),
        ("%%jit_timing\nx = 1", "needs a call such as `step(state, batch)` on the cell's last line"),
        ("%prng_tree", "%prng_tree needs a call"),
        ("%prng_tree key +", "cannot read `key +`"),
        ("%prng_tree missing(w)", "`missing` failed: NameError"),
        ("%jaxpipe_cache bogus", "invalid choice: 'bogus'"),
        ("%jaxpipe_cache off /tmp", "takes no directory"),
        ("%%jaxpipe 1p\nloss | jit", "'1p' is not a valid Python name"),
        ("%%jaxpipe\nloss | jit", "the following arguments are required: name"),
        ("%%jaxpipe p --run missing\nloss | jit", "name `missing` is not defined"),
        ("%%jaxpipe p --run print(6*7)\nloss | jit", "a call (only stages may be called in a spec)"),
        ("%%jaxpipe p --run print\nloss | jit", "name `print` is not defined. Python's builtins are not"),
        ("%%jaxpipe loss\nloss | grad | jit", "would rebind `loss`, which the spec starts from"),
    ],
)
def test_bad_arguments_give_a_one_line_usage_error_and_the_shell_carries_on(shell, capsys, cell, message):
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert err.startswith("UsageError: %") and err.count("\n") == 1, err
    assert message in err
    assert run(shell, "1 + 1") == 2


@pytest.mark.parametrize(
    "cell, message",
    [
        ("%%jaxpipe p\nexec | debug", "name `exec` is not defined. Python's builtins are not looked up"),
        ("%%jaxpipe p\nexit | debug", "name `exit` is not defined"),  # IPython's own names are not the user's
        ("%%jaxpipe p\nget_ipython | jit", "name `get_ipython` is not defined"),
        ("%%jaxpipe p\n_ | jit", "name `_` is private"),
    ],
)
def test_a_spec_names_only_the_notebooks_own_public_variables(shell, capsys, cell, message):
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, UsageError)
    assert message in capsys.readouterr().err
    ipython_exit = shell.user_ns["exit"]
    shell.user_ns["exit"] = shell.user_ns["loss"]  # rebound by the user: now it is theirs
    try:
        run(shell, "%%jaxpipe p\nexit | grad")
        assert shell.user_ns["p"] == Pipeline(shell.user_ns["loss"]).grad()
    finally:
        shell.user_ns["exit"] = ipython_exit


def test_prng_tree_shows_the_key_tree_and_returns_it(shell, capsys):
    run(shell, "def draws(key):\n    return jax.random.normal(key, (2,)) + jax.random.uniform(key, (2,))")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeyReuseWarning)  # the tree shown lists the reuse: no warning as well
        run(shell, "%prng_tree draws(jax.random.key(0))")
        out = capsys.readouterr().out
        tree = run(shell, "%prng_tree -o draws(jax.random.key(0))")
    assert len(tree.reuses) == 1
    assert str(tree) in out and out.count("is drawn from twice") == 1
    run(
        shell,
        "def split_first(key):\n    a, b = jax.random.split(key)\n"
        "    return jax.random.normal(a, (2,)) + jax.random.uniform(b, (2,))",
    )
    keys = {"key": jax.random.PRNGKey(1)}  # a legacy key, passed as a keyword through **
    shell.user_ns["keys"] = keys
    assert run(shell, "%prng_tree -o split_first(**keys)").reuses == []
    assert run(shell, "%prng_tree split_first(jax.random.key(2))") is None
    assert "no reuse" in capsys.readouterr().out


# --- %jaxpipe_cache ---------------------------------------------------------------------------


def test_jaxpipe_cache_stores_compiled_programs_and_serves_an_identical_function(shell, tmp_path, capsys):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    x = jnp.arange(5.0)
    run(shell, f"%jaxpipe_cache on {tmp_path}")
    try:
        assert compilation_cache_dir() == tmp_path
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        assert f"persistent compilation cache: on, in {tmp_path} (0 files" in capsys.readouterr().out
        with CompileEvents() as events:
            jax.jit(lambda v: jnp.cos(v) * 3.0)(x).block_until_ready()
        assert (events.compiles, events.persistent_misses) == (1, 1)
        with CompileEvents() as events:  # redefined, identical: traced again, not compiled
            jax.jit(lambda v: jnp.cos(v) * 3.0)(x).block_until_ready()
        assert (events.traces, events.compiles, events.persistent_hits) == (1, 0, 1)
        run(shell, "%jaxpipe_cache")
        assert "(1 files" in capsys.readouterr().out
    finally:
        run(shell, "%jaxpipe_cache off")
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    assert capsys.readouterr().out == "persistent compilation cache: off\n"


# --- in a Jupyter kernel ------------------------------------------------------------------------


def test_in_a_kernel_the_magics_show_html_and_the_inspector(tmp_path):
    import nbclient
    import nbformat

    cells = [
        "%load_ext jaxpipe\nimport jax, jax.numpy as jnp\n" + LOSS + "\nw = jnp.arange(3.0)",
        "%%jaxpipe g\nloss | grad | jit",
        "%jit_timing -n 2 -r 2 g(w, w)",
        "%prng_tree jax.random.normal(jax.random.key(0), (2,))",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [[output.get("data", {}) for output in cell.outputs] for cell in notebook.cells]
    assert any("application/vnd.jupyter.widget-view+json" in data for data in outputs[1])  # the inspector
    (timing,) = outputs[2]
    assert "class='jaxpipe-timing'" in timing["text/html"] and "steady median" in timing["text/plain"]
    (tree,) = outputs[3]
    assert "jaxpipe-prng-tree" in tree["text/html"] and "no reuse" in tree["text/plain"]
