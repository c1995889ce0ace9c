"""The ``.model`` stage: a loss on a Flax module's outputs becomes a loss on parameters.

``Pipeline(loss).model(MLP(), input="image")`` turns ``loss(outputs, batch)``
into a :class:`jaxpipe.TrainLoss`: called as ``(params, batch)`` it is the
evaluation-mode loss; its ``train`` method, which ``.optimize`` differentiates,
runs the module in training mode with a dropout key and carries the mutable
collections (BatchNorm statistics) in ``model_state``.

Linen modules run through ``module.init`` / ``module.apply``. NNX modules run
functionally, ``nnx.merge`` inside the traced step and ``nnx.split`` state out,
as Flax's performance guide recommends; their RNG streams get keys derived
from the step's dropout key, because NNX refuses to advance RNG counters that
were created outside the trace. An NNX ``__call__`` that takes ``rngs`` (as
Flax's MNIST example does) gets ``nnx.Rngs(dropout_key)`` in training and
``None`` in evaluation.

The per-step key is the ``rng=`` option (see :func:`model`); a model that
draws no random numbers gets no key at all: the step leaves ``state.key``
alone. That is found when the step is traced, by checking whether the traced
forward pass uses the key (a liveness walk over its jaxpr).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe import PipelineError, StageContext, StageKind, Training, TrainState, loss_and_metrics

# Call arguments that switch a module between training and evaluation, with their training values.
TRAIN_FLAGS = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}


def _mode_flags(module: Any) -> tuple[str, ...]:
    """The train/eval switches ``module.__call__`` takes, e.g. ``("train",)``."""
    try:
        params = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in TRAIN_FLAGS if name in params)


def _flags(names: tuple[str, ...], train: bool) -> dict[str, bool]:
    return {name: TRAIN_FLAGS[name] is train for name in names}


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _typed(key: jax.Array) -> jax.Array:
    """A typed key; legacy ``jax.random.PRNGKey`` arrays are wrapped."""
    return key if _is_key(key) else jax.random.wrap_key_data(key)


# Keyword arguments a loss may declare after (outputs, batch): each is passed only if named.
LOSS_KEYWORDS = ("params", "step", "model_state")


def _loss_keywords(loss: Callable[..., Any]) -> tuple[str, ...]:
    """The names of :data:`LOSS_KEYWORDS` that ``loss``'s signature lists (a ``**kwargs`` names none)."""
    try:
        params = inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in LOSS_KEYWORDS if name in params)


def _takes_rngs(module: Any, has_streams: bool) -> bool:
    """Whether to pass ``rngs`` to an NNX module's ``__call__`` (Flax's MNIST CNN: ``__call__(self, x, rngs)``).

    Always when it is required; when optional (``nnx.Sequential``'s ``rngs=None``) only if the module has no
    RNG streams of its own, which it would otherwise use, as it did before ``rngs`` was served.
    """
    try:
        param = inspect.signature(module.__call__).parameters.get("rngs")
    except (TypeError, ValueError):
        return False
    return param is not None and (param.default is inspect.Parameter.empty or not has_streams)


def step_keys(rng: Any, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
    """``(next state key, the model's keys)`` under the ``rng=`` scheme of :func:`model`."""
    if rng == "split":
        key, dropout_key = jax.random.split(key)
        return key, dropout_key
    if rng == "fold_in":
        return key, jax.random.fold_in(key, step)
    return rng(key, step)


def _uses(jaxpr: Any, invars: Sequence[Any]) -> bool:
    """Whether any of ``invars`` reaches an output or an effect of ``jaxpr`` (backward liveness)."""
    live = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in live for v in eqn.outvars):
            live.update(id(v) for v in eqn.invars)
    return any(id(v) in live for v in invars)


def _split_keys(key: jax.Array, count: int) -> list[jax.Array]:
    return [key] if count == 1 else list(jax.random.split(key, count))


