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
were created outside the trace.
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
        names = self.rng_names
        keys = [key] if len(names) == 1 else list(jax.random.split(key, len(names)))
        rngs = dict(zip(names, keys, strict=True))
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

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, Any]:
        del key, inputs  # an NNX module brings its parameters, made from its own nnx.Rngs
        return self.params, self.model_state

    def apply(self, params: Any, model_state: Any, inputs: tuple[Any, ...], key: jax.Array | None) -> tuple[Any, Any]:
        from flax import nnx

        # merged from arrays inside the trace, so NNX lets this step advance its RNG counters
        model = nnx.merge(self.graphdef, params, self.rngs, self.model_state if model_state is None else model_state)
        if key is None:
            model.eval()
        else:
            model.train()
            tags = self.rng_tags
            keys = [_typed(key)] if len(tags) == 1 else list(jax.random.split(_typed(key), len(tags)))
            nnx.reseed(model, **dict(zip(tags, keys, strict=True)))  # type: ignore[arg-type]
        outputs = model(*inputs, **_flags(self.flags, train=key is not None))
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
    ) -> None:
        self.loss = loss
        self.module = module
        self.input = input
        self.label = label
        self.adapter = _adapter(module, rng_names)
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

    def __call__(self, params: Any, batch: Any, model_state: Any = None) -> jax.Array:
        return self._loss(self.predict(params, batch, model_state), batch)[0]

    def train(self, params: Any, batch: Any, key: jax.Array, model_state: Any) -> tuple[jax.Array, tuple[dict, Any]]:
        outputs, model_state = self._apply(params, batch, model_state, key)
        value, metrics = self._loss(outputs, batch)
        return value, (metrics, model_state)

    def metrics(self, params: Any, batch: Any, model_state: Any = None) -> dict[str, jax.Array]:
        """Evaluation metrics: the loss, the loss's own metrics, and accuracy for class logits."""
        outputs = self.predict(params, batch, model_state)
        value, metrics = self._loss(outputs, batch)
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

    def _loss(self, outputs: Any, batch: Any) -> tuple[jax.Array, dict[str, Any]]:
        try:
            value = self.loss(outputs, batch)
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
    each of its RNG streams is reseeded from the step's dropout key.
    """
    return ModelLoss(loss, module, input, label, rng_names)


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
    if ctx.signature is not None:
        try:
            ctx.signature.bind(None, None)
        except TypeError:
            raise ValueError(
                f"`.model()` calls `{ctx.fn_name}(outputs, batch)`, but `{ctx.fn_name}` takes {ctx.signature}.\n"
                f"Write the loss as `def {ctx.fn_name}(outputs, batch): ...`."
            ) from None


def _init(state: TrainState, key: jax.Array, batch: Any, module: Any, input: Any = None, **options: Any) -> TrainState:
    adapter = ModelLoss(lambda outputs, batch: outputs, module, input, rng_names=options.get("rng_names", ("dropout",)))
    params, model_state = adapter.init(key, batch)
    return state.replace(params=params if state.params is None else state.params, model_state=model_state)


def _evaluate(loss: Callable[..., Any], module: Any, input: Any = None, **options: Any) -> Callable[..., Any]:
    model_loss = ModelLoss(loss, module, input, options.get("label", "label"), options.get("rng_names", ("dropout",)))

    def evaluate(state: TrainState, batch: Any) -> dict[str, jax.Array]:
        return model_loss.metrics(state.params, batch, state.model_state)

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
    if isinstance(module, nnx.Module):
        flags = "".join(f", {name}={TRAIN_FLAGS[name]}" for name in names)
        tags = _Nnx(module).rng_tags
        if len(tags) == 1:
            reseed = f"    nnx.reseed(model, {tags[0]}=dropout_key)\n"
        else:
            keys = f"jax.random.split(dropout_key, {len(tags)})"
            reseed = f"    nnx.reseed(model, **dict(zip({tuple(tags)!r}, {keys})))\n" if tags else ""
        code = (
            f"model = {type(module).__name__}(...)  # the NNX module given to .model()\n"
            f"graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)\n\n"
            f"def model_loss(params, batch, dropout_key, model_state):\n"
            f"    model = nnx.merge(graphdef, params, rng_state, model_state)\n"
            f"    model.train()\n"
            f"{reseed}"
            f"    outputs = model({inputs}{flags})\n"
            f"    model_state = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))\n"
            f"    return {inner}(outputs, batch), model_state"
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
            f"    return {inner}(outputs, batch), model_state"
        )
    return code, "model_loss"


MODEL = StageKind(
    "model",
    model,
    "flax",
    check=_check,
    explain=_explain,
    training=Training(init=_init, evaluate=_evaluate),
    doc="Runs a Flax module (Linen or NNX) on `batch[input]`; the loss gets its outputs.",
)
