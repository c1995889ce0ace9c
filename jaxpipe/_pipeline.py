"""The immutable Pipeline value and its fluent methods."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from jaxpipe._core import builds, fold
from jaxpipe._core.format import format_options, format_signature, format_value, same_value
from jaxpipe._core.signature import signature_of
from jaxpipe._core.stage import Stage, StageKind
from jaxpipe._plugins import manager as plugins
from jaxpipe._plugins.registry import registry, reserve
from jaxpipe._stages.builtins import BUILTIN_STAGES
from jaxpipe._tools import diagnose, inspection, spec
from jaxpipe._training import fit as training_fit
from jaxpipe._training import init as training_init
from jaxpipe._training import predict as training_predict
from jaxpipe.errors import PipelineError, PipelineTypeError, error_type

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _method_of(fn: Callable[Concatenate[Any, _P], _R], name: str) -> Callable[Concatenate[Pipeline, _P], _R]:
    """``fn(pipe, ...)`` as the method ``pipe.name(...)``, showing ``fn``'s parameters and docstring.

    As ``functools.wraps`` does for a wrapper, the method carries ``fn``'s
    signature (its first parameter, the pipeline, becoming ``self``) and its
    docstring (without that parameter's ``Args`` entry), so ``help(pipe.fit)``
    lists ``fit``'s real parameters, including any added later.
    """

    def method(self: Pipeline, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return fn(self, *args, **kwargs)

    try:  # the real types rather than their strings, where the module's names allow
        signature = inspect.signature(fn, eval_str=True)
    except NameError:
        signature = inspect.signature(fn)
    first, *rest = signature.parameters.values()
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(parameters=[self_param, *rest])  # type: ignore[attr-defined]
    method.__annotations__ = {p.name: p.annotation for p in rest if p.annotation is not p.empty}
    if signature.return_annotation is not signature.empty:
        method.__annotations__["return"] = signature.return_annotation
    method.__doc__ = _without_arg(inspect.getdoc(fn) or "", first.name)
    method.__name__ = name
    method.__qualname__ = f"Pipeline.{name}"
    return method


def _without_arg(doc: str, arg: str) -> str:
    """A Google-style docstring without the ``Args`` entry of ``arg`` (its line and its indented continuation)."""
    lines, kept, skipping, indent = doc.splitlines(), [], False, 0
    for line in lines:
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        if skipping and (not stripped or depth > indent):
            continue
        skipping = stripped.startswith(f"{arg}:")
        indent = depth
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


class Pipeline:
    """A function and the JAX transforms applied to it, in call order.

    Stages wrap outward in the order they are called, so the pipeline below is
    exactly ``jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))``:

    >>> import jax, jax.numpy as jnp
    >>> def loss(w, x):
    ...     return jnp.sum((w * x) ** 2)
    >>> per_example = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    >>> per_example.explain()
    'jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))'
    >>> per_example(jnp.ones(2), jnp.ones((3, 2))).shape
    (3, 2)

    A pipeline is a value: stage methods return a new one, and pipelines with the
    same function and stages are equal and hash equal. ``pipe(*args)`` builds the
    composed JAX callable once and calls it; ``pipe.build()`` returns it. Equal
    pipelines share that callable, so building one again compiles nothing new.
    Like a ``functools.wraps`` wrapper, a pipeline has ``__wrapped__`` (its
    function), ``__name__`` and, when its stages keep the function's arguments,
    ``__signature__``.
    """

    __slots__ = ("_fn", "_name", "_stages", "_built", "_call", "__weakref__")
    _fn: Callable[..., Any]
    _name: str | None
    _stages: tuple[Stage, ...]
    _built: Callable[..., Any] | None  # what build() returned
    _call: Callable[..., Any] | None  # what __call__ runs: the build, once the first call has been checked

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        if not callable(fn):  # a TypeError too, as jax.jit(3) raises
            raise PipelineTypeError(
                f"`Pipeline` needs a function to transform, got {type(fn).__name__} {fn!r}.\n"
                f"Pass the function itself, e.g. Pipeline(loss), not Pipeline(loss(params, x))."
            )
        stages: tuple[Stage, ...] = ()
        if issubclass(type(fn), Pipeline):  # Pipeline(pipe) continues from pipe's stages (type(): no __class__ read)
            source: Pipeline = fn  # type: ignore[assignment]  # narrowed by the line above
            fn, name, stages = source._fn, source._name if name is None else name, source._stages
        _fill(self, fn, name, stages)

    def with_fn(self, fn: Callable[..., Any]) -> Pipeline:
        """The same stages around another function (e.g. a wrapped or redefined ``fn``).

        The stages are not checked again: give a function that takes the same
        arguments. The name given to ``Pipeline``, if any, is kept.
        """
        if not callable(fn):
            raise PipelineTypeError(f"`with_fn` needs a function, got {type(fn).__name__} {fn!r}.", pipeline=repr(self))
        return _new(fn, self._name, self._stages)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Pipeline is immutable: each stage method returns a new Pipeline")

    # --- the value ---------------------------------------------------------------

    @property
    def fn(self) -> Callable[..., Any]:
        """The function the stages transform."""
        return self._fn

    @property
    def name(self) -> str:
        """The name given to ``Pipeline``, else the function's name."""
        return self._name or getattr(self._fn, "__name__", None) or type(self._fn).__name__

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in call order (innermost first)."""
        return self._stages

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self._fn

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def __signature__(self) -> inspect.Signature | None:
        """The function's signature while every stage keeps it, else None (unknown)."""
        if not all(stage.kind.keeps_signature for stage in self._stages):
            return None
        return signature_of(self._fn)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pipeline):
            return NotImplemented
        return self._fn == other._fn and self._stages == other._stages

    def __hash__(self) -> int:
        try:
            fn_hash = hash(self._fn)
        except TypeError:  # an unhashable callable object
            fn_hash = id(self._fn)
        return hash((fn_hash, self._stages))

    def __repr__(self) -> str:
        return f"Pipeline({self.name})" + "".join(f".{stage!r}" for stage in self._stages)

    def _repr_html_(self) -> str:
        """Notebook display: the stages and the equivalent JAX (see ``jaxpipe._tools.display``)."""
        from jaxpipe._tools.display import pipeline_html  # only in a notebook: keeps `import jaxpipe` light

        return pipeline_html(self)

    # --- adding stages -----------------------------------------------------------

    def then(self, stage: str | StageKind, /, *args: Any, **options: Any) -> Pipeline:
        """Adds the stage called ``stage`` (a built-in or a plugin's) with options.

        ``pipe.then("vmap", in_axes=0)`` is ``pipe.vmap(in_axes=0)``; specs and
        generic code use this form.
        """
        __tracebackhide__ = True
        kind = stage if isinstance(stage, StageKind) else self._lookup(stage)
        return self._add(kind, args, options)

    def _lookup(self, name: str) -> StageKind:
        __tracebackhide__ = True
        reg = registry()
        kind = reg.kinds.get(name)
        if kind is not None:
            return kind
        # raises UnknownStageError or PluginError, placed in this pipeline (formatted only on this path)
        return reg.lookup(name, stage=len(self._stages) + 1, stage_name=name, pipeline=f"{self!r}.{name}()")

    def _add(self, kind: StageKind, args: tuple[Any, ...], options: Mapping[str, Any]) -> Pipeline:
        __tracebackhide__ = True
        if self._stages and self._stages[-1].kind.last:
            last = self._stages[-1].name
            raise self._stage_error(
                kind,
                args,
                options,
                f"`.{kind.name}()` comes after `.{last}()`, but `.{last}()` runs the whole pipeline "
                f"its own way and must be the last stage.\nMove `.{last}()` to the end.",
            )
        try:
            bound = kind.bind(args, options)
        except TypeError as err:
            raise self._stage_error(kind, args, options, _bad_options(kind, options, err), err) from err
        if kind.check is not None:
            try:
                kind.check(fold.context(self._fn, self._stages), bound)
            except (TypeError, ValueError) as err:
                raise self._stage_error(kind, (), bound, str(err), err) from err
        return _new(self._fn, self._name, (*self._stages, Stage(kind, bound)))

    def _stage_error(
        self,
        kind: StageKind,
        args: tuple[Any, ...],
        options: Mapping[str, Any],
        message: str,
        cause: Exception | None = None,
    ) -> PipelineError:
        """The error for a stage that cannot be added, shown as the call that was tried.

        Also of ``cause``'s builtin kind (a TypeError where JAX raises one), so
        ``except TypeError`` written against JAX catches it.
        """
        defaults = kind.signature.parameters
        shown = {k: v for k, v in options.items() if not (k in defaults and same_value(v, defaults[k].default))}
        call = ", ".join([*map(format_value, args), *([format_options(shown)] if shown else [])])
        kind_of_error = PipelineError if cause is None else error_type(cause)
        return kind_of_error(message).at(len(self._stages) + 1, kind.name, f"{self!r}.{kind.name}({call})")

    def __getattr__(self, name: str) -> Callable[..., Pipeline]:
        """Plugin stages appear as methods: ``Pipeline(f).clip_grads(1.0)``."""
        if name.startswith("_"):
            raise AttributeError(name)
        kind = self._lookup(name)

        def add_stage(*args: Any, **options: Any) -> Pipeline:
            __tracebackhide__ = True
            return self._add(kind, args, options)

        add_stage.__name__ = add_stage.__qualname__ = name
        add_stage.__doc__ = kind.doc or inspect.getdoc(kind.apply)
        add_stage.__signature__ = kind.signature  # type: ignore[attr-defined]
        return add_stage

    def __dir__(self) -> Iterable[str]:
        return sorted({*super().__dir__(), *registry().kinds})

    # --- built-in stages (options are those of the JAX function) ----------------

    def jit(
        self,
        *,
        static_argnums: int | tuple[int, ...] | None = None,
        static_argnames: str | tuple[str, ...] | None = None,
        donate_argnums: int | tuple[int, ...] | None = None,
        mesh: Any = None,
        **options: Any,
    ) -> Pipeline:
        """Compiles with XLA: ``jax.jit(f, ...)``; other ``jax.jit`` options pass through.

        With a ``mesh``, ``in_shardings``/``out_shardings`` may be PartitionSpecs:
        ``.jit(mesh=mesh, in_shardings=(P(), P('data')))`` is
        ``jax.jit(f, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))))``.
        """
        return self._add(
            BUILTIN_STAGES["jit"],
            (),
            dict(
                static_argnums=static_argnums,
                static_argnames=static_argnames,
                donate_argnums=donate_argnums,
                mesh=mesh,
                **options,
            ),
        )

    def grad(self, argnums: int | tuple[int, ...] = 0, has_aux: bool = False, **options: Any) -> Pipeline:
        """Gradient with respect to ``argnums``: ``jax.grad(f, ...)``."""
        return self._add(BUILTIN_STAGES["grad"], (), dict(argnums=argnums, has_aux=has_aux, **options))

    def value_and_grad(self, argnums: int | tuple[int, ...] = 0, has_aux: bool = False, **options: Any) -> Pipeline:
        """Value and gradient in one pass: ``jax.value_and_grad(f, ...)``."""
        return self._add(BUILTIN_STAGES["value_and_grad"], (), dict(argnums=argnums, has_aux=has_aux, **options))

    def hessian(self, argnums: int | tuple[int, ...] = 0, **options: Any) -> Pipeline:
        """Hessian: ``jax.hessian(f, ...)``."""
        return self._add(BUILTIN_STAGES["hessian"], (), dict(argnums=argnums, **options))

    def jacfwd(self, argnums: int | tuple[int, ...] = 0, **options: Any) -> Pipeline:
        """Forward-mode Jacobian: ``jax.jacfwd(f, ...)``."""
        return self._add(BUILTIN_STAGES["jacfwd"], (), dict(argnums=argnums, **options))

    def jacrev(self, argnums: int | tuple[int, ...] = 0, **options: Any) -> Pipeline:
        """Reverse-mode Jacobian: ``jax.jacrev(f, ...)``."""
        return self._add(BUILTIN_STAGES["jacrev"], (), dict(argnums=argnums, **options))

    def vmap(self, in_axes: Any = 0, out_axes: Any = 0, axis_name: Any = None, **options: Any) -> Pipeline:
        """Vectorizes over a batch axis: ``jax.vmap(f, in_axes, out_axes, axis_name)``."""
        return self._add(
            BUILTIN_STAGES["vmap"], (), dict(in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, **options)
        )

    def pmap(self, axis_name: Any = None, in_axes: Any = 0, out_axes: Any = 0, **options: Any) -> Pipeline:
        """Maps over devices: ``jax.pmap(f, axis_name, in_axes=..., out_axes=...)``."""
        return self._add(
            BUILTIN_STAGES["pmap"], (), dict(axis_name=axis_name, in_axes=in_axes, out_axes=out_axes, **options)
        )

    def shard(
        self, mesh: Any, in_specs: Any, out_specs: Any, *, axis_names: Any = frozenset(), check_vma: bool = True
    ) -> Pipeline:
        """Runs once per device on its block of each argument: ``jax.shard_map(f, mesh=..., ...)``.

        ``in_specs`` has one ``PartitionSpec`` per positional argument: ``P()``
        passes it whole to every device, ``P('data')`` splits its axis 0 over
        mesh axis ``'data'``. Combine across devices inside the function with
        ``jax.lax.pmean``/``psum`` (take the ``pmean`` of a loss, not of its
        gradient: ``jax.grad`` already sums over the axis for replicated
        arguments). For per-example gradients, pass ``check_vma=False``.
        """
        return self._add(
            BUILTIN_STAGES["shard"],
            (),
            dict(mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=axis_names, check_vma=check_vma),
        )

    def data_parallel(
        self,
        mesh: Any,
        axis: str | tuple[str, ...] = "data",
        *,
        param_specs: Any = None,
        rules: Any = None,
        strict: bool = False,
    ) -> Pipeline:
        """Trains on a batch split along mesh axis ``axis``, the state replicated or sharded.

        Put it after the training stages and before ``.scan()``/``.jit()``:
        ``Pipeline(loss).model(m, input="image").optimize(tx).data_parallel(mesh).jit()``.
        The loss and model are unchanged and the result matches one device.
        ``param_specs`` shards parameters and optimizer state instead (the
        optimizer state follows its parameter):

        - ``"annotations"``: Flax's ``nn.with_logical_partitioning`` /
          ``nn.with_partitioning`` metadata, logical names mapped through
          ``rules`` (Flax's ``[(logical, mesh axis or None), ...]``; default:
          the active ``nn.logical_axis_rules``, else names equal to mesh
          axes); unannotated parameters replicated, or an error with
          ``strict=True``.
        - ``"fsdp"``: each parameter of at least 1024 elements split over
          ``axis`` along its largest dimension that axis divides.
        - ``("annotations", "fsdp")``: both, e.g. a (data, model) mesh.
        - a function ``(path, array) -> PartitionSpec``.

        ``init`` compiles the initialiser with these shardings, so no device
        holds the whole parameters; ``fit`` places each batch, from every
        process's own rows across hosts.
        """
        options = dict(mesh=mesh, axis=axis, param_specs=param_specs, rules=rules, strict=strict)
        return self._add(BUILTIN_STAGES["data_parallel"], (), options)

    def remat(self, **options: Any) -> Pipeline:
        """Recomputes activations in the backward pass: ``jax.checkpoint(f, ...)``.

        Named ``remat`` because ``.checkpoint()`` saves training state (Orbax).
        """
        return self._add(BUILTIN_STAGES["remat"], (), options)

    def debug(self) -> Pipeline:
        """Runs the pipeline eagerly under ``jax.disable_jit()`` so breakpoints and print work.

        Must be the last stage.
        """
        return self._add(BUILTIN_STAGES["debug"], (), {})

    def scan(self, steps: int, unroll: int | bool = 1) -> Pipeline:
        """Runs ``steps`` training steps per call with ``jax.lax.scan``.

        The step ``(state, batch) -> (state, metrics)`` becomes
        ``(state, batches) -> (state, metrics)``, where each leaf of ``batches``
        has a leading axis of ``steps`` and each metric gains one. Like Keras's
        ``steps_per_execution``: for small models whose steps are dominated by
        Python dispatch. Put it before ``.jit()``. ``unroll`` is
        ``jax.lax.scan``'s (e.g. 2 lets XLA overlap two small steps).
        """
        return self._add(BUILTIN_STAGES["scan"], (), dict(steps=steps, unroll=unroll))

    def after_step(self, fn: Callable[..., Any]) -> Pipeline:
        """Runs ``fn(state, new_state) -> new_state`` inside each training step, after the update.

        For state of your own in ``state.extra``: place it after ``.optimize()``
        and before ``.scan()``/``.jit()``; ``.ema(decay)`` is one such stage.
        """
        return self._add(BUILTIN_STAGES["after_step"], (), dict(fn=fn))

    # --- building and calling ----------------------------------------------------

    def build(self) -> Callable[..., Any]:
        """The composed JAX callable, built once and shared by equal pipelines.

        For a pipeline ending in ``.jit()`` this is the object ``jax.jit`` returns,
        so ``.lower()``, ``.trace()`` and its cache work as usual.
        """
        built = self._built
        if built is None:
            key = builds.key(self)
            built = builds.lookup(key)
            if built is None:
                built = fold.build(self)
                builds.share(key, built)
            object.__setattr__(self, "_built", built)
        return built

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        built = self._call
        if built is None:
            built = self._first_call()
        try:
            if kwargs:
                return built(*args, **kwargs)
            return built(*args)  # no empty dict to merge: the common call, as close to jax.jit's as Python allows
        except Exception as err:
            located = diagnose.located(self, err, args, kwargs)
            if located is not err:
                raise located from err
            raise

    def _first_call(self) -> Callable[..., Any]:
        """The build, after warning once about stages that act only inside ``fit``."""
        if not plugins.running(self):
            for number, stage in enumerate(self._stages, 1):
                training = stage.kind.training
                if training is not None and training.outside_fit:
                    warnings.warn(
                        f"stage {number} ({stage.name}) of {self!r}: calling the pipeline directly runs the "
                        f"step without `.{stage.name}()`. {training.outside_fit}",
                        stacklevel=3,
                    )
        built = self.build()
        object.__setattr__(self, "_call", built)
        return built

    # --- as text (jaxpipe/spec.py) ------------------------------------------------

    @classmethod
    def from_spec(cls, text: str, namespace: Mapping[str, Any]) -> Pipeline:
        """The pipeline written as text, e.g. ``"loss | grad | vmap(in_axes=(None, 0)) | jit"``.

        Names resolve in ``namespace`` (e.g. ``globals()``); stage arguments are
        literals or names. The text is parsed, never evaluated; a bad one raises
        :class:`~jaxpipe.SpecError` pointing at the line and column.
        """
        return spec.from_spec(text, namespace, cls)

    def to_spec(self, namespace: Mapping[str, Any] | None = None) -> str:
        """This pipeline as spec text; ``Pipeline.from_spec`` reads it back.

        Non-literal option values are written as names: those bound to them in
        ``namespace`` when given, else their own names.
        """
        return spec.to_spec(self, namespace)

    # --- inspection --------------------------------------------------------------

    def explain(self) -> str:
        """The equivalent hand-written JAX, as a string."""
        return fold.explain(self)

    def jaxpr(self, *args: Any, **kwargs: Any) -> Any:
        """The traced program (a ``ClosedJaxpr``) for these arguments."""
        return inspection.jaxpr(self, args, kwargs)

    def hlo(self, *args: Any, dialect: str = "stablehlo", optimized: bool = False, **kwargs: Any) -> str:
        """The lowered program's text; ``optimized=True`` gives XLA's compiled HLO."""
        return inspection.hlo(self, args, kwargs, dialect=dialect, optimized=optimized)

    def cost(self, *args: Any, **kwargs: Any) -> inspection.Cost:
        """Flops, bytes accessed and transcendentals of the compiled program."""
        return inspection.cost(self, args, kwargs)

    def memory(self, *args: Any, **kwargs: Any) -> inspection.Memory:
        """Argument, output, temporary and code sizes of the compiled program."""
        return inspection.memory(self, args, kwargs)

    def timing(self, *args: Any, number: int = 100, repeat: int = 5, **kwargs: Any) -> inspection.Timing:
        """Trace, lower, compile, first-call and steady-state times, in seconds.

        Uses JAX's ahead-of-time API on a fresh copy of the pipeline (so caches
        from earlier calls do not hide compile time), then times ``repeat`` rounds
        of ``number`` calls, each synchronised with ``block_until_ready``.
        """
        return inspection.timing(self, args, kwargs, number=number, repeat=repeat)

    # --- training (stages from the Flax, Optax and Orbax plugins) ---------------

    # `init` and `fit` are the training functions with this pipeline as their first argument: their parameters,
    # types and docstrings come from there (for `help`, `inspect.signature`, mypy), so a new one needs no edit here.
    init = _method_of(training_init.init, "init")
    fit = _method_of(training_fit.fit, "fit")

    def predict(self, state: Any, data: Any, batch_size: int | None = None) -> Any:
        """The model's outputs on ``data`` in evaluation mode, from ``state``'s parameters.

        ``data`` is a dict of arrays, one row per example along axis 0, or one
        array for the model's one input (``.model(m, input="image")``). Runs a
        jitted step of the last stage that can predict (``.model``) on
        ``batch_size`` examples at a time (None: all at once) and concatenates
        the outputs (a pytree of outputs leaf by leaf); a last, smaller batch
        is run as it is, so no row is dropped.
        """
        return training_predict.predict(self, state, data, batch_size)

    def save(self, state: Any) -> bool:
        """Saves ``state`` through this pipeline's ``.checkpoint()`` stage, for a step loop written by hand.

        The state is written when this returns. Returns False if nothing was
        written: its step is saved already, or it holds NaN or inf (a warning).
        """
        with plugins.run_hooks(self) as hook:
            written = hook.jaxpipe_save_state(pipeline=self, state=state)
        if written is None:
            raise _needs_saver(self, "save")
        return bool(written)

    def restore(self, state: Any, *, which: str = "newest") -> Any:
        """The newest checkpoint of this pipeline's ``.checkpoint()`` stage, shaped like ``state``; else ``state``.

        ``which="best"``: the step ``.checkpoint(..., best=...)`` kept for its best evaluation.
        """
        with plugins.run_hooks(self) as hook:
            restored = hook.jaxpipe_restore_state(pipeline=self, state=state, which=which)
        if restored is None:
            raise _needs_saver(self, "restore")
        return restored


