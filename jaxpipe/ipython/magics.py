"""The notebook magics: ``%%jaxpipe``, ``%jit_timing``, ``%prng_tree``, ``%jaxpipe_cache``.

Each works in a Jupyter kernel (HTML, the inspector widget) and in terminal
IPython (text). A mistake in a magic's arguments raises ``UsageError``: one
line, no traceback, and the shell carries on.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import importlib.util
import keyword
import logging
import re
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import jax
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from jaxpipe._pipeline import Pipeline
from jaxpipe._tools import compile_cache as _cache
from jaxpipe._tools import inspection as _inspect
from jaxpipe._tools import spec as _spec
from jaxpipe.errors import PipelineError
from jaxpipe.ipython.memo import PipelineMemo


class _Shown:
    """Shows ``obj`` as its ``str`` in a terminal and as its ``_repr_html_`` in a notebook."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __repr__(self) -> str:
        return str(self.obj)

    def _repr_html_(self) -> str:
        return str(self.obj._repr_html_())


@dataclasses.dataclass(frozen=True)
class _TimedCall:
    """What ``%jit_timing`` remembers of the last timed call of a function."""

    treedef: Any
    leaves: dict[str, str]
    probe: Any  # a jit object that has traced those arguments, or None


@magics_class
class JaxpipeMagics(Magics):
    """The jaxpipe magics; one instance per shell, registered by ``%load_ext jaxpipe``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.memo = PipelineMemo()
        self._timed: collections.OrderedDict[Hashable, _TimedCall] = collections.OrderedDict()

    # --- %%jaxpipe -----------------------------------------------------------------

    @magic_arguments()
    @argument("name", help="the variable to bind the Pipeline to")
    @argument(
        "--run",
        nargs="*",
        metavar="ARG",
        help="call it on these arguments (names or literals) and show the output shapes and timing",
    )
    @cell_magic
    def jaxpipe(self, line: str, cell: str) -> None:
        """Builds a Pipeline from the cell's text and binds it to NAME.

        The cell is a spec: the function's name, then stages separated by `|`,
        as the fluent methods take them. Names resolve to the notebook's own
        public variables only (not builtins, not IPython's `exit`, `In`, ...);
        stage arguments are literals or names; nothing in the text is evaluated.
        Re-running an unchanged cell, even after redefining its function the same
        way, gives back the pipeline built before, compiled programs included.

        Example::

            In [1]: %%jaxpipe per_example --run w xs
               ...: loss | grad | vmap(in_axes=(None, 0)) | jit
        """
        args = _parse(self.jaxpipe, line)
        if not args.name.isidentifier() or keyword.iskeyword(args.name):
            raise UsageError(f"%%jaxpipe binds the pipeline to a variable; {args.name!r} is not a valid Python name")
        namespace = _NotebookNames(self._shell)
        values = []
        for text in args.run or ():
            try:
                values.append(_spec.value(text, namespace))
            except PipelineError as err:
                raise UsageError(f"%%jaxpipe {args.name} --run: {err.detail.splitlines()[0]}") from None
        try:
            if _spec.parse(cell).source.path[0] == args.name:
                raise UsageError(
                    f"%%jaxpipe {args.name} would rebind `{args.name}`, which the spec starts from, so running the "
                    f"cell again would transform the pipeline again; bind it to another name"
                )
            pipe, reused = self.memo.reuse(Pipeline.from_spec(cell, namespace))
        except PipelineError as err:
            raise UsageError(f"%%jaxpipe {args.name}: {err}") from None
        self._shell.user_ns[args.name] = pipe
        if reused:
            print(f"{args.name}: unchanged since it was built, so its compiled programs are reused.")
        self._show_pipeline(args.name, pipe)
        if args.run is not None:
            self._run(args.name, pipe, args.run, values)

    def _show_pipeline(self, name: str, pipe: Pipeline) -> None:
        if getattr(self.shell, "kernel", None) is None:  # terminal IPython: no widgets
            print(f"{name} = {pipe!r}\n{pipe.explain()}")
        elif importlib.util.find_spec("jaxpipe.ipython.widgets") is not None:
            from jaxpipe.ipython.widgets import show_inspector

            show_inspector(pipe)
        else:
            display(pipe)

    def _run(self, name: str, pipe: Pipeline, texts: list[str], values: list[Any]) -> None:
        args = tuple(values)
        with _cache.CompileEvents() as events:
            timing = _inspect._explained(
                pipe, args, {}, lambda: _inspect.time_call(pipe.build(), args, {}, number=None, repeat=5)
            )
        shapes = _shapes(pipe(*args))
        separator = "\n" if "\n" in shapes else " "
        print(f"{name}({', '.join(texts)}) ->{separator}{shapes}")
        print(f"XLA compiles: {events.compiles}")
        display(_Shown(timing))

    # --- %jit_timing -----------------------------------------------------------------

    @magic_arguments()
    @argument("-n", "--number", type=int, default=None, help="calls per round (default: about 0.1 s per round)")
    @argument("-r", "--repeat", type=int, default=5, help="rounds (default: 5)")
    @argument("-o", "--output", action="store_true", help="return the Timing as well")
    @argument("call", nargs=argparse.REMAINDER, help="the call to time, e.g. step(state, batch)")
    @line_cell_magic
    def jit_timing(self, line: str, cell: str | None = None) -> _inspect.Timing | None:
        """Times a JAX call: trace, lower, compile, first call and steady state.

        Trace, lower and compile are timed separately with JAX's ahead-of-time
        API. A Pipeline is timed on a fresh copy on purpose, so its compile is
        measured even when the pipeline already compiled (after `%%jaxpipe
        --run`, re-running the cell compiles nothing); a jax.jit function that already ran
        on such arguments is timed as it is, with a note that its times came
        from JAX's caches. The steady state is the best and median per-call time
        of R rounds of N calls, each synchronised with block_until_ready.
        When the arguments' shapes, dtypes or static values differ from the
        last timed call of the same function, it says whether JAX recompiled
        and shows JAX's own cache-miss explanation. In cell mode the cell's
        last line is the call and the lines above run first, untimed.

        Example::

            In [1]: t = %jit_timing -o step(state, batch)
            In [2]: t.compile, t.median
            Out[2]: (0.0531, 1.2e-05)
        """
        args = _parse(self.jit_timing, line)
        source = " ".join(args.call)
        if cell is not None:
            if source.strip():
                raise UsageError("%%jit_timing takes the call on the cell's last line, not on the magic's line")
            source = self._run_setup(cell)
        if (args.number is not None and args.number < 1) or args.repeat < 1:
            raise UsageError(f"%jit_timing: -n and -r must be at least 1, got -n {args.number} -r {args.repeat}")
        fn, call_args, call_kwargs = self._split_call(source, "jit_timing")
        timing = self._time(fn, call_args, call_kwargs, number=args.number, repeat=args.repeat)
        display(_Shown(timing))
        return timing if args.output else None

    def _run_setup(self, cell: str) -> str:
        """Runs all but the cell's last statement; returns the last one's text."""
        try:
            body = ast.parse(cell).body
        except SyntaxError as err:
            raise UsageError(f"%%jit_timing: line {err.lineno}: {err.msg}") from None
        if not body or not isinstance(body[-1], ast.Expr):
            raise UsageError("%%jit_timing needs a call such as `step(state, batch)` on the cell's last line")
        lines = cell.splitlines()
        last = body[-1]
        setup = "\n".join(lines[: last.lineno - 1])
        if setup.strip():
            self._shell.ex(setup)
        return ast.get_source_segment(cell, last) or ""

    def _time(
        self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, number: int | None, repeat: int
    ) -> _inspect.Timing:
        treedef, leaves = _describe_arguments(args, kwargs)
        key = _timing_key(fn)
        previous = self._timed.get(key) if key is not None else None
        changes = _changes(previous, treedef, leaves) if previous is not None else []
        notes: list[str] = []
        if isinstance(fn, Pipeline):  # timed on a fresh copy; the last one's cache tells what changed
            target = _inspect.fresh_build(fn)
            before = previous.probe if previous is not None else None
            if changes and before is not None:
                notes += _recompile_notes(changes, *_explained_trace(lambda: before.trace(*args, **kwargs)))
            timing = _inspect._explained(
                fn, args, kwargs, lambda: _inspect.time_call(target, args, kwargs, number=number, repeat=repeat)
            )
            probe = target if hasattr(target, "trace") else None
            if timing.trace is not None and previous is None:  # said once per function
                notes.append(
                    "Timed on a fresh copy of the pipeline, so trace, lower and compile are measured on purpose; "
                    "calling the pipeline itself reuses the program it compiled before."
                )
        elif hasattr(fn, "trace"):  # a jax.jit function: time it as it is, and let JAX explain a miss
            with _capture_cache_misses() as misses, _cache.CompileEvents() as events:
                timing = _inspect.time_call(fn, args, kwargs, number=number, repeat=repeat)
            if changes:
                notes += _recompile_notes(changes, events.traces > 0, misses)
            if events.traces == 0:
                notes.append("For compile times, time a Pipeline or a new jax.jit of the function.")
            probe = fn
        else:
            timing = _inspect.time_call(fn, args, kwargs, number=number, repeat=repeat)
            probe = None
        if timing.trace is None:
            name = repr(fn) if isinstance(fn, Pipeline) else getattr(fn, "__name__", type(fn).__name__)
            notes.append(
                f"`{name}` is not jitted, so it runs op by op and there is no trace, lower or compile to time; "
                f"wrap it in jax.jit (or end the Pipeline with .jit()) to compile it as a whole."
            )
        if key is not None:
            self._timed[key] = _TimedCall(treedef, leaves, probe)
            self._timed.move_to_end(key)
            while len(self._timed) > 16:
                self._timed.popitem(last=False)
        return dataclasses.replace(timing, notes=(*timing.notes, *notes))

    # --- %prng_tree --------------------------------------------------------------------

    @magic_arguments()
    @argument("-o", "--output", action="store_true", help="return the KeyTree as well")
    @argument("call", nargs=argparse.REMAINDER, help="the call to trace, e.g. init(key, x)")
    @line_magic
    def prng_tree(self, line: str) -> Any:
        """Draws the PRNG key derivation tree of a call and flags key reuse.

        Traces the call (nothing runs) and shows each key's splits and
        fold_ins and where each key is consumed, warning where a key is used
        twice, or used and then split again. `-o` returns the tree, whose
        `reuses` lists each finding (empty for a correct program).

        Example::

            In [1]: tree = %prng_tree -o init(jax.random.key(0), x)
            In [2]: tree.reuses
            Out[2]: []
        """
        args = _parse(self.prng_tree, line)
        fn, call_args, call_kwargs = self._split_call(" ".join(args.call), "prng_tree")
        from jaxpipe import _prng

        with warnings.catch_warnings():  # the tree shown below lists each reuse; one mention each
            warnings.simplefilter("ignore", _prng.KeyReuseWarning)
            tree = _prng.key_tree(fn, *call_args, **call_kwargs)
        display(_Shown(tree))
        return tree if args.output else None

    # --- %jaxpipe_cache ------------------------------------------------------------------

    @magic_arguments()
    @argument("action", nargs="?", default="status", choices=("on", "off", "status"), help="default: status")
    @argument("dir", nargs="?", default=None, help="the cache directory for `on` (default: ~/.cache/jaxpipe/xla)")
    @line_magic
    def jaxpipe_cache(self, line: str) -> None:
        """Turns JAX's persistent compilation cache on or off, or shows where it is.

        With it on, every compiled program is also written to disk, so a fresh
        kernel's first call of an unchanged pipeline loads it instead of
        compiling. Only use a directory that no one else can write to.

        Example::

            In [1]: %jaxpipe_cache on
            persistent compilation cache: on, in /home/me/.cache/jaxpipe/xla
        """
        args = _parse(self.jaxpipe_cache, line)
        if args.dir is not None and args.action != "on":
            raise UsageError(f"%jaxpipe_cache {args.action} takes no directory; use `%jaxpipe_cache on DIR`")
        if args.action == "on":
            try:
                _cache.enable_compilation_cache(args.dir)
            except PipelineError as err:
                raise UsageError(str(err).splitlines()[0]) from None
        elif args.action == "off":
            _cache.disable_compilation_cache()
        directory = _cache.compilation_cache_dir()
        if directory is None:
            print("persistent compilation cache: off")
        else:
            files = [p for p in directory.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            print(f"persistent compilation cache: on, in {directory} ({len(files)} files, {size / 1e6:.1f} MB)")

    # --- helpers --------------------------------------------------------------------

    @property
    def _shell(self) -> Any:
        """The shell these magics were registered in (never None once registered)."""
        assert self.shell is not None
        return self.shell

    def _split_call(self, source: str, magic: str) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """The function, positional and keyword arguments of a call, evaluated in the user's namespace."""
        source = source.strip()
        example = "step(state, batch)"
        if not source:
            raise UsageError(f"%{magic} needs a call such as `{example}`")
        try:
            call = ast.parse(source, mode="eval").body
        except SyntaxError as err:
            raise UsageError(
                f"%{magic}: cannot read `{source}` ({err.msg}); expected a call such as `{example}`"
            ) from None
        if not isinstance(call, ast.Call):
            raise UsageError(f"%{magic} needs a call such as `{example}`, got `{source}`")
        fn = self._evaluate(source, call.func, magic)
        if not callable(fn):
            raise UsageError(
                f"%{magic}: `{ast.get_source_segment(source, call.func)}` is a {type(fn).__name__}, not a function"
            )
        args: list[Any] = []
        for node in call.args:
            if isinstance(node, ast.Starred):
                args.extend(self._evaluate(source, node.value, magic))
            else:
                args.append(self._evaluate(source, node, magic))
        kwargs: dict[str, Any] = {}
        for item in call.keywords:
            if item.arg is None:
                kwargs.update(self._evaluate(source, item.value, magic))
            else:
                kwargs[item.arg] = self._evaluate(source, item.value, magic)
        return fn, tuple(args), kwargs

    def _evaluate(self, source: str, node: ast.expr, magic: str) -> Any:
        """The value of one part of the call, in the user's namespace, as the user wrote it."""
        text = ast.get_source_segment(source, node) or ""
        try:
            return self._shell.ev(text)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else ""
            raise UsageError(f"%{magic}: `{text}` failed: {type(err).__name__}: {reason}") from None


class _NotebookNames(Mapping[str, Any]):
    """The notebook's variables a spec may name: ``user_ns`` without what IPython put there itself."""

    def __init__(self, shell: Any) -> None:
        self._ns, self._hidden = shell.user_ns, getattr(shell, "user_ns_hidden", {})

    def _visible(self, name: str) -> bool:
        return name in self._ns and not (name in self._hidden and self._ns[name] is self._hidden[name])

    def __getitem__(self, name: str) -> Any:
        if not self._visible(name):
            raise KeyError(name)
        return self._ns[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._visible(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name in list(self._ns) if isinstance(name, str) and self._visible(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def register(shell: Any) -> Callable[[], None]:
    """Registers the magics in ``shell``; returns the function that removes exactly them."""
    magics = JaxpipeMagics(shell)
    manager = shell.magics_manager
    class_name = type(magics).__name__
    before = {kind: {name: manager.magics[kind].get(name) for name in magics.magics[kind]} for kind in magics.magics}
    registry_before = dict.get(manager.registry, class_name)  # dict.get: no lazy loading
    manager.register(magics)

    def unregister() -> None:
        for kind, names in before.items():
            table = manager.magics[kind]
            for name, previous in names.items():
                if getattr(table.get(name), "__self__", None) is not magics:
                    continue  # replaced since: not ours to remove
                if previous is None:
                    del table[name]
                else:
                    table[name] = previous
        if dict.get(manager.registry, class_name) is magics:
            if registry_before is None:
                del manager.registry[class_name]
            else:
                manager.registry[class_name] = registry_before
        magics.memo.clear()
        magics._timed.clear()

    return unregister


def _parse(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    try:
        return parse_argstring(magic, line)
    except (UsageError, ValueError) as err:  # argparse's complaint, or unbalanced quotes
        raise UsageError(f"%{magic.__name__}: {err}") from None


def _shapes(output: Any) -> str:
    """``float32[8, 16]``, or one line per leaf for a pytree of arrays."""

    def describe(leaf: Any) -> str:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            return f"{leaf.dtype}[{', '.join(map(str, leaf.shape))}]"
        return type(leaf).__name__

    leaves = jax.tree_util.tree_flatten_with_path(output)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return describe(leaves[0][1])
    return "\n".join(f"  {jax.tree_util.keystr(path)}: {describe(leaf)}" for path, leaf in leaves) or "(no arrays)"


def _timing_key(fn: Any) -> Hashable | None:
    try:
        hash(fn)
    except TypeError:
        return None
    return fn  # type: ignore[no-any-return]


def _describe_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """The arguments' structure, and each leaf's shape and dtype (arrays) or value (others)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    described = {}
    for path, leaf in leaves:
        where = f"argument {path[1].idx}" if path[0].idx == 0 else f"`{path[1].key}`"  # type: ignore[attr-defined]
        where += jax.tree_util.keystr(path[2:])
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            described[where] = f"{leaf.dtype}[{', '.join(map(str, leaf.shape))}]"
        else:
            text = repr(leaf)
            described[where] = f"{type(leaf).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return treedef, described


def _changes(previous: _TimedCall, treedef: Any, leaves: dict[str, str]) -> list[str]:
    if previous.treedef != treedef:
        return ["the arguments' structure"]
    return [
        f"{where}: {previous.leaves[where]} -> {now}" for where, now in leaves.items() if previous.leaves[where] != now
    ]


def _recompile_notes(changes: list[str], traced: bool, misses: list[str]) -> list[str]:
    changed = "; ".join(changes)
    if not traced:
        return [f"arguments differ from the last timed call ({changed}), but JAX had compiled for these already."]
    notes = [f"recompiled, because the arguments differ from the last timed call: {changed}."]
    if misses:
        notes.append("JAX's explanation:\n" + "\n".join(misses))
    return notes


def _explained_trace(trace: Callable[[], Any]) -> tuple[bool, list[str]]:
    """Whether ``trace()`` traced anew, and JAX's cache-miss explanation if it did."""
    with _capture_cache_misses() as misses, _cache.CompileEvents() as events:
        trace()
    return events.traces > 0, misses


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("TRACING CACHE MISS") and "never seen function" not in text:
            self.records.append(re.sub(r"^TRACING CACHE MISS at .*", "TRACING CACHE MISS:", text, count=1))


@contextlib.contextmanager
def _capture_cache_misses() -> Iterator[list[str]]:
    """JAX's tracing-cache-miss explanations logged inside the block (``jax_explain_cache_misses``)."""
    records: list[str] = []
    handler = _ListHandler(records)
    logger = logging.getLogger("jax")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # captured here, not printed as a warning as well
    try:
        with jax.explain_cache_misses(True):
            yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
