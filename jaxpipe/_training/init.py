"""``Pipeline.init``: a fold over the training stages' ``init``.

Training stages (``.model`` from the Flax plugin, ``.optimize`` from the Optax
plugin) each add their share of the state: the model its parameters and
mutable collections, the optimizer its state. Stages with ``run_hooks`` (the
Orbax ``.checkpoint``) may then swap the fresh state for a restored one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe._core.fold import fold
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.stage import Stage, StageContext
from jaxpipe._core.state import TrainState, split_init_key
from jaxpipe._plugins.manager import run_hooks
from jaxpipe.errors import PipelineError


def _check_key(key: Any, pipe: PipelineLike) -> None:
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


def _check_sample_batch(batch: Any, pipe: PipelineLike) -> None:
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


def init(
    pipe: PipelineLike, key: jax.Array, sample_batch: Any, *, params: Any = None, resume: bool = True
) -> TrainState:
    """The initial :class:`~jaxpipe.TrainState`, or the newest checkpoint's.

    Each training stage adds its share (the model its parameters and mutable
    collections, the optimizer its state), in call order; a ``.checkpoint()``
    stage may then swap the fresh state for the newest one it saved.

    Args:
      pipe: the training pipeline (``.model(...).optimize(...)``, or a
        hand-written step with ``params``).
      key: one PRNG key (``jax.random.key(0)``; a legacy ``PRNGKey`` works
        too), split into a parameter key, the state's step key and its data
        key (:func:`jaxpipe.split_init_key`).
      sample_batch: one batch of the data (a few examples), which shapes the
        parameters.
      params: the parameters to start from, for a pipeline without a
        ``.model`` stage.
      resume: False restores nothing: the fresh state, to start a run over
        with ``fit(..., resume=False)``.

    Returns:
      The state, placed on the device(s) as the stages ask (``.data_parallel``
      replicates it over its mesh).
    """
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
