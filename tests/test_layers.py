"""The package's shape: layers that import only downward, no import cycle, no module over 600 lines.

Every import counts: module top level, function bodies and ``TYPE_CHECKING``
blocks alike (``ast.walk``), since a cycle hidden in a function is still a
cycle a reader has to hold in their head.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import jaxpipe

ROOT = pathlib.Path(jaxpipe.__file__).parent
REPO = ROOT.parent

# Bottom to top; a module may import its own layer (without cycles) and the layers below it.
LAYERS = [
    "jaxpipe.errors",
    "jaxpipe._core",
    "jaxpipe.hookspecs",
    "jaxpipe._stages",
    "jaxpipe._plugins",
    "jaxpipe._tools",
    "jaxpipe._prng",
    "jaxpipe._training",
    "jaxpipe._pipeline",
    "jaxpipe.ipython",
    "jaxpipe",
    "jaxpipe.cli",
]


def _modules() -> dict[str, pathlib.Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in ROOT.rglob("*.py")
    }


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> every jaxpipe module it imports anywhere in its body (parent packages are implicit)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                subs = [f"{base}.{alias.name}" for alias in node.names]
                found.update(sub for sub in subs if sub in modules)
                if not all(sub in modules for sub in subs):
                    found.add(base)  # a name defined in the module itself
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    matches = [i for i, top in enumerate(LAYERS) if module == top or module.startswith(top + ".")]
    return max(matches, key=lambda i: len(LAYERS[i]))


def test_every_module_belongs_to_a_layer() -> None:
    for module in _modules():
        assert any(module == top or module.startswith(top + ".") for top in LAYERS), module


def test_imports_only_go_down_the_layers() -> None:
    graph = _imports(_modules())
    upward = [
        f"{module} (layer {LAYERS[_layer(module)]}) imports {dep} (layer {LAYERS[_layer(dep)]})"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if _layer(dep) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_counting_every_import() -> None:
    graph = _imports(_modules())
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join((*path[path.index(name) :], name))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_checker_sees_imports_in_function_bodies_and_type_checking_blocks(tmp_path: pathlib.Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jaxpipe._pipeline import Pipeline\n"
        "def f():\n    from jaxpipe._tools import diagnose\n"
    )
    tree = ast.parse(source)
    seen = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {"jaxpipe._pipeline", "jaxpipe._tools"} <= seen


@pytest.mark.parametrize("folder", ["jaxpipe", "plugins"])
def test_no_module_over_600_lines(folder: str) -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / folder).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 600
    }
    assert not long, long


def test_the_public_surface_is_listed_in_all() -> None:
    public = {name for name in vars(jaxpipe) if not name.startswith("_")} - {
        "load_ipython_extension",
        "unload_ipython_extension",
        # subpackages and modules become attributes of the package when imported
        "errors",
        "hookspecs",
        "ipython",
        "cli",
    }
    assert set(jaxpipe.__all__) == public
    assert all(hasattr(jaxpipe, name) for name in jaxpipe.__all__)
