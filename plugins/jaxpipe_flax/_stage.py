"""The ``.model`` stage kind: its options, their checks, its share of ``init``/evaluation/``predict``, ``explain``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe import StageContext, StageKind, Training, TrainState
from jaxpipe_flax._adapters import TRAIN_FLAGS, Nnx
from jaxpipe_flax._equinox import Equinox, is_equinox, stateful_layers
from jaxpipe_flax._keys import is_key, is_key_stream
from jaxpipe_flax._model import LOSS_KEYWORDS, ModelLoss, _mode_flags, loss_keywords


def model(
    loss: Callable[..., Any],
    module: Any,
    input: str | tuple[str, ...] | None = None,
    *,
    label: str | None = "label",
    rng_names: tuple[str, ...] = ("dropout",),
    rng: Any = "split",
) -> ModelLoss:
    """Runs a model (Flax Linen, Flax NNX or Equinox) on the batch; the loss gets its outputs.

    ``loss(outputs, batch)`` becomes a loss on ``(params, batch)`` that
    ``.optimize`` trains: ``Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(1e-3))``.
    In training the module runs in training mode with fresh keys each step;
    called as ``(params, batch)``, in evaluation, in ``jaxpipe.evaluate`` and in
    ``trainer.predict``, it runs in evaluation mode.

    Args:
      module: the model, an instance.

        - Flax Linen: parameters from Flax's ``nn.Module.init`` on the sample
          batch (a module's own ``init(self, rng)``, as nanoGPT writes, is never
          called), Flax's ``params`` collection trained, the other collections
          (BatchNorm's ``batch_stats``) carried in ``state.model_state``. A
          ``train``/``training``/``is_training``/``deterministic``/
          ``use_running_average`` argument of ``__call__`` is set per mode; a
          module without one is called without.
        - Flax NNX: it brings its parameters (made from its ``nnx.Rngs``) and is
          never modified: ``nnx.split`` outside, ``nnx.merge`` inside the step,
          ``model.train()``/``model.eval()`` per mode. Each of its RNG streams is
          reseeded from the step's key; a ``__call__(self, x, rngs)`` (Flax's
          MNIST CNN) gets ``nnx.Rngs(dropout_key)`` in training, ``None`` in
          evaluation.
        - Equinox: called on ONE example and ``jax.vmap``-ped over the batch, as
          Equinox writes it; ``eqx.partition(module, eqx.is_inexact_array)``
          gives the parameters; ``eqx.nn.inference_mode`` switches the mode; a
          ``key`` parameter gets ``jax.random.split(dropout_key, batch_size)``,
          one key per example (``None`` in evaluation). Layers with
          ``eqx.nn.State`` (BatchNorm) are refused.

      input: the batch key fed to the module, e.g. ``input="image"``
        (``module(batch["image"])``); a tuple for several positional arguments
        in order, ``input=("image", "mask")``; None for the whole batch. A
        key-like name (``key``, ``rng``, ending in ``_key`` or ``_rng``) that
        the batch does not hold is a per-step key stream: Flax's VAE,
        ``__call__(self, x, z_rng)``, is ``.model(vae, input=("image", "z_rng"))``
        and gets a fresh ``z_rng`` each step (the params key in ``init``,
        ``state.key`` in evaluation and ``predict``).
      label: the batch key of integer labels; evaluation reports
        ``accuracy`` of ``argmax(outputs)`` against it. None for none.
      rng_names: a Linen module's RNG streams, each given a key in training,
        e.g. ``rng_names=("dropout", "noise")`` for ``self.make_rng("noise")``.
      rng: how each training step gets the model's keys from ``state.key``:

        - ``"split"`` (the default): ``key, dropout_key = jax.random.split(state.key)``;
          ``key`` becomes the next ``state.key``.
        - ``"fold_in"``: ``dropout_key = jax.random.fold_in(state.key, state.step)``;
          ``state.key`` never changes (``.model(net, input="image", rng="fold_in")``).
        - a function ``rng(key, step) -> (next_key, keys)``, where ``keys`` is one
          key or a dict of named streams, e.g. ``{"dropout": k1, "noise": k2}``
          (Linen's ``rngs=``; for NNX each stream of the module, and
          ``nnx.Rngs(**keys)``; for Equinox ``{"key": k}``; a key stream of
          ``input=`` by its name).

        The step's key goes to the places the forward pass draws from (the
        RNG streams, ``rngs``, ``key``, the key streams of ``input=``): the key
        itself to one, ``jax.random.split(dropout_key, n)`` in that order to
        several. A model that draws no random numbers gets no key and leaves
        ``state.key`` as it is (found when the step is traced).

    The loss may also name keyword parameters, and gets only those it names:
    ``params`` (the parameters being trained, so an L2 penalty is
    differentiated), ``step`` (``state.step``; 0 when called as a plain loss)
    and ``model_state`` (the collections after this forward pass):
    ``def loss(logits, batch, *, params): ...``.
    """
    return ModelLoss(loss, module, input, label, rng_names, rng)


def _names(input: Any) -> tuple[str, ...]:
    return () if input is None else (input,) if isinstance(input, str) else tuple(input)


def _check_call(module: Any, input: Any) -> None:
    """The module's ``__call__`` must take the inputs, the mode flag and (NNX) ``rngs``; nothing else required."""
    from flax import nnx

    try:
        sig = inspect.signature(module.__call__)
    except (TypeError, ValueError):
        return
    names = _names(input)
    count = len(names) or 1
    given: dict[str, Any] = {} if is_equinox(module) else dict.fromkeys(_mode_flags(module), True)
    if isinstance(module, nnx.Module) and "rngs" in sig.parameters:
        given["rngs"] = None
    try:
        sig.bind(*range(count), **given)
    except TypeError as err:
        name = type(module).__name__
        args = ", ".join(
            [*(f"batch[{k!r}]" for k in names), *([] if names else ["batch"]), *(f"{k}=..." for k in given)]
        )
        P = inspect.Parameter
        positional = [p.name for p in sig.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        wanted = [p for p in positional if p not in given and sig.parameters[p].default is P.empty]
        example = (*names, *wanted[len(names) :]) if len(wanted) > len(names) else names
        raise ValueError(
            f"`.model()` calls `{name}.__call__({args})`, but it takes ({', '.join(sig.parameters)}): {err}.\n"
            f"Name one batch key per positional parameter in `input=`, in order, e.g. input={tuple(example)!r}; "
            f"a key-like name (such as 'z_rng' or 'noise_key') that no batch holds gets a fresh key each step. "
            f"Other parameters need defaults: the stage fills only {list(TRAIN_FLAGS)}, and `rngs` (NNX)."
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
    ok = isinstance(result, tuple) and len(result) == 2 and is_key(result[0]) and result[0].shape == ()
    keys = result[1] if ok else None
    leaves = jax.tree.leaves(keys)
    if not ok or not leaves or not all(is_key(k) and k.shape == () for k in leaves):
        raise ValueError(
            f"`rng={name}` must return (next_key, keys): the state's next key and one key or a dict of "
            f"named keys, all typed keys (jax.random.key); it returned {result!r}.{example}"
        )


def _check_module(module: Any) -> None:
    from flax import linen, nnx

    if isinstance(module, type):
        raise TypeError(
            f"`.model()` needs a module instance, got the class {module.__name__}.\n"
            f"Write .model({module.__name__}(...))."
        )
    if is_equinox(module):
        layers = stateful_layers(module)
        if layers:
            raise TypeError(
                f"`.model()` runs Equinox modules without `eqx.nn.State`, but this {type(module).__name__} holds "
                f"state in {', '.join(layers)}.\nUse a stateless normalisation (eqx.nn.LayerNorm, eqx.nn.GroupNorm), "
                f"or write the step by hand with eqx.nn.make_with_state and give it to Pipeline(step).jit()."
            )
        return
    if not isinstance(module, (linen.Module, nnx.Module)):
        raise TypeError(
            f"`.model()` needs a Flax module (flax.linen.Module or flax.nnx.Module) or an Equinox module "
            f"(equinox.Module), got {type(module).__name__}.\nA function of parameters (stax, a hand-written "
            f"network) needs no `.model`: write `loss(params, batch)` and train it with "
            f"Pipeline(loss).optimize(tx), starting from trainer.init(key, batch, params=params)."
        )


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    module = options["module"]
    _check_module(module)
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
        wanted = loss_keywords(ctx.fn)
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
        return model_loss.metrics(state.params, batch, state.model_state, state.step, state.key)

    return evaluate


def _predict(loss: Callable[..., Any], module: Any, input: Any = None, **options: Any) -> Callable[..., Any]:
    model_loss = model(loss, module, input, **options)

    def predict(state: TrainState, batch: Any) -> Any:
        if isinstance(input, str) and not isinstance(batch, Mapping):
            batch = {input: batch}  # one array for the module's one input
        return model_loss.predict(state.params, batch, state.model_state, state.key)

    return predict


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the model runs the same whatever came before
    from flax import nnx

    module = options["module"]
    names = _names(options.get("input"))
    streams = [name for name in names if is_key_stream(name)]
    inputs = ", ".join(name if name in streams else f"batch[{name!r}]" for name in names) or "batch"
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
    if streams:
        scheme += (
            f"# {', '.join(streams)}: key stream(s) of input=, given dropout_key (split with the model's own "
            f"streams where it draws from several)\n"
        )
    if is_equinox(module):
        adapter = Equinox(module)
        first = next((f"batch[{n!r}]" for n in names if n not in streams), "batch")
        split = f"    keys = jax.random.split(dropout_key, len({first}))  # one key per example\n"
        code = (
            f"model = {type(module).__name__}(...)  # the Equinox module given to .model()\n"
            f"params, static = eqx.partition(model, eqx.is_inexact_array)\n\n"
            f"def model_loss(params, batch, dropout_key, model_state):\n"
            f"    model = eqx.nn.inference_mode(eqx.combine(params, static), value=False)\n"
            f"{split if adapter.takes_key else ''}"
            f"    outputs = jax.vmap(model)({inputs}{', key=keys' if adapter.takes_key else ''})\n"
            f"    return {call}, model_state"
        )
    elif isinstance(module, nnx.Module):
        flags = "".join(f", {name}={TRAIN_FLAGS[name]}" for name in _mode_flags(module))
        nnx_adapter = Nnx(module, _mode_flags(module))
        tags, takes_rngs = nnx_adapter.rng_tags, nnx_adapter.takes_rngs
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
        flag_args = [f"{name}={TRAIN_FLAGS[name]}" for name in _mode_flags(module)]
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
    training=Training(init=_init, evaluate=_evaluate, predict=_predict),
)
