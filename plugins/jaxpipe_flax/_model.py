"""The ``.model`` stage's loss: a loss on a module's outputs becomes a loss on parameters.

``Pipeline(loss).model(MLP(), input="image")`` turns ``loss(outputs, batch)``
into a :class:`jaxpipe.TrainLoss`: called as ``(params, batch)`` it is the
evaluation-mode loss; its ``train`` method, which ``.optimize`` differentiates,
runs the module in training mode with its keys and carries the mutable
collections (BatchNorm statistics) in ``model_state``.

How each kind of module is initialised and called is its adapter's business
(``_adapters.py`` for Flax Linen and NNX, ``_equinox.py`` for Equinox). This
module maps the batch to the module's arguments and gives out the keys: each
place that takes a key (a Linen RNG stream, an NNX stream or ``rngs``
argument, Equinox's ``key=``, a key stream named in ``input=``) is a slot; the
step's key goes to the slots the traced forward pass draws from (a liveness
walk over its jaxpr), itself for one, split in slot order for several. A model
that draws nothing gets no key: the step leaves ``state.key`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe import PipelineError, loss_and_metrics
from jaxpipe_flax._adapters import Linen, Nnx, call_parameters
from jaxpipe_flax._adapters import mode_flags as _mode_flags
from jaxpipe_flax._equinox import Equinox, is_equinox
from jaxpipe_flax._keys import is_key_stream, live, scheme_line, share, step_keys

# Keyword arguments a loss may declare after (outputs, batch): each is passed only if named.
LOSS_KEYWORDS = ("params", "step", "model_state")


def loss_keywords(loss: Callable[..., Any]) -> tuple[str, ...]:
    """The names of :data:`LOSS_KEYWORDS` that ``loss``'s signature lists (a ``**kwargs`` names none)."""
    import inspect

    try:
        params = inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in LOSS_KEYWORDS if name in params)


