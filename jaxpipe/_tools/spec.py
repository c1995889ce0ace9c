"""Pipelines as text: ``loss | grad | vmap(in_axes=(None, 0)) | jit``.

A spec is the function's name, then stages separated by ``|``, each a stage name
with optional arguments, exactly as the fluent methods take them. The text is
parsed with :mod:`ast` and walked by hand; it is never evaluated, so nothing in
it runs. Names resolve only to the namespace's own public variables (a
notebook's variables; no builtins such as ``exec``, no ``_private`` names).
A dotted name (``jnp.tanh``, ``model.apply``) reads only what provably runs no
code: a module's variables, an object's own ``__dict__`` entries, and methods or
plain values defined on its class; properties, other descriptors and
``__getattr__`` fallbacks are refused (see :func:`static_attribute`). The only
calls are stages, looked up in the stage registry like
``Pipeline.then(name, ...)``, so plugin stages work as in Python. Stage
arguments are Python literals (numbers, strings, ``None``, tuples, lists,
dicts) or names.

>>> from jaxpipe import Pipeline
>>> def loss(w, x):
...     return (w * x) ** 2
>>> pipe = Pipeline.from_spec("loss | grad | vmap(in_axes=(None, 0)) | jit", {"loss": loss})
>>> pipe == Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
True
>>> pipe.to_spec()
'loss | grad | vmap(in_axes=(None, 0)) | jit'
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import difflib
import keyword
import math
import re
import types
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jaxpipe.errors import PipelineError

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike

MAX_CHARS = 10_000
"""Longest spec accepted; a pipeline is a line or a few, not a program."""
MAX_DEPTH = 20
"""Deepest nesting of tuples, lists and dicts in a stage argument."""
EXAMPLE = "loss | grad | vmap(in_axes=(None, 0)) | jit"
_FILENAME = "<jaxpipe spec>"  # what ast.parse reports; tests audit compile events by it
_LITERALS = (bool, int, float, complex, str, bytes, type(None))


class SpecError(PipelineError):
    """A pipeline spec that cannot be read, or names and stages it cannot resolve.

    The message starts with the line and column (both 1-based), shows the line
    with a caret under the fault and says what was expected.

    Attributes:
      line, column: where in the text the fault is.

    Examples:
      Failing::

          Pipeline.from_spec("loss | grad | vmap(in_axes=(None 0))", ns)

      raises ``SpecError: line 1, column 30: invalid syntax. Perhaps you forgot
      a comma?``; fixed::

          Pipeline.from_spec("loss | grad | vmap(in_axes=(None, 0))", ns)
    """

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        line: int | None = None,
        column: int = 1,
        stage: int | None = None,
        stage_name: str | None = None,
        pipeline: str | None = None,
    ) -> None:
        first, _, rest = message.partition("\n")
        lines = text.split("\n")
        shown = [first if line is None else f"line {line}, column {column}: {first}"]
        if line is not None and 1 <= line <= len(lines) and lines[line - 1].strip():
            source = "".join(c if c.isprintable() else "?" for c in lines[line - 1].rstrip())
            shown += [f"    {source}", "    " + " " * (column - 1) + "^"]
        super().__init__("\n".join(shown + ([rest] if rest else [])))
        self.line, self.column, self.detail = line, column, message
        self.stage, self.stage_name, self.pipeline = stage, stage_name, pipeline


@dataclasses.dataclass(frozen=True)
class Name:
    """A name in the text, resolved in the namespace when the pipeline is built."""

    path: tuple[str, ...]
    line: int
    column: int

    def __str__(self) -> str:
        return ".".join(self.path)


@dataclasses.dataclass(frozen=True)
class StageCall:
    """``name`` or ``name(args, key=value)`` after a ``|``."""

    name: str
    args: tuple[Any, ...]
    options: tuple[tuple[str, Any], ...]
    line: int
    column: int


@dataclasses.dataclass(frozen=True)
class Spec:
    """The parsed text: the function's name and the stages, not yet resolved."""

    text: str
    source: Name
    stages: tuple[StageCall, ...]


# --- parsing --------------------------------------------------------------------


