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
from jaxpipe._core.state import TrainState, not_a_state, split_init_key
from jaxpipe._plugins.manager import first_result, run_hooks
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


def init(pipe: PipelineLike, key: jax.Array, sample_batch: Any, params: Any = None, resume: bool = True) -> TrainState:
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
        restored = first_result(hook.jaxpipe_init_state, not_a_state, pipeline=pipe, state=state) if resume else None
        state = state if restored is None else restored
        placed = first_result(hook.jaxpipe_place_state, not_a_state, pipeline=pipe, state=state)
    return state if placed is None else placed
