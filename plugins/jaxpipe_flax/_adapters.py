"""How ``.model`` initialises and calls each kind of module: Flax Linen and Flax NNX (Equinox: ``_equinox.py``).

An adapter has ``kind`` (its name in messages), ``slots`` (the names of the
places in the module that take a key in training, in the order a shared step
key is split among them), ``init(key, inputs) -> (params, model_state)`` and
``apply(params, model_state, inputs, train, keys, streams, key_inputs) ->
(outputs, model_state)``. ``keys`` maps the slots that draw random numbers to
their keys; ``streams`` is the dict an ``rng=`` function returned (named
streams), or None; ``key_inputs`` flags which positional inputs are keys.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxpipe import PipelineError
from jaxpipe_flax._keys import typed

# Call arguments that switch a module between training and evaluation, with their training values.
TRAIN_FLAGS = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}


def call_parameters(module: Any) -> dict[str, inspect.Parameter]:
    """The parameters of ``module.__call__`` (none when Python cannot tell)."""
    try:
        return dict(inspect.signature(module.__call__).parameters)
    except (TypeError, ValueError):
        return {}


def mode_flags(module: Any) -> tuple[str, ...]:
    """The train/eval switches ``module.__call__`` takes, e.g. ``("train",)``."""
    params = call_parameters(module)
    return tuple(name for name in TRAIN_FLAGS if name in params)


def flags(names: tuple[str, ...], train: bool) -> dict[str, bool]:
    return {name: TRAIN_FLAGS[name] is train for name in names}


def takes_rngs(module: Any, has_streams: bool) -> bool:
    """Whether to pass ``rngs`` to an NNX module's ``__call__`` (Flax's MNIST CNN: ``__call__(self, x, rngs)``).

    Always when it is required; when optional (``nnx.Sequential``'s ``rngs=None``) only if the module has no
    RNG streams of its own, which it would otherwise use, as it did before ``rngs`` was served.
    """
    param = call_parameters(module).get("rngs")
    return param is not None and (param.default is inspect.Parameter.empty or not has_streams)


class Linen:
    """``nn.Module.init`` / ``nn.Module.apply`` of a Flax Linen module.

    Flax's own ``init`` and ``apply`` are called explicitly, so a module that
    defines its own ``init(self, rng)`` (nanoGPT's GPT) is never called with
    Flax's arguments.
    """

    kind = "Linen"

    def __init__(self, module: Any, mode: tuple[str, ...], rng_names: Sequence[str]) -> None:
        self.module = module
        self.flags = mode
        self.slots = tuple(rng_names)

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
        from flax import linen

        # One compiled program instead of dozens of eager ops (the same numbers as `module.init`).
        init = jax.jit(functools.partial(linen.Module.init, self.module), static_argnames=self.flags)
        variables = dict(init(key, *inputs, **flags(self.flags, train=False)))
        return variables.pop("params", {}), variables

    def apply(
        self,
        params: Any,
        model_state: Any,
        inputs: tuple[Any, ...],
        train: bool,
        keys: Mapping[str, jax.Array],
        streams: Mapping[str, jax.Array] | None,
        key_inputs: tuple[bool, ...],
    ) -> tuple[Any, Any]:
        from flax import linen

        del key_inputs  # a Linen module takes one key for the whole batch
        apply = functools.partial(linen.Module.apply, self.module)
        model_state = model_state or {}
        variables = {"params": params, **model_state}
        kwargs: dict[str, Any] = flags(self.flags, train=train)  # the module's own train/deterministic flag
        if not train:
            return apply(variables, *inputs, **kwargs), model_state
        rngs = dict(streams) if streams is not None else {name: keys[name] for name in self.slots if name in keys}
        if not model_state:
            return apply(variables, *inputs, rngs=rngs, **kwargs), model_state
        outputs, updates = apply(variables, *inputs, rngs=rngs, mutable=list(model_state), **kwargs)
        return outputs, {**model_state, **updates}


class Nnx:
    """A Flax NNX module split into a graph definition and pure-dict state."""

    kind = "NNX"

    def __init__(self, module: Any, mode: tuple[str, ...]) -> None:
        from flax import nnx

        graphdef, params, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)  # type: ignore[misc]
        self.graphdef: Any = graphdef
        self.params, self.rngs, self.model_state = (nnx.to_pure_dict(s) for s in (params, rngs, rest))
        self.flags = mode
        found = (node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream))
        self.rng_tags = sorted({stream.key.tag for stream in found})
        self.takes_rngs = takes_rngs(module, bool(self.rng_tags))
        self.slots = (*self.rng_tags, *(("rngs",) if self.takes_rngs else ()))

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, Any]:
        del key, inputs  # an NNX module brings its parameters, made from its own nnx.Rngs
        return self.params, self.model_state

    def apply(
        self,
        params: Any,
        model_state: Any,
        inputs: tuple[Any, ...],
        train: bool,
        keys: Mapping[str, jax.Array],
        streams: Mapping[str, jax.Array] | None,
        key_inputs: tuple[bool, ...],
    ) -> tuple[Any, Any]:
        from flax import nnx

        del key_inputs  # an NNX module takes one key for the whole batch
        # merged from arrays inside the trace, so NNX lets this step advance its RNG counters
        model = nnx.merge(self.graphdef, params, self.rngs, self.model_state if model_state is None else model_state)
        kwargs: dict[str, Any] = flags(self.flags, train=train)
        if not train:
            model.eval()
            if self.takes_rngs:
                kwargs["rngs"] = None  # as Flax's MNIST example evaluates: model(x, None)
        else:
            model.train()
            tags = self.rng_tags
            if streams is not None:  # named streams from an `rng=` function
                missing = [tag for tag in tags if tag not in streams]
                if missing:
                    raise PipelineError(
                        f"the `rng=` function gave keys for {sorted(streams)}, but the module has the RNG stream "
                        f"{missing[0]!r} too.\nReturn a key for each of {tags}.",
                        stage_name="model",
                    )
                if tags:
                    nnx.reseed(model, **{tag: typed(streams[tag]) for tag in tags})  # type: ignore[arg-type]
                if self.takes_rngs:
                    kwargs["rngs"] = nnx.Rngs(**{name: typed(k) for name, k in streams.items()})
            else:
                drawn = {tag: typed(keys[tag]) for tag in tags if tag in keys}
                if drawn:
                    nnx.reseed(model, **drawn)  # type: ignore[arg-type]
                if self.takes_rngs:  # None where the module draws nothing from it (found when traced)
                    kwargs["rngs"] = nnx.Rngs(typed(keys["rngs"])) if "rngs" in keys else None
        outputs = model(*inputs, **kwargs)
        return outputs, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))