class _Reader:
    """Turns the text's syntax tree into a :class:`Spec`, or a SpecError."""

    def __init__(self, text: str) -> None:
        self.text = text.replace("\r\n", "\n").replace("\r", "\n")  # as Python reads line ends
        self.lines = self.text.split("\n")

    def fail(self, message: str, node: ast.AST | None = None, *, at: tuple[int, int] | None = None) -> SpecError:
        """A SpecError at ``node`` (or ``at``, a line and column)."""
        line, column = at or self.position(node)
        line = min(max(line, 1), len(self.lines))
        column = min(max(column, 1), len(self.lines[line - 1]) + 1)  # Python may count from a joined line
        return SpecError(message, text=self.text, line=line, column=column)

    def position(self, node: ast.AST | None) -> tuple[int, int]:
        if node is None:
            return 1, 1
        line = getattr(node, "lineno", 1)
        offset = getattr(node, "col_offset", 0)
        wrapped = ("[" if line == 1 else "") + (self.lines[line - 1] if line <= len(self.lines) else "")
        column = len(wrapped.encode()[:offset].decode(errors="replace")) - (line == 1)  # ast counts bytes
        return line, column + 1

    def expression(self) -> ast.expr:
        """The one expression in the text."""
        # Wrapping in [ ... ] lets a spec span lines; the reader checks that the
        # brackets added are the outermost pair.
        try:
            with warnings.catch_warnings():  # e.g. "invalid escape sequence": the reader reports what matters
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ast.parse("[" + self.text + "\n]", filename=_FILENAME, mode="eval")
        except SyntaxError as err:
            raise self.syntax_error(err) from None
        except (RecursionError, MemoryError):
            raise self.fail(f"the spec is nested too deeply to read; write it as `{EXAMPLE}`") from None
        except ValueError as err:  # e.g. integers too long to convert
            raise self.fail(f"{err}") from None
        body = tree.body
        if not isinstance(body, ast.List):
            raise self.fail(f"the brackets do not balance; a spec is one expression such as `{EXAMPLE}`", body)
        if not body.elts:
            raise self.fail(f"the spec is empty; expected a pipeline such as `{EXAMPLE}`")
        if len(body.elts) > 1:
            raise self.fail(
                "expected one pipeline, found a comma; separate stages with `|`, e.g. `loss | grad | jit`",
                body.elts[1],
            )
        return body.elts[0]

    def parse(self) -> Spec:
        parts = self.split_stages(self.expression())
        source = self.name(parts[0], "the function to transform (a name such as `loss` or `model.apply`)")
        stages = tuple(self.stage(part) for part in parts[1:])
        return Spec(self.text, source, stages)

    def syntax_error(self, err: SyntaxError) -> SpecError:
        message = err.msg
        if "null bytes" in message:
            index = self.text.find("\x00")
            line = self.text.count("\n", 0, index) + 1
            return self.fail(message, at=(line, index - self.text.rfind("\n", 0, index)))
        line, column = err.lineno or 1, max((err.offset or 1) - (err.lineno == 1), 1)
        if line > len(self.lines):  # past the end: the error is at the closing bracket added
            line, column = len(self.lines), len(self.lines[-1]) + 1
            opened = re.search(r"opening parenthesis '(.)'", message)
            if opened:
                closer = {"(": ")", "[": "]", "{": "}"}[opened.group(1)]
                message = f"`{opened.group(1)}` is never closed; expected `{closer}`"
            else:
                message = "the spec ends too early; expected a stage after `|`, or a value"
        else:
            closing = re.match(r"closing parenthesis '(.)' does not match", message)
            if closing:
                message = f"`{closing.group(1)}` does not match the bracket it closes"
        return self.fail(f"{message}\nA spec looks like `{EXAMPLE}`.", at=(line, column))

    def split_stages(self, node: ast.expr) -> list[ast.expr]:
        parts = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            parts.append(node.right)
            node = node.left
        parts.append(node)
        return parts[::-1]

    def name(self, node: ast.expr, what: str) -> Name:
        path = []
        start = node
        while isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise self.fail(
                    f"private attribute `{node.attr}` is not allowed in a spec; bind it to a public name first",
                    node,
                )
            path.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            raise self.fail(f"expected {what}, got {self.describe(start)}", start)
        path.append(node.id)
        return Name(tuple(path[::-1]), *self.position(start))

    def stage(self, node: ast.expr) -> StageCall:
        what = "a stage such as `jit` or `vmap(in_axes=0)` after `|`"
        if isinstance(node, ast.Name):
            return StageCall(node.id, (), (), *self.position(node))
        func = node.func if isinstance(node, ast.Call) else node
        if isinstance(func, ast.Attribute):
            raise self.fail(f"expected {what}; a stage is a bare name, got {self.describe(func)}", func)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise self.fail(f"expected {what}, got {self.describe(node)}", node)
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.fail("`*` unpacking is not allowed in a spec; write the arguments out", arg)
            args.append(self.value(arg, 0))
        options = []
        for item in node.keywords:
            if item.arg is None:
                raise self.fail("`**` unpacking is not allowed in a spec; write the options out", item)
            options.append((item.arg, self.value(item.value, 0)))
        return StageCall(node.func.id, tuple(args), tuple(options), *self.position(node))

    def value(self, node: ast.expr, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"stage arguments may nest at most {MAX_DEPTH} levels deep", node)
        if isinstance(node, ast.Constant) and isinstance(node.value, _LITERALS):
            return node.value
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float, complex)
        ):
            number: Any = node.operand.value
            return -number if isinstance(node.op, ast.USub) else number
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.value(item, depth + 1) for item in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            if any(key is None for key in node.keys):
                raise self.fail("`**` unpacking is not allowed in a spec; write the entries out", node)
            keys = [self.value(key, depth + 1) for key in node.keys if key is not None]
            values = [self.value(value, depth + 1) for value in node.values]
            return _DictValue(tuple(zip(keys, values, strict=True)), *self.position(node))
        if isinstance(node, (ast.Name, ast.Attribute)):
            return self.name(node, "a name")
        raise self.fail(
            f"stage arguments are Python literals such as 0, 'mean', None or (None, 0), or names; "
            f"got {self.describe(node)}",
            node,
        )

    def describe(self, node: ast.AST) -> str:
        kind = {
            ast.Call: "a call (only stages may be called in a spec)",
            ast.Lambda: "a lambda (define the function in Python and use its name)",
            ast.Subscript: "an indexing expression (bind the item to a name first)",
            ast.BinOp: "an arithmetic expression",
            ast.Constant: "a literal",
            ast.Attribute: "a dotted name",
        }.get(type(node), f"an expression ({type(node).__name__})")
        segment = ast.get_source_segment("[" + self.text + "\n]", node) if hasattr(node, "lineno") else None
        return f"{kind} `{segment}`" if segment and len(segment) <= 40 else kind


