"""The public side of the PRNG analysis: the key tree, its nodes and reuses, and ``key_tree``."""

from __future__ import annotations

import dataclasses
import html
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jaxpipe._core.protocol import PipelineLike
from jaxpipe._prng.analysis import Analysis
from jaxpipe._prng.nodes import KeyNode, KeyReuse, KeyReuseWarning
from jaxpipe._prng.render import html_list, text_rows
from jaxpipe._prng.values import Context, key_elements
from jaxpipe.errors import PipelineError


@dataclasses.dataclass
class KeyTree:
    """The keys of one traced call: ``roots`` (each a :class:`KeyNode` tree) and ``reuses``.

    ``str(tree)`` draws it as text (``├─ └─``), ``_repr_html_`` as nested lists in
    a notebook; keys that differ only in their label (``[0]`` … ``[7]``) share a line.
    """

    name: str
    roots: list[KeyNode]
    reuses: list[KeyReuse]

    def nodes(self) -> Iterator[KeyNode]:
        """Every node, depth first, in the order the program made them."""
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def summary(self) -> str:
        draws = sum(node.kind == "consume" for node in self.nodes())
        found = f"{len(self.reuses)} reuse{'s' * (len(self.reuses) != 1)}" if self.reuses else "no reuse"
        return (
            f"PRNG keys of {self.name}: {len(self.roots)} root{'s' * (len(self.roots) != 1)}, "
            f"{draws} draw{'s' * (draws != 1)}, {found}"
        )

    def __str__(self) -> str:
        lines = [self.summary(), *(prefix + text for _, prefix, text, _ in text_rows(self.roots))]
        lines.extend(f"⚠ {reuse.message}" for reuse in self.reuses)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        reuses = "".join(f"<li>⚠ {html.escape(reuse.message)}</li>" for reuse in self.reuses)
        return (
            '<div class="jaxpipe-prng-tree" style="font-family:monospace">'
            f"<div><b>{html.escape(self.summary())}</b></div>"
            f"{html_list(text_rows(self.roots))}"
            + (f'<ul style="list-style:none;padding-left:0;color:#b00020">{reuses}</ul>' if reuses else "")
            + "</div>"
        )


def key_tree(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> KeyTree:
    """Traces ``fn(*args, **kwargs)`` and returns its PRNG key tree; warns on each reuse.

    Array arguments (``jax.Array``, NumPy) are traced; other arguments (Python
    numbers, strings, modules) stay static, as ``fn`` sees them. A
    :class:`~jaxpipe.Pipeline` is traced through its built function.

    Raises:
      PipelineError: ``fn`` is not callable.
    """
    __tracebackhide__ = True
    if not callable(fn):
        raise PipelineError(
            f"`key_tree` needs a function and its arguments, got {type(fn).__name__} {fn!r}.\n"
            f"Pass the function and the arguments separately, e.g. key_tree(f, key), not key_tree(f(key))."
        )
    name = _name_of(fn)
    leaves = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    treedef = jax.tree_util.tree_structure((args, kwargs))
    traced = [i for i, (_, leaf) in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]

    def call(*arrays: Any) -> Any:
        values = [leaf for _, leaf in leaves]
        for i, array in zip(traced, arrays, strict=True):
            values[i] = array
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, values)
        return fn(*call_args, **call_kwargs)

    if len(traced) == len(leaves):
        closed = jax.make_jaxpr(fn)(*args, **kwargs)  # the same trace, and JAX caches it for `fn`
    else:
        closed = jax.make_jaxpr(call)(*(leaves[i][1] for i in traced))
    names = _argument_names(fn, len(args))
    analysis = Analysis()
    inputs = [
        analysis.argument(_path_text(leaves[i][0], names), leaves[i][1], var.aval)
        for i, var in zip(traced, closed.jaxpr.invars, strict=True)
    ]
    outputs = analysis.call(closed, inputs, Context())
    for out in outputs:
        for elem in key_elements(out):
            for node, _ in elem.alts:
                node.returned = True
    tree = KeyTree(name, analysis.roots, analysis.reuses)
    for reuse, (file, line) in zip(analysis.reuses, analysis.reuse_places, strict=True):
        message = f"PRNG key reuse in {name}: {reuse.message}"
        if file is not None and line is not None:
            warnings.warn_explicit(message, KeyReuseWarning, file, line)
        else:
            warnings.warn(message, KeyReuseWarning, stacklevel=2)
    return tree


def _name_of(fn: Any) -> str:
    if isinstance(fn, PipelineLike):  # its stages too, as the pipeline reads in code
        return repr(fn)
    return getattr(fn, "__name__", None) or type(fn).__name__


def _argument_names(fn: Any, count: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())  # a Pipeline has its function's
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(count):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def _path_text(path: Sequence[Any], names: list[str]) -> str:
    """``((args, kwargs), path)`` → ``"state.key"``, ``"rngs['dropout']"``."""
    top, index, *rest = path
    if top.idx == 0:
        head = names[index.idx]
    else:
        head = str(index.key)
    return head + jax.tree_util.keystr(tuple(rest))
