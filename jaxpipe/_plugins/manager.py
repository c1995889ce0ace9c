"""The plugin manager: entry-point loading, per-plugin isolation, per-run registration.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that
fails to import; here each entry point loads on its own, and a failure becomes
one :class:`~jaxpipe.errors.PluginWarning` naming that plugin. An installed
plugin's run hooks are guarded the same way (the rule is in
:mod:`jaxpipe.hookspecs`).

There is one manager per process. ``init`` and ``fit`` register the run's own
hook objects (the stages' ``run_hooks`` and ``fit(hooks=...)``) in it for the
run's duration; those answer only within their run, so one pipeline's
checkpointer never sees another pipeline's steps, even from another thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from jaxpipe import hookspecs
from jaxpipe.errors import PipelineError, PluginWarning

if TYPE_CHECKING:
    from jaxpipe._core.protocol import PipelineLike

ENTRY_POINT_GROUP = "jaxpipe"
BLOCK_ENV = "JAXPIPE_DISABLE_PLUGINS"


def blocked_plugins() -> frozenset[str]:
    """Names listed in ``JAXPIPE_DISABLE_PLUGINS`` (comma or space separated)."""
    raw = os.environ.get(BLOCK_ENV, "")
    return frozenset(name for name in raw.replace(",", " ").split() if name)


def warn_plugin(name: str, what: str, err: BaseException, outcome: str = "was skipped") -> None:
    warnings.warn(
        f"jaxpipe plugin {name!r} {what} and {outcome}: {type(err).__name__}: {err}. "
        f"Fix or update the plugin, or block it with {BLOCK_ENV}={name}.",
        PluginWarning,
        stacklevel=3,
    )


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every loadable plugin registered."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked_plugins():
        pm.set_blocked(name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(_Isolated(ep.name, ep.load(), pm), name=ep.name)
        except KeyboardInterrupt:  # Ctrl-C while importing: the user's, not the plugin's
            raise
        except BaseException as err:  # one broken plugin (even one calling sys.exit) must not stop the others
            warn_plugin(ep.name, f"({ep.value}) could not be loaded", err)
    while True:  # a misspelt hook name fails loudly, but only for its plugin
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as err:
            name = pm.get_name(err.plugin) or repr(err.plugin)
            pm.unregister(err.plugin)
            warn_plugin(name, "implements a hook that jaxpipe does not define", err)
    return pm


# --- isolation of installed plugins' run hooks ---------------------------------------


class _Run:
    """One ``init`` or ``fit``: its pipeline, the run it started inside, and the plugin hooks it turned off."""

    def __init__(self, pipe: PipelineLike, outer: _Run | None) -> None:
        self.pipe, self.outer = pipe, outer
        self.disabled: set[tuple[str, str]] = set()


_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("jaxpipe_run", default=None)


class _Isolated:
    """An installed plugin as the manager holds it: the same hooks, each run hook guarded.

    ``obj`` is the plugin itself, as for a run's own objects (``fit`` reads ``accepts_calls`` there).
    Hook wrappers are guarded too (:func:`_guard_wrapper`): a failing one is
    skipped, and the hooks it wraps answer as if it were not there.
    """

    def __init__(self, name: str, plugin: object, pm: pluggy.PluginManager) -> None:
        self.obj = plugin
        for attr in dir(plugin):
            opts = pm.parse_hookimpl_opts(plugin, attr)
            if opts is None or attr == "jaxpipe_register_stages":  # the registry isolates that one itself
                if opts is not None:
                    self.__dict__[attr] = getattr(plugin, attr)
                continue
            fn = getattr(plugin, attr)
            if opts.get("wrapper"):
                fn = _guard_wrapper(name, attr, fn, _is_firstresult(pm, attr))
            elif opts.get("hookwrapper"):
                fn = _guard_old_wrapper(name, attr, fn)
            else:
                fn = _guard(name, attr, fn)
            self.__dict__[attr] = fn

    def __repr__(self) -> str:
        return f"<jaxpipe plugin {self.obj!r}>"


def _is_firstresult(pm: pluggy.PluginManager, hook: str) -> bool:
    caller = getattr(pm.hook, hook, None)
    spec = getattr(caller, "spec", None)
    return bool(spec is not None and spec.opts.get("firstresult"))


class _WrapperBroke(Exception):
    """A hook wrapper that did not keep pluggy's protocol (yield once, then return)."""


def _fail(plugin: str, hook: str, fn: Any, args: tuple[Any, ...], err: BaseException) -> None:
    """What an installed plugin's failing hook means: one warning, that hook off for the run.

    ``KeyboardInterrupt`` in ``fit`` is Ctrl-C's: stop after this step (re-raised outside ``fit``,
    or once a stop was already asked for).
    """
    if isinstance(err, KeyboardInterrupt):
        fit_run = dict(zip(inspect.signature(fn).parameters, args, strict=False)).get("run")
        if fit_run is None:  # not in fit: interrupt at once
            raise err
        fit_run.interrupt()  # as Ctrl-C: a second one, after a stop was asked, interrupts at once
        warn_plugin(plugin, f"raised KeyboardInterrupt in {hook}", err, "fit stops after this step")
        return
    run = _current_run.get()
    if run is not None:
        run.disabled.add((plugin, hook))
    what = f"broke the hook wrapper protocol in {hook}" if isinstance(err, _WrapperBroke) else f"raised in {hook}"
    warn_plugin(plugin, what, err, "that hook is off for the rest of this run")


