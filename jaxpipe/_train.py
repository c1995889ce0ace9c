"""The training state and ``Pipeline.init``: a fold over the stages' ``init``.

Training stages (``.model`` from the Flax plugin, ``.optimize`` from the Optax
plugin) each add their share of the state: the model its parameters and
mutable collections, the optimizer its state. Stages with ``run_hooks`` (the
Orbax ``.checkpoint``) may then swap the fresh state for a restored one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxpipe._fold import fold
from jaxpipe._plugins import run_hooks
from jaxpipe._stages import Stage, StageContext
from jaxpipe.errors import PipelineError

if TYPE_CHECKING:
    from jaxpipe._pipeline import Pipeline


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
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    model_state: Any
    data_key: jax.Array

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

    def train(self, params: Any, batch: Any, key: jax.Array, model_state: Any) -> tuple[jax.Array, tuple[dict, Any]]:
        """``(loss, (metrics, new_model_state))`` in training mode, for ``jax.value_and_grad(has_aux=True)``."""
        ...


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


def _check_key(key: Any, pipe: Pipeline) -> None:
    """``init`` takes one PRNG key: ``jax.random.key(0)`` (a legacy ``PRNGKey`` array works too)."""
    dtype = getattr(key, "dtype", None)
    given = f"{type(key).__name__} {key!r}" if dtype is None else f"an array of shape {jnp.shape(key)}, dtype {dtype}"
    try:
        typed = key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
        ok = typed.shape == ()
    except Exception:  # an int, a float array, a wrongly shaped array: not key data
        ok = False
    if not ok:
        raise PipelineError(
            f"`init` takes one PRNG key as its first argument, got {given}.\n"
            f"Pass a key made from the seed: trainer.init(jax.random.key(0), sample_batch).",
            pipeline=repr(pipe),
        )


def _check_sample_batch(batch: Any, pipe: Pipeline) -> None:
    """The sample batch shapes the parameters, so it must hold at least one example."""
    leaves = jax.tree.leaves(batch)
    empty = not leaves or any(jnp.ndim(x) >= 1 and jnp.shape(x)[0] == 0 for x in leaves)
    if empty:
        shown = f"{type(batch).__name__} {batch!r}" if not leaves else "arrays with 0 rows"
        raise PipelineError(
            f"`init` needs a sample batch (one batch of your data, which shapes the parameters), got {shown}.\n"
            f"Pass a few examples, e.g. trainer.init(jax.random.key(0), {{'image': x[:8], 'label': y[:8]}}).",
            pipeline=repr(pipe),
        )


def init(pipe: Pipeline, key: jax.Array, sample_batch: Any, params: Any = None, resume: bool = True) -> TrainState:
    """Builds the initial state from the stages' ``init``; see ``Pipeline.init``."""
    _check_key(key, pipe)
    _check_sample_batch(sample_batch, pipe)
    params_key, run_key, data_key = split_init_key(key)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=None,
        key=run_key,
        model_state={},
        data_key=data_key,
    )

    def add_share(state: TrainState, stage: Stage, ctx: StageContext) -> TrainState:
        del ctx  # a stage's share depends on its options and the state so far
        training = stage.kind.training
        if training is None or training.init is None:
            return state
        return training.init(state, params_key, sample_batch, **stage.options)

    if not any(s.kind.training and s.kind.training.init for s in pipe.stages) and params is None:
        raise PipelineError(
            "`init` builds a training state, but no stage of this pipeline contributes to one.\n"
            "Add training stages, e.g. Pipeline(loss).model(module, input='image').optimize(optax.adam(1e-3)), "
            "or, for a hand-written step (state, batch) -> (state, metrics), pass its parameters: "
            "trainer.init(key, batch, params=params).replace(opt_state=tx.init(params)).",
            pipeline=repr(pipe),
        )
    state = fold(
        pipe, add_share, state, lambda stage, err: f"initialising `.{stage.name}()` failed: {type(err).__name__}: {err}"
    )
    with run_hooks(pipe) as hook:
        restored = hook.jaxpipe_init_state(pipeline=pipe, state=state) if resume else None
        state = state if restored is None else restored
        placed = hook.jaxpipe_place_state(pipeline=pipe, state=state)
    return state if placed is None else placed


def stacks_batches(pipe: Pipeline) -> bool:
    """Whether a call of ``pipe`` takes stacked batches (a stage such as ``.scan(k)`` runs several steps)."""
    return any(stage.kind.steps_per_call is not None for stage in pipe.stages)


def scan_steps(pipe: Pipeline) -> int:
    """Batches per call: the product of the stages' declared ``steps_per_call``, else 1."""
    steps = 1
    for stage in pipe.stages:
        if stage.kind.steps_per_call is not None:
            steps *= stage.kind.steps_per_call(stage.options)
    return steps