@dataclasses.dataclass(frozen=True)
class _DictValue:
    """A dict literal whose keys may be names, resolved with the namespace."""

    items: tuple[tuple[Any, Any], ...]
    line: int
    column: int


def parse(text: str) -> Spec:
    """Reads a spec without resolving its names; raises SpecError for bad text."""
    if not isinstance(text, str):
        raise SpecError(f"a spec is a str such as {EXAMPLE!r}, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise SpecError(
            f"the spec is {len(text):,} characters long; at most {MAX_CHARS:,} are read. "
            f"Build large pipelines in Python with `Pipeline(...)`."
        )
    if not text.strip():
        raise SpecError(f"the spec is empty; expected a pipeline such as `{EXAMPLE}`")
    return _Reader(text).parse()


# --- resolving names and building -------------------------------------------------


def from_spec(text: str, namespace: Mapping[str, Any], pipeline_type: type[Any]) -> Any:
    """The ``pipeline_type`` (``jaxpipe.Pipeline``) the text describes, with names looked up in ``namespace``.

    The type is passed in, not imported, so this tool stays below the ``Pipeline`` layer.
    """
    Pipeline = pipeline_type
    spec = parse(text)
    text = spec.text  # line ends as Python reads them, for the error messages
    if not isinstance(namespace, Mapping):
        raise SpecError(f"`from_spec` looks names up in a mapping such as globals(), got {type(namespace).__name__}")
    fn = resolve(spec.source, namespace, text)
    dotted = str(spec.source)
    if _is(fn, Pipeline):  # not isinstance: that would read a __class__ property of fn
        pipe = fn
    else:
        try:
            name = None if getattr(fn, "__name__", None) == dotted else dotted
            pipe = Pipeline(fn, name=name)
        except PipelineError as err:
            raise _at(spec.source, text, f"`{dotted}` is not a function: {err.detail}") from err
    for number, call in enumerate(spec.stages, len(pipe.stages) + 1):
        args = [resolve(arg, namespace, text) for arg in call.args]
        options = {key: resolve(value, namespace, text) for key, value in call.options}
        try:
            pipe = pipe.then(call.name, *args, **options)
        except Exception as err:
            detail = err.detail if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}"
            raise SpecError(
                f"stage {number} (`{call.name}`): {detail}",
                text=text,
                line=call.line,
                column=call.column,
                stage=number,
                stage_name=call.name,
                pipeline=repr(pipe),
            ) from err
    return pipe


def value(text: str, namespace: Mapping[str, Any]) -> Any:
    """One literal or name, read as a stage argument is (``%%jaxpipe --run`` uses it)."""
    if len(text) > MAX_CHARS:
        raise SpecError(f"the value is {len(text):,} characters long; at most {MAX_CHARS:,} are read")
    reader = _Reader(text)
    return resolve(reader.value(reader.expression(), 0), namespace, reader.text)