def _disabled(plugin: str, hook: str) -> bool:
    run = _current_run.get()
    return run is not None and (plugin, hook) in run.disabled


def _guard(plugin: str, hook: str, fn: Any) -> Any:
    """``fn`` that turns its exceptions into one PluginWarning and no result."""

    @functools.wraps(fn)
    def guarded(*args: Any) -> Any:
        if _disabled(plugin, hook):
            return None
        try:
            return fn(*args)
        except BaseException as err:  # SystemExit too: a plugin must not end the user's run
            _fail(plugin, hook, fn, args, err)
            return None

    return guarded


def _guard_wrapper(plugin: str, hook: str, fn: Any, firstresult: bool) -> Any:
    """A new-style hook wrapper (``wrapper=True``) that cannot change the call's outcome by failing.

    pluggy runs the wrapper up to its ``yield``, then the hooks it wraps, then
    sends their result in (or throws their exception) and takes what it
    returns. Guarded: if the wrapper raises before or after its ``yield``,
    yields twice or never, or returns the wrong kind (not a list for an
    ordinary hook, a value that ``first_result`` rejects for a ``firstresult``
    one), that is one PluginWarning, the wrapper is off for the rest of the run,
    and the wrapped hooks' result passes through unchanged. Their exception
    always propagates unchanged: a failing wrapper can neither replace it nor
    swallow it.
    """

    @functools.wraps(fn)
    def guarded(*args: Any) -> Any:
        if _disabled(plugin, hook):
            return (yield)
        try:
            gen = _started(fn, args)
        except BaseException as err:  # before its yield: as if it were not there
            _fail(plugin, hook, fn, args, err)
            return (yield)
        try:
            result = yield
        except BaseException as raised:  # the wrapped hooks' error: the wrapper may look, it propagates unchanged
            try:
                gen.throw(raised)
            except StopIteration:
                swallowed = _WrapperBroke(f"swallowed the {type(raised).__name__} of the hooks it wraps")
                _fail(plugin, hook, fn, args, swallowed)
            except BaseException as err:
                if err is not raised:
                    _fail(plugin, hook, fn, args, err)
            else:
                gen.close()
                _fail(plugin, hook, fn, args, _WrapperBroke("yielded a second time"))
            raise
        try:
            gen.send(result)
        except StopIteration as done:
            problem = _wrong_result(hook, firstresult, done.value)
            if problem is None:
                return done.value
            _fail(plugin, hook, fn, args, _WrapperBroke(f"returned {problem}; the wrapped result was kept"))
            return result
        except BaseException as err:  # after its yield: the wrapped result passes through
            _fail(plugin, hook, fn, args, err)
            return result
        gen.close()
        _fail(plugin, hook, fn, args, _WrapperBroke("yielded a second time"))
        return result

    return guarded


def _started(fn: Any, args: tuple[Any, ...]) -> Any:
    """A wrapper's generator run up to its ``yield`` (its code before the wrapped hooks), or _WrapperBroke."""
    gen = fn(*args)
    if not inspect.isgenerator(gen):
        raise _WrapperBroke(f"returned {type(gen).__name__}, not a generator (a wrapper must yield once)")
    try:
        next(gen)
    except StopIteration:
        raise _WrapperBroke("returned without yielding") from None
    return gen


def _guard_old_wrapper(plugin: str, hook: str, fn: Any) -> Any:
    """An old-style hook wrapper (``hookwrapper=True``), guarded as :func:`_guard_wrapper` guards new ones.

    It receives pluggy's ``Result`` at its ``yield``; it may change the result
    (``force_result``), which is its documented power; raising is a warning.
    """

    @functools.wraps(fn)
    def guarded(*args: Any) -> Any:
        if _disabled(plugin, hook):
            yield
            return
        try:
            gen = _started(fn, args)
        except BaseException as err:
            _fail(plugin, hook, fn, args, err)
            yield
            return
        outcome = yield
        try:
            gen.send(outcome)
        except StopIteration:
            return
        except BaseException as err:
            if err is not getattr(outcome, "exception", None):  # get_result() re-raising the wrapped error is fine
                _fail(plugin, hook, fn, args, err)
            return
        gen.close()
        _fail(plugin, hook, fn, args, _WrapperBroke("yielded a second time"))

    return guarded


_accepting: contextvars.ContextVar[Callable[[Any], str | None] | None] = contextvars.ContextVar(
    "jaxpipe_accepting", default=None
)