def _needs_saver(pipe: Pipeline, action: str) -> PipelineError:
    return PipelineError(
        f"`{action}` needs a stage that saves the training state, and this pipeline has none.\n"
        f"Add one, e.g. trainer = trainer.checkpoint('runs/exp'), then trainer.{action}(state).",
        pipeline=repr(pipe),
    )


def _new(fn: Callable[..., Any], name: str | None, stages: tuple[Stage, ...]) -> Pipeline:
    pipe = object.__new__(Pipeline)
    _fill(pipe, fn, name, stages)
    return pipe


def _fill(pipe: Pipeline, fn: Callable[..., Any], name: str | None, stages: tuple[Stage, ...]) -> None:
    object.__setattr__(pipe, "_fn", fn)
    object.__setattr__(pipe, "_name", name)
    object.__setattr__(pipe, "_stages", stages)
    object.__setattr__(pipe, "_built", None)
    object.__setattr__(pipe, "_call", None)


def _bad_options(kind: StageKind, options: Mapping[str, Any], err: TypeError) -> str:
    """Why ``options`` do not fit ``kind``, with the options it does take."""
    params = kind.signature.parameters
    takes = f"Its options are {format_signature(kind.signature)[1:-1] or 'none'}."
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return f"`.{kind.name}()` {err}.\n{takes}"
    unknown = [name for name in options if name not in params]
    if not unknown:
        return f"`.{kind.name}()` {err}.\n{takes}"
    close = difflib.get_close_matches(unknown[0], params, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"`.{kind.name}()` has no option `{unknown[0]}`.{hint}\n{takes}"


reserve(dir(Pipeline))  # a plugin stage may not take the name of one of Pipeline's own methods
