"""Sphinx configuration: the jaxpipe site, built from the code, the README and the example notebooks.

Build (warnings are errors; no network is used):

    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages that repeat nothing by hand are generated here at each build, into folders git ignores:
``readme/`` (README.md split at its ``##`` headings), ``examples/`` (the notebooks, executed, and the example
scripts), ``api/generated/`` (``jaxpipe.__all__`` and the first-party plugins' stages).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# This checkout first, for autodoc and for the kernel that runs the notebooks (it inherits the environment).
_paths = [str(ROOT), str(ROOT / "plugins"), str(ROOT / "demo")]
sys.path[:0] = _paths
os.environ["PYTHONPATH"] = os.pathsep.join([*_paths, *filter(None, [os.environ.get("PYTHONPATH")])])

import jaxpipe  # noqa: E402  (after the path above)

project = "jaxpipe"
author = "jaxpipe developers"
copyright = "jaxpipe developers"  # noqa: A001  (Sphinx's name)
release = version = jaxpipe.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",  # Markdown (MyST) pages and notebooks
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "readme/intro.md"]  # intro: included by index.md
html_theme = "furo"
html_title = f"jaxpipe {release}"

# Docstrings are Google style; signatures keep their types, shown unqualified (TrainState, not its private module).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
python_use_unqualified_type_names = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # README's "#beyond-the-mean-loss" style links

# The notebooks are stored without outputs: run them at each build (about 25 s on 2 CPU cores), and fail the
# build if a cell fails.
nb_execution_mode = "force"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True


# --- README.md, split at its `##` headings -----------------------------------------------------------------------

# Where README's repository-relative links point on the site (a page; "/" is this folder). A new link to a path that is
# not here fails the build, so it is mapped rather than broken.
README_LINKS = {
    "BENCHMARKS.md": "/benchmarks.md",
    "CONTRIBUTING.md": "/contributing.md",
    "jaxpipe/hookspecs.py": "/api/hookspecs.md",
    "plugins": "/api/generated/plugins.rst",
    "examples/jaxpipe-nancheck": "/examples/jaxpipe-nancheck.md",
}


def _readme_link(target: str) -> str:
    if re.match(r"[a-z]+:|#", target):  # a URL or an anchor in the page
        return target
    if target in README_LINKS:
        return README_LINKS[target]
    if target.startswith("examples/") and target.endswith((".ipynb", ".py")):
        return f"/examples/{Path(target).stem}.{'ipynb' if target.endswith('.ipynb') else 'md'}"
    raise ValueError(f"README.md links to {target!r}: add where it goes on the site to README_LINKS in {__file__}")


def _relink(text: str, where: Callable[[str], str]) -> str:
    return re.sub(r"\]\(([^)\s]+)\)", lambda m: f"]({where(m.group(1))})", text)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower().replace("`", "")).strip("-")


def write_readme_pages(out: Path) -> None:
    """``readme/intro.md`` (before the first ``##``) and one page per ``##`` section, its headings raised a level."""
    text = _relink((ROOT / "README.md").read_text(), _readme_link)
    sections: list[tuple[str, list[str]]] = [("intro", [])]
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            sections.append((line[3:].strip(), [f"# {line[3:].strip()}"]))
        elif not fence and line.startswith("###"):
            sections[-1][1].append(line[1:])
        else:
            sections[-1][1].append(line)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for number, (title, lines) in enumerate(sections):  # numbered: index.md's toctree globs them in README's order
        name = "intro" if number == 0 else f"{number:02d}-{_slug(title)}"
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")


# --- The examples: notebooks (executed at build) and scripts ------------------------------------------------------


def write_example_pages(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    examples = ROOT / "examples"
    for notebook in sorted(examples.glob("*.ipynb")):
        shutil.copy(notebook, out / notebook.name)
    for script in sorted(examples.glob("*.py")):
        summary = _module_summary(script)
        (out / f"{script.stem}.md").write_text(
            f"# `examples/{script.name}`\n\n{summary}\n\n"
            f"```{{literalinclude}} ../../examples/{script.name}\n:language: python\n```\n"
        )
    nancheck = (examples / "jaxpipe-nancheck" / "README.md").read_text()
    (out / "jaxpipe-nancheck.md").write_text(
        _relink(nancheck, lambda target: {"../../README.md": "/index.md"}.get(target, target)) + "\n\n"
        "## `jaxpipe_nancheck/__init__.py`\n\n"
        "```{literalinclude} ../../examples/jaxpipe-nancheck/jaxpipe_nancheck/__init__.py\n:language: python\n```\n\n"
        "## `pyproject.toml`\n\n"
        "```{literalinclude} ../../examples/jaxpipe-nancheck/pyproject.toml\n:language: toml\n```\n"
    )


def _module_summary(path: Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(path.read_text())) or ""


# --- The API reference: jaxpipe.__all__ and the first-party plugins -----------------------------------------------

PLUGINS = ("jaxpipe_flax", "jaxpipe_optax", "jaxpipe_orbax")


def write_api_pages(out: Path) -> None:
    import inspect

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    groups: dict[str, list[str]] = {"Pipeline": [], "Training": [], "Stages and plugins": [], "Tools": []}
    errors, functions = [], []
    for name in jaxpipe.__all__:
        value = getattr(jaxpipe, name)
        if inspect.isclass(value) and issubclass(value, BaseException | Warning):
            errors.append(name)
        elif inspect.isclass(value):
            groups[_group(value)].append(name)
        elif inspect.isfunction(value):
            functions.append(name)
    lines = [
        "jaxpipe",
        "=======",
        "",
        ".. automodule:: jaxpipe",
        "   :no-members:",
        "",
        "Every name in ``jaxpipe.__all__``, generated from its docstring.",
        "",
        ".. currentmodule:: jaxpipe",
        "",
    ]
    for title, names in groups.items():
        lines += [title, "-" * len(title), ""]
        for name in names:
            lines += [f".. autoclass:: {name}", ""]
    lines += ["Functions", "---------", ""]
    lines += [f".. autofunction:: {name}\n" for name in functions]
    lines += [
        ".. py:decorator:: hookimpl",
        "",
        "   Marks a plugin's hook implementation (pluggy's ``HookimplMarker(\"jaxpipe\")``); the hooks are in",
        "   :doc:`../hookspecs`.",
        "",
    ]
    lines += ["Errors and warnings", "-------------------", ""]
    lines += [f".. autoexception:: {name}\n" for name in errors]
    (out / "jaxpipe.rst").write_text("\n".join(lines) + "\n")

    plugin_lines = [
        "First-party plugins",
        "===================",
        "",
        "The Flax, Optax and Orbax stages, registered through the ``jaxpipe`` entry-point group like any",
        "third-party plugin. Each stage becomes a :class:`~jaxpipe.Pipeline` method; its options are the",
        "stage function's parameters after ``fn``.",
        "",
    ]
    for module_name in PLUGINS:
        module = __import__(module_name)
        plugin_lines += [f"``{module_name}``", "-" * (len(module_name) + 4), ""]
        plugin_lines += [f".. automodule:: {module_name}", ""]
        plugin_lines += [".. currentmodule:: jaxpipe", ""]
        for kind in module.jaxpipe_register_stages():
            plugin_lines += _stage_directive(kind)
    (out / "plugins.rst").write_text("\n".join(plugin_lines) + "\n")


def _group(cls: type) -> str:
    module = cls.__module__
    if module.startswith("jaxpipe._pipeline"):
        return "Pipeline"
    if module.startswith(("jaxpipe._training", "jaxpipe._core.state", "jaxpipe._core.run")):
        return "Training"
    if module.startswith("jaxpipe._core.stage"):
        return "Stages and plugins"
    return "Tools"


def _stage_directive(kind: object) -> list[str]:
    """``Pipeline.<stage>(options)``, documented from the stage function's docstring."""
    import inspect

    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    signature = kind.signature  # type: ignore[attr-defined]
    plain = signature.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    doc = GoogleDocstring(inspect.getdoc(kind.apply) or kind.doc, Config(napoleon_use_param=True)).lines()  # type: ignore[attr-defined]
    body = [f"   {line}" if line else "" for line in doc]
    return [f".. py:method:: Pipeline.{kind.name}{plain}", "", *body, ""]  # type: ignore[attr-defined]


def _generate(app: object) -> None:
    write_readme_pages(DOCS / "readme")
    write_example_pages(DOCS / "examples")
    write_api_pages(DOCS / "api" / "generated")


def setup(app: object) -> None:
    app.connect("builder-inited", _generate)  # type: ignore[attr-defined]