def _wrong_result(hook: str, firstresult: bool, value: Any) -> str | None:
    """Why a wrapper's return value is not one its hook could have returned, or None if it could."""
    if not firstresult:
        return None if isinstance(value, list) else f"{type(value).__name__}, not the list of results"
    accept = _accepting.get()
    return None if value is None or accept is None else accept(value)


# --- per-run registration ----------------------------------------------------------------


class _RunOwned:
    """A run's own hook object (a stage's ``run_hooks``, ``fit(hooks=...)``) as the manager holds it.

    Its hooks answer only inside their run (a context variable, so per thread):
    another thread's run in progress, or a run started inside one of its hooks,
    never reaches them.
    """

    def __init__(self, obj: object, run: _Run, pm: pluggy.PluginManager) -> None:
        self.obj = obj
        for attr in dir(obj):
            opts = pm.parse_hookimpl_opts(obj, attr)
            if opts is not None:
                wrapper = bool(opts.get("wrapper") or opts.get("hookwrapper"))
                self.__dict__[attr] = _only_in(run, getattr(obj, attr), wrapper)

    def __repr__(self) -> str:
        return f"<hooks of one run: {self.obj!r}>"


def _only_in(run: _Run, fn: Any, wrapper: bool) -> Any:
    if wrapper:

        @functools.wraps(fn)
        def wrap(*args: Any) -> Any:
            if _current_run.get() is run:
                return (yield from fn(*args))
            return (yield)

        return wrap

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return fn(*args) if _current_run.get() is run else None

    return call


_lock = threading.Lock()  # pluggy's registry is not meant for concurrent register/unregister


def installed_plugins() -> list[object]:
    """The plugins registered for the whole process (as given, unwrapped), not a run's own objects."""
    return [getattr(p, "obj", p) for p in plugin_manager().get_plugins() if not isinstance(p, _RunOwned)]


def running(pipe: PipelineLike) -> bool:
    """Whether ``pipe``'s ``init`` or ``fit`` is under way, so its run hooks are registered."""
    run = _current_run.get()  # this thread's (or task's) runs, innermost first
    while run is not None:
        if run.pipe is pipe:
            return True
        run = run.outer
    return False


@contextlib.contextmanager
def run_hooks(pipe: PipelineLike, extra: Sequence[object] = ()) -> Iterator[Any]:
    """The hooks of one run: every plugin, this pipeline's stage hooks, and ``extra``.

    Yields the process-wide manager's hook relay (``hook.jaxpipe_fit_step(...)``),
    with the run's own objects registered until the run ends.
    """
    pm = plugin_manager()
    run = _Run(pipe, _current_run.get())
    registered: list[_RunOwned] = []
    token = _current_run.set(run)
    try:
        objects = [
            s.kind.training.run_hooks(dict(s.options))
            for s in pipe.stages
            if s.kind.training is not None and s.kind.training.run_hooks is not None
        ]
        for obj in [*objects, *extra]:
            owned = _RunOwned(obj, run, pm)
            with _lock:
                pm.register(owned)
            registered.append(owned)
        yield pm.hook
    finally:
        _current_run.reset(token)
        with _lock:
            for owned in registered:
                pm.unregister(owned)


def first_result(caller: Any, accept: Callable[[Any], str | None], **kwargs: Any) -> Any:
    """The first non-None result of a ``firstresult`` hook that ``accept`` takes (it returns why not, else None).

    An installed plugin's result of the wrong kind is its bug, not the user's:
    one PluginWarning, that hook off for the rest of the run, and the next
    implementation asked instead. A run's own object (a stage's hooks, or
    ``fit(hooks=...)``) gets a PipelineError naming it.
    """
    impls = caller.get_hookimpls()
    if any(impl.wrapper or impl.hookwrapper for impl in impls):  # a wrapper sees the call as a whole
        token = _accepting.set(accept)  # so a guarded wrapper can tell its own wrong result
        try:
            result = caller(**kwargs)
        finally:
            _accepting.reset(token)
        problem = None if result is None else accept(result)
        if problem is not None:
            raise PipelineError(f"`{caller.name}` returned {problem}.")
        return result
    run = _current_run.get()
    for impl in reversed(impls):  # pluggy's call order
        result = impl.function(*[kwargs[name] for name in impl.argnames])
        problem = None if result is None else accept(result)
        if problem is None:
            if result is not None:
                return result
            continue
        if isinstance(impl.plugin, _RunOwned):
            raise PipelineError(
                f"`{caller.name}` of {impl.plugin.obj!r} returned {problem}.\n"
                f"Return the documented kind (see `help(jaxpipe.hookspecs.{caller.name})`), "
                f"or None to leave it to others."
            )
        if run is not None:
            run.disabled.add((impl.plugin_name, caller.name))
        warn_plugin(impl.plugin_name, f"returned {problem} from {caller.name}", TypeError(problem), "it was ignored")
    return None