class _Linen:
    """``module.init`` / ``module.apply`` of a Flax Linen module."""

    def __init__(self, module: Any, rng_names: Sequence[str]) -> None:
        self.module = module
        self.flags = _mode_flags(module)
        self.rng_names = tuple(rng_names)

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        # One compiled program instead of dozens of eager ops (the same numbers as `module.init`).
        init = jax.jit(self.module.init, static_argnames=self.flags)
        variables = dict(init(key, *inputs, **_flags(self.flags, train=False)))
        return variables.pop("params", {}), variables

    def apply(self, params: Any, model_state: Any, inputs: tuple[Any, ...], key: jax.Array | None) -> tuple[Any, Any]:
        model_state = model_state or {}
        variables = {"params": params, **model_state}
        kwargs = _flags(self.flags, train=key is not None)
        if key is None:
            return self.module.apply(variables, *inputs, **kwargs), model_state
        if isinstance(key, Mapping):  # named streams from an `rng=` function
            rngs = dict(key)
        else:
            rngs = dict(zip(self.rng_names, _split_keys(key, len(self.rng_names)), strict=True))
        if not model_state:
            return self.module.apply(variables, *inputs, rngs=rngs, **kwargs), model_state
        outputs, updates = self.module.apply(variables, *inputs, rngs=rngs, mutable=list(model_state), **kwargs)
        return outputs, {**model_state, **updates}


class _Nnx:
    """A Flax NNX module split into a graph definition and pure-dict state."""

    def __init__(self, module: Any) -> None:
        from flax import nnx

        graphdef, params, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)  # type: ignore[misc]
        self.graphdef: Any = graphdef
        self.params, self.rngs, self.model_state = (nnx.to_pure_dict(s) for s in (params, rngs, rest))
        self.flags = _mode_flags(module)
        streams = (node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream))
        self.rng_tags = sorted({stream.key.tag for stream in streams})
        self.takes_rngs = _takes_rngs(module, bool(self.rng_tags))

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, Any]:
        del key, inputs  # an NNX module brings its parameters, made from its own nnx.Rngs
        return self.params, self.model_state

    def apply(self, params: Any, model_state: Any, inputs: tuple[Any, ...], key: jax.Array | None) -> tuple[Any, Any]:
        from flax import nnx

        # merged from arrays inside the trace, so NNX lets this step advance its RNG counters
        model = nnx.merge(self.graphdef, params, self.rngs, self.model_state if model_state is None else model_state)
        kwargs: dict[str, Any] = _flags(self.flags, train=key is not None)
        if key is None:
            model.eval()
            if self.takes_rngs:
                kwargs["rngs"] = None  # as Flax's MNIST example evaluates: model(x, None)
        else:
            model.train()
            tags = self.rng_tags
            if isinstance(key, Mapping):  # named streams from an `rng=` function
                missing = [tag for tag in tags if tag not in key]
                if missing:
                    raise PipelineError(
                        f"the `rng=` function gave keys for {sorted(key)}, but the module has the RNG stream "
                        f"{missing[0]!r} too.\nReturn a key for each of {tags}.",
                        stage_name="model",
                    )
                nnx.reseed(model, **{tag: _typed(key[tag]) for tag in tags})  # type: ignore[arg-type]
                if self.takes_rngs:
                    kwargs["rngs"] = nnx.Rngs(**{name: _typed(k) for name, k in key.items()})
            else:
                keys = _split_keys(_typed(key), len(tags) + self.takes_rngs)
                nnx.reseed(model, **dict(zip(tags, keys, strict=False)))  # type: ignore[arg-type]
                if self.takes_rngs:
                    kwargs["rngs"] = nnx.Rngs(keys[-1])
        outputs = model(*inputs, **kwargs)
        return outputs, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))


def _adapter(module: Any, rng_names: Sequence[str]) -> _Linen | _Nnx:
    from flax import nnx

    return _Nnx(module) if isinstance(module, nnx.Module) else _Linen(module, rng_names)