def resolve(value: Any, namespace: Mapping[str, Any], text: str = "") -> Any:
    """``value`` with each :class:`Name` replaced by the object it names."""
    if isinstance(value, Name):
        return _lookup(value, namespace, text)
    if isinstance(value, tuple):
        return tuple(resolve(item, namespace, text) for item in value)
    if isinstance(value, list):
        return [resolve(item, namespace, text) for item in value]
    if isinstance(value, _DictValue):
        result = {}
        for key, item in value.items:
            key = resolve(key, namespace, text)
            try:
                result[key] = resolve(item, namespace, text)
            except TypeError:
                raise _at(value, text, f"dict key {key!r} is not hashable") from None
        return result
    return value


def _lookup(name: Name, namespace: Mapping[str, Any], text: str) -> Any:
    first, *rest = name.path
    if first.startswith("_"):
        raise _at(name, text, f"name `{first}` is private; a spec names only public variables. Bind it to one first.")
    if first not in namespace:
        known = [key for key in namespace if isinstance(key, str) and not key.startswith("_")]
        close = difflib.get_close_matches(first, known, n=3)
        hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        builtin = " Python's builtins are not looked up in a spec." if hasattr(builtins, first) else ""
        raise _at(
            name,
            text,
            f"name `{first}` is not defined.{hint}{builtin}\nDefine it before the spec, or check the spelling.",
        )
    obj = namespace[first]
    for depth, attr in enumerate(rest, 1):
        owner = ".".join(name.path[:depth])
        try:
            obj = static_attribute(obj, attr)
        except AttributeError as err:
            raise _at(name, text, f"`{owner}.{attr}` cannot be read in a spec: {err}") from None
    return obj


_PLAIN_LOOKUP = (object.__getattribute__, type.__getattribute__, types.ModuleType.__getattribute__)
# type's own slots, read without any lookup on the object: a metaclass may define `__mro__`,
# `__dict__` or `__name__` as properties, or `__getattribute__` itself, and `cls.__mro__` would run them.
_MRO = type.__dict__["__mro__"].__get__
_CLASS_DICT = type.__dict__["__dict__"].__get__
_TYPE_NAME = type.__dict__["__name__"].__get__


def _is(value: Any, kind: type) -> bool:
    """``isinstance(value, kind)`` by the real type only: ``isinstance`` also reads ``value.__class__``,
    which a class may define as a property."""
    return any(klass is kind for klass in _MRO(type(value)))  # `is`: a metaclass may define __eq__


def static_attribute(obj: Any, attr: str) -> Any:
    """``getattr(obj, attr)`` where that provably runs no Python code, else AttributeError.

    Allowed: a module's variables, an object's own ``__dict__`` entries, and
    functions, static and class methods and plain values defined on its class.
    Refused: properties and other descriptors, ``__getattr__`` fallbacks, and
    types that customise attribute lookup; each would run code named in text.
    Everything here is read statically (as :func:`inspect.getattr_static`
    does): types with ``type()``, never ``isinstance`` (which reads a
    ``__class__`` property), class namespaces through ``type``'s own slots
    (never through a metaclass).
    """
    cls = type(obj)
    name = _TYPE_NAME(cls)
    lookup = _class_lookup(cls, "__getattribute__")
    if not any(lookup is plain for plain in _PLAIN_LOOKUP):
        raise AttributeError(f"{name} customises attribute lookup; bind `{attr}` to a name in Python first")
    if cls is types.ModuleType:  # exactly a module: its __dict__ is the C slot, no PEP 562 __getattr__ runs
        variables = vars(obj)
        if attr in variables:
            return variables[attr]
        raise AttributeError(f"module {_module_name(variables)!r} has no variable `{attr}`")
    meta = _class_lookup(cls, attr)  # what the type of obj defines: data descriptors win over the instance
    is_class = _is(obj, type)
    if meta is not _MISSING and _is_descriptor(meta) and type(meta) not in _METHODS:
        if type(meta) is types.MemberDescriptorType and not is_class:  # a __slots__ entry
            return meta.__get__(obj, cls)
        raise AttributeError(f"`{attr}` is a {_TYPE_NAME(type(meta))} of {name}; reading it runs code")
    if is_class:
        found = _class_lookup(obj, attr)
        owner: Any = obj
    else:
        own = _instance_dict(obj)
        if own is not None and attr in own:
            return own[attr]
        found, owner = meta, cls
    if found is _MISSING:
        raise AttributeError(f"{name} object has no attribute `{attr}` (no `__getattr__` is called)")
    kind = type(found)
    if kind is staticmethod:
        return found.__func__
    if kind is classmethod and type(found.__func__) is types.FunctionType:
        return types.MethodType(found.__func__, obj if is_class else cls)
    if kind is types.FunctionType:
        return found if owner is obj else types.MethodType(found, obj)
    if kind is types.MethodDescriptorType:  # a method written in C, e.g. of a NumPy ufunc
        return found if owner is obj else found.__get__(obj, cls)
    if not _is_descriptor(found):
        return found
    raise AttributeError(f"`{attr}` is a {_TYPE_NAME(kind)}; reading it runs code")


