"""The ``jaxpipe`` console script, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

JAXPIPE = Path(sys.executable).parent / "jaxpipe"  # the console script pip installed


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(JAXPIPE), *args], capture_output=True, text=True, check=check, env={**os.environ, **(env or {})}
    )


def run_env(**changes: str) -> dict[str, str]:
    return {**os.environ, **changes}


def test_plugins_lists_stages_by_plugin_with_readable_signatures(tmp_path: Path) -> None:
    info = tmp_path / "jaxpipe_cli_probe-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jaxpipe-cli-probe\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[jaxpipe]\nprobe = jaxpipe_cli_probe\n")
    (tmp_path / "jaxpipe_cli_probe.py").write_text(
        textwrap.dedent(
            """
            import jaxpipe

            def shard_batch(fn, mesh, axis: str = "data", *, donate: bool = False):
                '''Splits the batch over a mesh axis.'''
                return fn

            @jaxpipe.hookimpl
            def jaxpipe_register_stages():
                return [jaxpipe.StageKind("shard_batch", shard_batch)]

            @jaxpipe.hookimpl
            def jaxpipe_fit_start(run, state):
                pass
            """
        )
    )
    out = run("plugins", env={"PYTHONPATH": str(tmp_path), "JAXPIPE_DISABLE_PLUGINS": "orbax"}).stdout
    groups = {block.splitlines()[0]: block.splitlines()[1:] for block in out.split("\n\n")}
    builtin = "\n".join(groups["jaxpipe (built-in stages)"])
    assert re.search(r"^  \.vmap\(in_axes=0, out_axes=0, axis_name=None, \.\.\.\)  +Vectorizes", builtin, re.M)
    assert re.search(r"^  \.grad\(argnums=0, has_aux=False, \.\.\.\) +Gradient \(`jax.grad`\)\.$", builtin, re.M)
    assert re.search(
        r"^  \.jit\(static_argnums=None, static_argnames=None, donate_argnums=None, .*\.\.\.\)$", builtin, re.M
    )
    assert "  .debug()" in builtin and "  .scan(steps, unroll=1)" in builtin
    assert ": '" not in out and "int |" not in out  # no type annotations anywhere
    probe = groups["probe (jaxpipe_cli_probe, jaxpipe-cli-probe 0.3)"]
    assert probe == [
        "  .shard_batch(mesh, axis='data', donate=False)  Splits the batch over a mesh axis.",
        "  (hooks)                                        jaxpipe_fit_start",
    ]
    nancheck = groups["nancheck (jaxpipe_nancheck, jaxpipe-nancheck 0.1.0)"]
    assert nancheck[0].startswith("  .check_finite(inf=True)  Raises NonFiniteError")
    assert not any(title.startswith("orbax") for title in groups)
    assert out.rstrip().splitlines()[-1] == "blocked by JAXPIPE_DISABLE_PLUGINS: orbax"


def test_plugins_reports_a_broken_plugin_and_lists_the_rest(tmp_path: Path) -> None:
    info = tmp_path / "jaxpipe_cli_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jaxpipe-cli-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[jaxpipe]\nbroken = jaxpipe_cli_broken\n")
    (tmp_path / "jaxpipe_cli_broken.py").write_text("import a_module_that_is_not_installed\n")
    result = run("plugins", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0
    assert "skipped: jaxpipe plugin 'broken' (jaxpipe_cli_broken) could not be loaded" in result.stdout
    assert "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'" in result.stdout
    assert ".check_finite(inf=True)" in result.stdout


def test_help_lists_both_commands() -> None:
    out = run("--help").stdout  # `jaxpipe demo` itself runs in tests/test_demo.py
    assert re.search(r"^    plugins +list plugins and the stages they add$", out, re.M)
    assert re.search(r"^    demo +build, explain, run and time", out, re.M)


@pytest.mark.parametrize(
    ("args", "message"), [((), "the following arguments are required"), (("fly",), "invalid choice")]
)
def test_bad_usage_exits_2_with_argparse_help(args: tuple[str, ...], message: str) -> None:
    result = run(*args, check=False)
    assert result.returncode == 2 and message in result.stderr and "usage: jaxpipe" in result.stderr


def test_help_texts_are_plain_text_and_the_demo_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    from jaxpipe.cli import main

    outs = {}
    for args in (("--help",), ("plugins",), ("demo", "--help"), ("plugins", "--help")):
        try:
            assert main(list(args)) == 0
        except SystemExit as done:  # argparse's --help
            assert done.code == 0
        outs[args] = out = capsys.readouterr().out
        assert "``" not in out and not re.search(r":(func|class|mod|meth|attr):`", out), (args, out)
    demo = outs[("demo", "--help")]
    assert "trains an MLP on scikit-learn's bundled 8x8" in demo
    assert re.search(r"--quick +fewer timing rounds", demo)
    assert "pip install -e '.[demo]'" in demo


def test_the_library_needs_neither_scikit_learn_nor_matplotlib() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("scikit-learn", "matplotlib"))]
    assert sorted(d.split(">")[0] for d in project["optional-dependencies"]["demo"]) == ["matplotlib", "scikit-learn"]
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = sys.modules['matplotlib'] = None  # as if not installed\n"
        "import jaxpipe, jaxpipe.cli, jaxpipe_flax, jaxpipe_optax, jaxpipe_orbax, jax, optax\n"
        "from jaxpipe import Pipeline\n"
        "import jaxpipe.ipython.magics\n"
        "def loss(w, x):\n    return ((w * x) ** 2).sum()\n"
        "trainer = Pipeline(loss).optimize(optax.sgd(0.1)).jit()\n"
        "batch = {'x': jax.numpy.ones(3)}\n"
        "state = trainer.init(jax.random.key(0), batch, params=jax.numpy.ones(3))\n"
        "print(jaxpipe.cli.main(['plugins']) == 0)\n"
        "sys.exit(jaxpipe.cli.main(['demo']))\n"
    )
    demo = str(Path(__file__).resolve().parent.parent / "demo")  # where an editable install finds jaxpipe_demo
    path = os.pathsep.join(p for p in (demo, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env(PYTHONPATH=path))
    assert done.returncode == 2, done.stderr
    assert "True" in done.stdout
    assert done.stderr.startswith("jaxpipe demo needs scikit-learn and matplotlib, which the `demo` extra installs.")
    assert ".venv/bin/pip install -e '.[demo]'" in done.stderr
