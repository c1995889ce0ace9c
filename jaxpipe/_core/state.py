"""The training state, and the contract a loss that knows how to train keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxpipe.errors import PipelineError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: optimizer steps taken (an int32 scalar array).
      params: the model's trainable parameters (Flax's ``params`` collection).
      opt_state: the Optax optimizer state.
      key: the PRNG key of the steps: by default each step splits off a fresh
        dropout key from it (``.model(..., rng=...)`` chooses another scheme;
        a model that draws no random numbers leaves it as it is).
      model_state: the model's other mutable collections, e.g.
        ``{"batch_stats": ...}`` for BatchNorm; empty when there are none.
      data_key: the key ``fit`` shuffles with: epoch ``e`` uses
        ``jax.random.fold_in(data_key, e)``, so a resumed run sees the same batches.
      extra: the user's own fields, a dict pytree (empty by default), carried
        through every step, checkpoint and ``fit`` like the rest, e.g.
        ``state.extra["ema_params"]`` from ``.ema(decay)``. Set it with
        ``state.replace(extra={...})``; a stage's ``Training.after_step``
        updates it inside the compiled step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    model_state: Any
    data_key: jax.Array
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields changed (as ``flax.struct`` states offer)."""
        return dataclasses.replace(self, **changes)


@runtime_checkable
class TrainLoss(Protocol):
    """A loss that knows how to train: what ``.model`` hands to ``.optimize``.

    A plain loss on ``(params, batch)`` is not enough for a training step: a
    model also needs a fresh dropout key and its mutable collections (BatchNorm
    statistics). ``.optimize`` differentiates :meth:`train`; calling the object
    gives the evaluation-mode loss, so ``.grad()`` or ``.jit()`` work on it too.

    Optional, used by ``.optimize`` when present: a ``step`` keyword of
    :meth:`train` (``state.step``, for a loss that names it) and a method
    ``step_keys(key, step, params, batch, model_state) -> (next_key, keys)``,
    the model's own per-step key scheme.
    """

    def __call__(self, params: Any, batch: Any, model_state: Any = None) -> jax.Array:
        """The scalar loss in evaluation mode (no dropout, running statistics)."""
        ...

    def train(
        self, params: Any, batch: Any, key: jax.Array, model_state: Any
    ) -> tuple[jax.Array, tuple[dict[str, Any], Any]]:
        """``(loss, (metrics, new_model_state))`` in training mode, for ``jax.value_and_grad(has_aux=True)``."""
        ...


def not_a_state(value: Any) -> str | None:
    """Why ``value`` is not a :class:`TrainState` (for a hook's result), or None when it is one."""
    return None if isinstance(value, TrainState) else f"a {type(value).__name__}, not a jaxpipe.TrainState"


def loss_and_metrics(value: Any, name: str, stage_name: str) -> tuple[jax.Array, dict[str, Any]]:
    """``(loss, metrics)`` from what a loss returned: a scalar, or ``(scalar, dict of metrics)``.

    The one rule every training stage applies to a user's loss, so the errors read the same.

    Args:
      value: the loss function's result.
      name: the loss function's name, for messages.
      stage_name: the stage that called it, for messages.
    """
    metrics: Any = {}
    if isinstance(value, tuple) and len(value) == 2:
        value, metrics = value
        if not isinstance(metrics, Mapping):
            raise PipelineError(
                f"`{name}` returned a pair, so its second item should be a dict of metrics, "
                f"got {type(metrics).__name__}.\nReturn `loss` or `(loss, {{'name': value, ...}})`.",
                stage_name=stage_name,
            )
    if jnp.shape(value) != ():
        raise PipelineError(
            f"`{name}` must return one number to train on, but it returned an array of shape "
            f"{jnp.shape(value)}.\nReduce it over the batch, e.g. `return losses.mean()`; "
            f"return other values as metrics: `return loss, {{'name': value}}`.",
            stage_name=stage_name,
        )
    return value, dict(metrics)


def split_init_key(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The documented key derivation of ``init``: (params key, step key, data key)."""
    params_key, run_key, data_key = jax.random.split(key, 3)
    return params_key, run_key, data_key