class ModelLoss:
    """``loss(module(batch[input]), batch)`` as a :class:`jaxpipe.TrainLoss` on ``(params, batch)``."""

    def __init__(
        self,
        loss: Callable[..., Any],
        module: Any,
        input: str | Sequence[str] | None = None,
        label: str | None = "label",
        rng_names: Sequence[str] = ("dropout",),
        rng: Any = "split",
    ) -> None:
        self.loss = loss
        self.module = module
        self.input = input
        self.label = label
        self.rng = rng
        self.adapter = _adapter(module, rng_names)
        self.loss_keywords = _loss_keywords(loss)
        self._draws: dict[Any, bool] = {}  # abstract arguments -> whether the forward pass draws random numbers
        self.__name__ = getattr(loss, "__name__", type(loss).__name__)

    def __repr__(self) -> str:
        return f"ModelLoss({self.__name__}, {type(self.module).__name__}, input={self.input!r})"

    @property
    def _stage(self) -> str:
        return f"`.model({type(self.module).__name__}(...), input={self.input!r})`"

    def inputs(self, batch: Any) -> tuple[Any, ...]:
        """The module's positional arguments: ``batch[input]`` (each key of a tuple), or the batch."""
        if self.input is None:
            return (batch,)
        names = (self.input,) if isinstance(self.input, str) else tuple(self.input)
        if not isinstance(batch, Mapping):
            raise PipelineError(
                f"{self._stage} reads fields of each batch, so a batch must be a dict of arrays, "
                f"got {type(batch).__name__}.\nGive batches like {{{names[0]!r}: x, 'label': y}}.",
                stage_name="model",
            )
        missing = [name for name in names if name not in batch]
        if missing:
            raise PipelineError(
                f"{self._stage} feeds batch[{missing[0]!r}] to the module, but the batch has no key "
                f"{missing[0]!r}; its keys are {list(batch)}.\n"
                f"Name one of those in `input=`, or add {missing[0]!r} to the batch.",
                stage_name="model",
            )
        return tuple(batch[name] for name in names)

    def init(self, key: jax.Array, batch: Any) -> tuple[Any, Any]:
        """``(params, model_state)`` for a sample batch (Linen: ``module.init``)."""
        return self.adapter.init(key, self.inputs(batch))

    def _apply(self, params: Any, batch: Any, model_state: Any, key: jax.Array | None) -> tuple[Any, Any]:
        inputs = self.inputs(batch)
        try:
            return self.adapter.apply(params, model_state, inputs, key)
        except Exception as err:
            if _is_rng_error(err):
                raise PipelineError(
                    f"{self._stage}: the module draws from an RNG stream that got no key: {err}\n"
                    f"Name every stream it draws from, e.g. rng_names=('dropout', 'noise'), or give an "
                    f"`rng=` function that returns a dict of keys, one per stream.",
                    stage_name="model",
                ) from err
            if not _is_shape_error(err):
                raise
            shapes = ", ".join(f"{jnp.shape(x)} {jnp.result_type(x)}" for x in jax.tree.leaves(inputs))
            first = str(err).strip().splitlines()[0]
            raise PipelineError(
                f"{self._stage}: the module rejected inputs of shape {shapes}: {first}\n"
                f"The parameters were made by `init` from a sample batch of other shapes. Give batches "
                f"shaped like that sample (all but the batch axis), or call `init` with a sample like this batch.",
                stage_name="model",
            ) from err

    def predict(self, params: Any, batch: Any, model_state: Any = None) -> Any:
        """The module's outputs in evaluation mode."""
        return self._apply(params, batch, model_state, None)[0]

    def __call__(self, params: Any, batch: Any, model_state: Any = None, step: Any = 0) -> jax.Array:
        return self._loss(self.predict(params, batch, model_state), batch, params, step, model_state)[0]

    def train(
        self, params: Any, batch: Any, key: Any, model_state: Any, step: Any = 0
    ) -> tuple[jax.Array, tuple[dict, Any]]:
        """``(loss, (metrics, new_model_state))`` in training mode; ``key``: the model's keys for this step."""
        outputs, model_state = self._apply(params, batch, model_state, key)
        value, metrics = self._loss(outputs, batch, params, step, model_state)
        return value, (metrics, model_state)

    def step_keys(self, key: jax.Array, step: jax.Array, params: Any, batch: Any, model_state: Any) -> tuple[Any, Any]:
        """``(next state key, the model's keys)`` for one training step, under the ``rng=`` scheme.

        A model whose forward pass draws no random numbers gets ``state.key``
        itself (unused, so XLA drops it) and the state key stays as it is: no
        split per step.
        """
        if not self.draws_random(key, step, params, batch, model_state):
            return key, key
        return step_keys(self.rng, key, step)

    def draws_random(self, key: jax.Array, step: jax.Array, params: Any, batch: Any, model_state: Any) -> bool:
        """Whether the training-mode forward pass uses its keys: traced once per argument shapes."""
        model_keys = jax.eval_shape(lambda k, s: step_keys(self.rng, k, s)[1], key, step)
        abstract = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
        args = jax.tree.map(abstract, (params, batch, model_state))
        cache_key = (jax.tree.structure((model_keys, args)), tuple(jax.tree.leaves((model_keys, args))))
        if cache_key not in self._draws:
            try:
                closed = jax.make_jaxpr(lambda k, p, b, m: self._apply(p, b, m, k))(model_keys, *args)
                count = len(jax.tree.leaves(model_keys))
                self._draws[cache_key] = _uses(closed.jaxpr, closed.jaxpr.invars[:count])
            except Exception:  # the real trace will raise it with advice; split as usual meanwhile
                return True
        return self._draws[cache_key]

    def metrics(self, params: Any, batch: Any, model_state: Any = None, step: Any = 0) -> dict[str, jax.Array]:
        """Evaluation metrics: the loss, the loss's own metrics, and accuracy for class logits."""
        outputs = self.predict(params, batch, model_state)
        value, metrics = self._loss(outputs, batch, params, step, model_state)
        result = {**metrics, "loss": value}
        labels = batch.get(self.label) if self.label is not None and isinstance(batch, Mapping) else None
        if (
            labels is not None
            and jnp.issubdtype(jnp.result_type(labels), jnp.integer)
            and jnp.issubdtype(jnp.result_type(outputs), jnp.floating)
            and jnp.ndim(outputs) >= 1
            and jnp.shape(labels) == jnp.shape(outputs)[:-1]
        ):
            result["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == labels)
        return result

    def _loss(
        self, outputs: Any, batch: Any, params: Any, step: Any, model_state: Any
    ) -> tuple[jax.Array, dict[str, Any]]:
        given = {"params": params, "step": step, "model_state": {} if model_state is None else model_state}
        try:
            value = self.loss(outputs, batch, **{name: given[name] for name in self.loss_keywords})
        except KeyError as err:
            key = err.args[0] if err.args else None
            if not isinstance(batch, Mapping) or key in batch:
                raise
            raise PipelineError(
                f"`{self.__name__}` reads batch[{key!r}], but the batch has keys {list(batch)}.\n"
                f"Add {key!r} to every batch (and the sample batch), or change the loss to use one of those keys.",
                stage_name="model",
            ) from err
        return loss_and_metrics(value, self.__name__, "model")


def _is_rng_error(err: Exception) -> bool:
    from flax import errors

    return isinstance(err, errors.InvalidRngError)


def _is_shape_error(err: Exception) -> bool:
    from flax import errors

    if isinstance(err, errors.ScopeParamShapeError):
        return True
    return isinstance(err, TypeError) and not isinstance(err, PipelineError) and "shape" in str(err)


# --- the stage kind ---------------------------------------------------------------


def model(
    loss: Callable[..., Any],
    module: Any,
    input: str | tuple[str, ...] | None = None,
    *,
    label: str | None = "label",
    rng_names: tuple[str, ...] = ("dropout",),
    rng: Any = "split",
) -> ModelLoss:
    """Runs a Flax module (Linen or NNX) on ``batch[input]`` and feeds its outputs to the loss.

    ``loss(outputs, batch)`` becomes a loss on ``(params, batch)`` that
    ``.optimize`` trains; ``init`` gets the parameters (Flax's ``params``
    collection) and the other collections (``model_state``) from
    ``module.init``. A ``train``/``training``/``deterministic`` call argument
    is set per mode. ``input`` may be a tuple of keys (positional arguments)
    or None (the whole batch); ``label`` names the integer labels that eval
    accuracy compares with ``argmax(outputs)``; ``rng_names`` are the Linen
    RNG streams given a fresh key each step. An NNX module brings its own
    initial parameters (made from its ``nnx.Rngs``) and is never modified;
    each of its RNG streams is reseeded from the step's dropout key, and a
    ``__call__(self, x, rngs)`` gets ``nnx.Rngs(dropout_key)`` (``None`` in
    evaluation).

    The loss may also name keyword parameters, and gets only those it names:
    ``params`` (the parameters being trained, so an L2 penalty is
    differentiated), ``step`` (``state.step``; 0 when called as a plain loss)
    and ``model_state`` (the collections after this forward pass).

    ``rng`` is how each training step gets the model's keys from ``state.key``:

    - ``"split"`` (the default): ``key, dropout_key = jax.random.split(state.key)``;
      ``key`` becomes the next ``state.key``.
    - ``"fold_in"``: ``dropout_key = jax.random.fold_in(state.key, state.step)``;
      ``state.key`` never changes.
    - a function ``rng(key, step) -> (next_key, keys)``, where ``keys`` is one key
      or a dict of named streams, e.g. ``{"dropout": k1, "noise": k2}`` (Linen's
      ``rngs=``; for NNX each stream of the module, and ``nnx.Rngs(**keys)``).

    Whatever the scheme, a model whose forward pass draws no random numbers
    gets no key: ``state.key`` stays as it is (found when the step is traced).
    """
    return ModelLoss(loss, module, input, label, rng_names, rng)


def _check_call(module: Any, input: Any) -> None:
    """The module's ``__call__`` must take the inputs, the mode flag and (NNX) ``rngs``; nothing else required."""
    from flax import nnx

    try:
        sig = inspect.signature(module.__call__)
    except (TypeError, ValueError):
        return
    count = 1 if input is None or isinstance(input, str) else len(input)
    given: dict[str, bool | None] = dict.fromkeys(_mode_flags(module), True)
    if isinstance(module, nnx.Module) and "rngs" in sig.parameters:
        given["rngs"] = None
    try:
        sig.bind(*range(count), **given)
    except TypeError as err:
        name = type(module).__name__
        keys = () if input is None else (input,) if isinstance(input, str) else tuple(input)
        inputs = [f"batch[{k!r}]" for k in keys] or ["batch"]
        args = ", ".join([*inputs, *(f"{k}=..." for k in given)])
        raise ValueError(
            f"`.model()` calls `{name}.__call__({args})`, but it takes {sig}: {err}.\n"
            f"Name one batch key per positional argument in `input=` (e.g. input=('image', 'mask')); other "
            f"arguments need defaults. The stage fills only {list(TRAIN_FLAGS)} and, for NNX, `rngs`."
        ) from None


def _check_rng_function(rng: Callable[..., Any]) -> None:
    """An ``rng=`` function maps ``(key, step)`` to ``(next key, one key or a dict of keys)``; traced, not run."""
    name = getattr(rng, "__name__", "rng")
    example = (
        f"\nFor example:\n  def {name}(key, step):\n      key, dropout, noise = jax.random.split(key, 3)\n"
        f"      return key, {{'dropout': dropout, 'noise': noise}}"
    )
    key = jax.random.key(0)
    try:
        result = jax.eval_shape(rng, key, jnp.zeros((), jnp.int32))
    except Exception as err:
        raise ValueError(f"`rng={name}` failed on (key, step): {type(err).__name__}: {err}{example}") from None
    ok = isinstance(result, tuple) and len(result) == 2 and _is_key(result[0]) and result[0].shape == ()
    keys = result[1] if ok else None
    leaves = jax.tree.leaves(keys)
    if not ok or not leaves or not all(_is_key(k) and k.shape == () for k in leaves):
        raise ValueError(
            f"`rng={name}` must return (next_key, keys): the state's next key and one key or a dict of "
            f"named keys, all typed keys (jax.random.key); it returned {result!r}.{example}"
        )


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    from flax import linen, nnx

    module = options["module"]
    if isinstance(module, type):
        raise TypeError(
            f"`.model()` needs a module instance, got the class {module.__name__}.\n"
            f"Write .model({module.__name__}(...))."
        )
    if not isinstance(module, (linen.Module, nnx.Module)):
        raise TypeError(
            f"`.model()` needs a Flax module (a flax.linen.Module or a flax.nnx.Module), got "
            f"{type(module).__name__} {module!r}."
        )
    value = options.get("input")
    names = (value,) if isinstance(value, str) else value
    if value is not None and not (
        isinstance(names, (tuple, list)) and names and all(isinstance(n, str) for n in names)
    ):
        raise TypeError(
            f"`input` names the batch key(s) fed to the module: a string, a tuple of strings, or None "
            f"for the whole batch; got {value!r}.\nFor example .model(MLP(), input='image')."
        )
    rng_names = options.get("rng_names", ("dropout",))
    if not isinstance(rng_names, (tuple, list)) or not rng_names or not all(isinstance(n, str) for n in rng_names):
        raise TypeError(f"`rng_names` must be a tuple of RNG stream names, e.g. ('dropout',), got {rng_names!r}.")
    rng = options.get("rng", "split")
    if not (rng in ("split", "fold_in") or callable(rng)):
        raise ValueError(
            f"`rng` is how each step gets the model's keys: 'split' (the default), 'fold_in', or a function "
            f"(key, step) -> (next_key, keys); got {rng!r}.\nFor example .model(net, input='image', rng='fold_in')."
        )
    if callable(rng):
        _check_rng_function(rng)
    _check_call(module, value)
    if ctx.signature is not None:
        wanted = _loss_keywords(ctx.fn)
        try:
            ctx.signature.bind(None, None, **dict.fromkeys(wanted))
        except TypeError:
            raise ValueError(
                f"`.model()` calls `{ctx.fn_name}(outputs, batch)`, but `{ctx.fn_name}` takes {ctx.signature}.\n"
                f"Write the loss as `def {ctx.fn_name}(outputs, batch): ...`; it may also name keyword parameters "
                f"{', '.join(LOSS_KEYWORDS)}: `def {ctx.fn_name}(outputs, batch, *, params): ...`."
            ) from None


def _init(state: TrainState, key: jax.Array, batch: Any, module: Any, input: Any = None, **options: Any) -> TrainState:
    adapter = model(lambda outputs, batch: outputs, module, input, **options)
    params, model_state = adapter.init(key, batch)
    return state.replace(params=params if state.params is None else state.params, model_state=model_state)


def _evaluate(loss: Callable[..., Any], module: Any, input: Any = None, **options: Any) -> Callable[..., Any]:
    model_loss = model(loss, module, input, **options)

    def evaluate(state: TrainState, batch: Any) -> dict[str, jax.Array]:
        return model_loss.metrics(state.params, batch, state.model_state, state.step)

    return evaluate


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the model runs the same whatever came before
    from flax import nnx

    module = options["module"]
    value = options.get("input")
    if value is None:
        inputs = "batch"
    else:
        inputs = ", ".join(f"batch[{name!r}]" for name in ((value,) if isinstance(value, str) else value))
    names = _mode_flags(module)
    call = f"{inner}(outputs, batch)"  # plus params=, step=, model_state= where the loss names them
    rng = options.get("rng", "split")
    if rng == "fold_in":
        scheme = "# per-step keys, rng='fold_in': dropout_key = jax.random.fold_in(state.key, state.step)\n"
    elif callable(rng):
        name = getattr(rng, "__name__", "rng")
        scheme = (
            f"# per-step keys, rng={name}: key, dropout_key = {name}(state.key, state.step)\n"
            f"# (a dict of keys goes to the RNG streams it names, as Linen's rngs= or nnx.reseed)\n"
        )
    else:
        scheme = "# per-step keys, rng='split': key, dropout_key = jax.random.split(state.key)\n"
    scheme += "# (none, and state.key left as it is, when the model draws no random numbers)\n"
    if isinstance(module, nnx.Module):
        flags = "".join(f", {name}={TRAIN_FLAGS[name]}" for name in names)
        adapter = _Nnx(module)
        tags, takes_rngs = adapter.rng_tags, adapter.takes_rngs
        count = len(tags) + takes_rngs
        if count == 1:
            keys = ["dropout_key"]
            split = ""
        else:
            keys = [f"keys[{i}]" for i in range(count)]
            split = f"    keys = jax.random.split(dropout_key, {count})\n" if count else ""
        reseed = "".join(f"    nnx.reseed(model, {tag}={k})\n" for tag, k in zip(tags, keys, strict=False))
        if takes_rngs:
            flags += f", rngs=nnx.Rngs({keys[-1]})"
        reseed = split + reseed
        code = (
            f"model = {type(module).__name__}(...)  # the NNX module given to .model()\n"
            f"graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)\n\n"
            f"def model_loss(params, batch, dropout_key, model_state):\n"
            f"    model = nnx.merge(graphdef, params, rng_state, model_state)\n"
            f"    model.train()\n"
            f"{reseed}"
            f"    outputs = model({inputs}{flags})\n"
            f"    model_state = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))\n"
            f"    return {call}, model_state"
        )
    else:
        flag_args = [f"{name}={TRAIN_FLAGS[name]}" for name in names]
        rng_names = options.get("rng_names", ("dropout",))
        rngs = (
            f"{{{rng_names[0]!r}: dropout_key}}"
            if len(rng_names) == 1
            else f"dict(zip({tuple(rng_names)!r}, jax.random.split(dropout_key, {len(rng_names)})))"
        )
        args = ", ".join(['{"params": params, **model_state}', inputs, *flag_args])
        code = (
            f"model = {type(module).__name__}(...)  # the Linen module given to .model()\n\n"
            f"def model_loss(params, batch, dropout_key, model_state):\n"
            f"    outputs, model_state = model.apply(\n"
            f"        {args},\n"
            f"        rngs={rngs}, mutable=list(model_state))\n"
            f"    return {call}, model_state"
        )
    return scheme + code, "model_loss"


MODEL = StageKind(
    "model",
    model,
    "flax",
    check=_check,
    explain=_explain,
    training=Training(init=_init, evaluate=_evaluate),
    doc="Runs a Flax module (Linen or NNX) on `batch[input]`; the loss gets its outputs.",
)