_MISSING = object()
_METHODS = (types.FunctionType, staticmethod, classmethod, types.MethodDescriptorType)  # bound below, no code run


def _class_lookup(cls: type, attr: str) -> Any:
    for klass in _MRO(cls):
        namespace = _CLASS_DICT(klass)
        if attr in namespace:
            return namespace[attr]
    return _MISSING


def _is_descriptor(value: Any) -> bool:
    return _class_lookup(type(value), "__get__") is not _MISSING


def _instance_dict(obj: Any) -> dict[str, Any] | None:
    slot = _class_lookup(type(obj), "__dict__")
    if type(slot) is not types.GetSetDescriptorType:  # no __dict__, or one a class computes
        return None
    own = slot.__get__(obj, type(obj))
    return own if type(own) is dict else None


def _module_name(variables: dict[str, Any]) -> str:
    name = variables.get("__name__")
    return name if type(name) is str else "?"


def _at(where: Any, text: str, message: str) -> SpecError:
    return SpecError(message, text=text, line=where.line, column=where.column)


# --- writing ------------------------------------------------------------------------


def to_spec(pipe: PipelineLike, namespace: Mapping[str, Any] | None = None) -> str:
    """The spec text for ``pipe``; ``from_spec`` of it gives an equal pipeline.

    Literals are written as Python writes them; other values (functions,
    arrays) as a name: one bound to that very object in ``namespace`` when
    given, else the object's own dotted name. A value without either raises.
    """
    parts = [_name_for(pipe.fn, namespace, preferred=pipe.name, what="the pipeline's function")]
    for stage in pipe.stages:
        options = ", ".join(
            f"{key}={_write(value, namespace, f'option `{key}` of stage `{stage.name}`')}"
            for key, value in stage.options.items()
        )
        parts.append(f"{stage.name}({options})" if options else stage.name)
    return " | ".join(parts)


def _write(value: Any, namespace: Mapping[str, Any] | None, what: str) -> str:
    if isinstance(value, _LITERALS):
        if isinstance(value, float) and not math.isfinite(value):
            return _name_for(value, namespace, preferred=None, what=what)
        if isinstance(value, complex) and value.real:
            return _name_for(value, namespace, preferred=None, what=what)
        return repr(value)
    if type(value) is tuple:
        inner = ", ".join(_write(item, namespace, what) for item in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if type(value) is list:
        return "[" + ", ".join(_write(item, namespace, what) for item in value) + "]"
    if type(value) is dict:
        items = (f"{_write(k, namespace, what)}: {_write(v, namespace, what)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return _name_for(value, namespace, preferred=None, what=what)


def _name_for(obj: Any, namespace: Mapping[str, Any] | None, *, preferred: str | None, what: str) -> str:
    if namespace is not None:
        if preferred is not None and _is_dotted(preferred) and _get_dotted(namespace, preferred) is obj:
            return preferred
        for key, bound in namespace.items():
            if bound is obj and isinstance(key, str) and _is_dotted(key) and not key.startswith("_"):
                return key
    own = preferred or getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if isinstance(own, str) and _is_dotted(own):
        return own
    raise PipelineError(
        f"`to_spec` cannot write {what}, {type(obj).__name__} {_short(obj)}: it is not a literal and has no name.\n"
        f"Pass the namespace that holds it, e.g. `pipe.to_spec(globals())`, or give it a name "
        f"(a `def` instead of a lambda, or `Pipeline(fn, name='loss')`)."
    )


def _is_dotted(name: str) -> bool:
    """A name the spec reader accepts: identifiers joined by dots, public after the first."""
    first, *rest = name.split(".")
    parts = [first, *rest]
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in parts) and not any(
        p.startswith("_") for p in rest
    )


def _get_dotted(namespace: Mapping[str, Any], dotted: str) -> Any:
    first, *rest = dotted.split(".")
    obj = namespace.get(first)
    for attr in rest:
        obj = getattr(obj, attr, None)
    return obj


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."