def adapter(module: Any, rng_names: Sequence[str]) -> Linen | Nnx | Equinox:
    from flax import nnx

    if is_equinox(module):
        return Equinox(module)
    if isinstance(module, nnx.Module):
        return Nnx(module, _mode_flags(module))
    return Linen(module, _mode_flags(module), rng_names)


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype if hasattr(x, "dtype") else jnp.result_type(x))


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
        self.names = None if input is None else (input,) if isinstance(input, str) else tuple(input)
        self.label = label
        self.rng = rng
        self.adapter = adapter(module, rng_names)
        self.loss_keywords = loss_keywords(loss)
        self._live: dict[Any, tuple[str, ...]] = {}  # abstract arguments -> the slots the forward pass draws from
        self.__name__ = getattr(loss, "__name__", type(loss).__name__)

    def __repr__(self) -> str:
        return f"ModelLoss({self.__name__}, {type(self.module).__name__}, input={self.input!r})"

    @property
    def _stage(self) -> str:
        return f"`.model({type(self.module).__name__}(...), input={self.input!r})`"

    def key_streams(self, batch: Any) -> tuple[str, ...]:
        """The ``input=`` names that are per-step keys: key-like names (``z_rng``) the batch does not hold."""
        if self.names is None or not isinstance(batch, Mapping):
            return ()
        return tuple(name for name in self.names if name not in batch and is_key_stream(name))

    def slots(self, batch: Any) -> tuple[str, ...]:
        """Every place that takes a key in training: the module's own, then the key streams of ``input=``."""
        return (*self.adapter.slots, *(f"input:{name}" for name in self.key_streams(batch)))

    def inputs(
        self, batch: Any, key_of: Callable[[str], Any] | None = None
    ) -> tuple[tuple[Any, ...], tuple[bool, ...]]:
        """The module's positional arguments (``batch[input]``, each key of a tuple, or the batch), and which are keys.

        ``key_of(name)`` gives a key stream's key; without it, a key stream is an error (not in the batch).
        """
        if self.names is None:
            return (batch,), (False,)
        names = self.names
        if not isinstance(batch, Mapping):
            raise PipelineError(
                f"{self._stage} reads fields of each batch, so a batch must be a dict of arrays, "
                f"got {type(batch).__name__}.\nGive batches like {{{names[0]!r}: x, 'label': y}}.",
                stage_name="model",
            )
        streams = self.key_streams(batch) if key_of is not None else ()
        missing = [name for name in names if name not in batch and name not in streams]
        if missing:
            takes = ", ".join(call_parameters(self.module)) or "?"
            raise PipelineError(
                f"{self._stage} feeds batch[{missing[0]!r}] to the module, but the batch has no key "
                f"{missing[0]!r}; its keys are {list(batch)}.\n"
                f"`{type(self.module).__name__}.__call__` takes ({takes}). Name one batch key per positional "
                f"parameter in `input=`, in order, or add {missing[0]!r} to the batch; a name ending in `_rng` or "
                f"`_key` (e.g. 'z_rng') that no batch holds gets a fresh key each step.",
                stage_name="model",
            )
        values = tuple(key_of(name) if name in streams else batch[name] for name in names)  # type: ignore[misc]
        return values, tuple(name in streams for name in names)

    def init(self, key: jax.Array, batch: Any) -> tuple[Any, Any]:
        """``(params, model_state)`` for a sample batch (Linen: ``nn.Module.init``; key streams get ``key``)."""
        return self.adapter.init(key, self.inputs(batch, lambda name: key)[0])

    def _run(
        self,
        params: Any,
        batch: Any,
        model_state: Any,
        train: bool,
        keys: Mapping[str, Any],
        streams: Mapping[str, Any] | None,
        eval_key: Any,
    ) -> tuple[Any, Any]:
        def key_of(name: str) -> Any:
            if not train:
                return jax.random.key(0) if eval_key is None else eval_key
            if streams is None:
                return keys.get(f"input:{name}", eval_key)
            if name not in streams:
                raise PipelineError(
                    f"the `rng=` function gave keys for {sorted(streams)}, but `input=` names the key stream "
                    f"{name!r} too.\nReturn a key for {name!r} as well.",
                    stage_name="model",
                )
            return streams[name]

        inputs, key_inputs = self.inputs(batch, key_of)
        own = None if streams is None else {k: v for k, v in streams.items() if k not in self.key_streams(batch)}
        try:
            return self.adapter.apply(params, model_state, inputs, train, keys, own, key_inputs)
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

    def _apply(self, params: Any, batch: Any, model_state: Any, key: Any) -> tuple[Any, Any]:
        """Training mode with the step's key (one key, shared among the slots drawn from, or named streams)."""
        if isinstance(key, Mapping):  # named streams from an `rng=` function
            return self._run(params, batch, model_state, True, {}, key, None)
        drawn = self.live_slots(key, params, batch, model_state)
        keys = share(key, drawn) if drawn else {}
        return self._run(params, batch, model_state, True, keys, None, key)

    def live_slots(self, key: Any, params: Any, batch: Any, model_state: Any) -> tuple[str, ...]:
        """The slots the training-mode forward pass draws from: traced once per argument shapes."""
        slots = self.slots(batch)
        if not slots:
            return ()
        args = jax.tree.map(_abstract, (params, batch, model_state))
        one = _abstract(jax.tree.leaves(key)[0])
        cache_key = (slots, one, jax.tree.structure(args), tuple(jax.tree.leaves(args)))
        if cache_key not in self._live:
            try:
                closed = jax.make_jaxpr(
                    lambda ks, p, b, m: self._run(p, b, m, True, dict(zip(slots, ks, strict=True)), None, None)
                )((one,) * len(slots), *args)
            except Exception:  # the real trace will raise it with advice; give every slot a key meanwhile
                return slots
            drawn = live(closed.jaxpr, closed.jaxpr.invars[: len(slots)])
            self._live[cache_key] = tuple(slot for slot, used in zip(slots, drawn, strict=True) if used)
        return self._live[cache_key]

    def predict(self, params: Any, batch: Any, model_state: Any = None, key: Any = None) -> Any:
        """The module's outputs in evaluation mode; key streams get ``key`` (``jax.random.key(0)`` if None)."""
        return self._run(params, batch, model_state, False, {}, None, key)[0]

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
        if not self.live_slots(key, params, batch, model_state):
            return key, key
        return step_keys(self.rng, key, step)

    def explain_keys(self) -> str:
        """The step's key line, ``key, dropout_key = ...``, as ``.optimize``'s ``explain`` prints it."""
        return scheme_line(self.rng)

    def metrics(
        self, params: Any, batch: Any, model_state: Any = None, step: Any = 0, key: Any = None
    ) -> dict[str, jax.Array]:
        """Evaluation metrics: the loss, the loss's own metrics, and accuracy for class logits."""
        outputs = self.predict(params, batch, model_state, key)
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
