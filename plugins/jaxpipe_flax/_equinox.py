"""Equinox modules in ``.model``: one example per call, ``jax.vmap``-ped over the batch, as Equinox writes it.

The trainable parameters are ``eqx.partition(module, eqx.is_inexact_array)``'s
first half (an Equinox module with ``None`` where the rest is), the rest stays
static. Training runs ``eqx.nn.inference_mode(model, value=False)``, evaluation
``eqx.nn.inference_mode(model)``. A ``__call__`` with a ``key`` parameter gets
one key per example in training, ``jax.random.split(key, batch_size)``, as
Equinox's dropout examples do, and ``key=None`` in evaluation.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax

from jaxpipe import PipelineError
from jaxpipe_flax._adapters import call_parameters


def is_equinox(module: Any) -> bool:
    """Whether ``module`` is an Equinox module; Equinox is not imported for this (a user of it already has)."""
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(module, eqx.Module)


def stateful_layers(module: Any) -> list[str]:
    """Where ``module`` holds ``eqx.nn.State`` (BatchNorm, SpectralNorm), which ``.model`` does not run."""
    import equinox as eqx  # only for an Equinox module, so already imported

    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    found = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_index)[0]
    return [jax.tree_util.keystr(path[:-1]) or "the module" for path, leaf in found if is_index(leaf)]


class Equinox:
    """An Equinox module: ``jax.vmap(model)`` over the batch, parameters from ``eqx.partition``."""

    kind = "Equinox"

    def __init__(self, module: Any) -> None:
        import equinox as eqx  # only for an Equinox module, so already imported

        self.params, self.static = eqx.partition(module, eqx.is_inexact_array)
        self.takes_key = "key" in call_parameters(module)
        self.slots = ("key",) if self.takes_key else ()

    def init(self, key: jax.Array, inputs: tuple[Any, ...]) -> tuple[Any, Any]:
        del key, inputs  # an Equinox module brings its parameters, made from its own key
        return self.params, {}

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
        import equinox as eqx

        model = eqx.nn.inference_mode(eqx.combine(params, self.static), value=not train)
        examples = [x for x, is_key in zip(inputs, key_inputs, strict=True) if not is_key]
        count = jax.tree.leaves(examples)[0].shape[0] if jax.tree.leaves(examples) else 1

        def per_example(key: jax.Array) -> jax.Array:
            return jax.random.split(key, count)

        args = tuple(per_example(x) if is_key else x for x, is_key in zip(inputs, key_inputs, strict=True))
        kwargs: dict[str, Any] = {}
        if self.takes_key:
            key = None
            if train and streams is not None:
                if "key" not in streams:
                    raise PipelineError(
                        f"the `rng=` function gave keys for {sorted(streams)}, but an Equinox module takes one "
                        f"key, `key=`.\nReturn {{'key': key}}, or one key.",
                        stage_name="model",
                    )
                key = streams["key"]
            elif train:
                key = keys.get("key")
            kwargs["key"] = None if key is None else per_example(key)
        return jax.vmap(model)(*args, **kwargs), model_state
