"""``Pipeline.init``: a fold over the training stages' ``init``.

Training stages (``.model`` from the Flax plugin, ``.optimize`` from the Optax
plugin) each add their share of the state: the model its parameters and
mutable collections, the optimizer its state. Where a stage's run hooks say
where the state lives (``jaxpipe_state_shardings``, the ``.data_parallel``
stage), the fold runs compiled with those output shardings, so each device
makes only its shards. Stages with ``run_hooks`` (the Orbax ``.checkpoint``)
may then swap the fresh state for a restored one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core import caches
from jaxpipe._core.fold import fold
from jaxpipe._core.protocol import PipelineLike
from jaxpipe._core.stage import Stage, StageContext
from jaxpipe._core.state import TrainState, not_a_state, split_init_key
from jaxpipe._plugins.manager import first_result, run_hooks
from jaxpipe._training.checks import check_batch_dtypes
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


def _makes_params(stage: Stage, state: TrainState, key: jax.Array, batch: Any) -> bool:
    """Whether ``stage``'s share of ``init`` makes parameters when none are given (a model stage).

    Asked of the stage itself, abstractly (``jax.eval_shape``: nothing is
    computed), so no stage is named here: its init runs on a state without
    parameters, and parameters come back.
    """
    training = stage.kind.training
    assert training is not None and training.init is not None
    share = training.init

    def made() -> Any:
        return share(state.replace(params=None), key, batch, **stage.options).params

    try:
        return bool(jax.tree.leaves(jax.eval_shape(made)))
    except Exception:  # a share that needs parameters (an optimizer's) makes none
        return False


def _check_params(pipe: PipelineLike, state: TrainState, key: jax.Array, batch: Any) -> None:
    """``params=`` given to a pipeline whose stages make the parameters: which ones to train is ambiguous."""
    for number, stage in enumerate(pipe.stages, 1):
        training = stage.kind.training
        if training is None or training.init is None or not _makes_params(stage, state, key, batch):
            continue
        raise PipelineError(
            f"`init` got `params`, but `.{stage.name}()` initialises the parameters itself, so it is "
            f"ambiguous which to train.\nLet the stage make them: state = trainer.init(key, sample_batch); "
            f"or, to start from given parameters, replace them and the optimizer state made from them: "
            f"state = trainer.init(key, sample_batch); "
            f"state = state.replace(params=params, opt_state=tx.init(params)).",
            pipeline=repr(pipe),
        ).at(number, stage, pipe)


KEY_ROLES = ("params", "step", "data")

Keys = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]] | Mapping[str, jax.Array]


def _check_keys(keys: Any, pipe: PipelineLike) -> None:
    """``keys`` is None, a function of the key, or a dict of keys by role."""
    if keys is None or callable(keys):
        return
    if isinstance(keys, Mapping) and keys and set(keys) <= set(KEY_ROLES):
        return
    given = f"a dict with keys {sorted(map(str, keys))}" if isinstance(keys, Mapping) else f"{type(keys).__name__}"
    raise PipelineError(
        f"`keys` is a function key -> (params_key, step_key, data_key) or a dict of keys by role "
        f"({', '.join(map(repr, KEY_ROLES))}), got {given}.\nFor example, to initialise the parameters "
        f"with the key itself as `model.init(key, x)` does: trainer.init(key, batch, keys=lambda k: (k, k, k)).",
        pipeline=repr(pipe),
    )


def derive_keys(key: jax.Array, keys: Keys | None, pipe: PipelineLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(params_key, step_key, data_key)`` from ``key``: by ``keys``, else :func:`jaxpipe.split_init_key`."""
    if keys is None:
        return split_init_key(key)
    if isinstance(keys, Mapping):
        default = split_init_key(key)  # traced only for the roles left out; XLA drops the rest
        return tuple(keys.get(role, k) for role, k in zip(KEY_ROLES, default, strict=True))  # type: ignore[return-value]
    derived = keys(key)
    if not (isinstance(derived, (tuple, list)) and len(derived) == 3):
        raise PipelineError(
            f"`keys` must return three keys (params_key, step_key, data_key), got "
            f"{type(derived).__name__}{f' of length {len(derived)}' if isinstance(derived, (tuple, list)) else ''}."
            f"\nFor example keys=lambda k: tuple(jax.random.split(k, 3)).",
            pipeline=repr(pipe),
        )
    return derived[0], derived[1], derived[2]


def _stage_shares(
    pipe: PipelineLike, key: jax.Array, sample_batch: Any, params: Any, keys: Keys | None = None
) -> Callable[[], TrainState]:
    """The state as the stages' ``init`` make it: a function of nothing, to run eagerly or compiled."""
    params_key, run_key, data_key = derive_keys(key, keys, pipe)

    def add_share(state: TrainState, stage: Stage, ctx: StageContext) -> TrainState:
        del ctx  # a stage's share depends on its options and the state so far
        training = stage.kind.training
        if training is None or training.init is None:
            return state
        return training.init(state, params_key, sample_batch, **stage.options)

    def make_state() -> TrainState:
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=None,
            key=run_key,
            model_state={},
            data_key=data_key,
        )
        return fold(
            pipe,
            add_share,
            state,
            lambda stage, err: f"initialising `.{stage.name}()` failed: {type(err).__name__}: {err}",
        )

    return make_state


def init_program(
    pipe: PipelineLike, key: jax.Array, sample_batch: Any, params: Any = None, keys: Keys | None = None
) -> tuple[Callable[[], TrainState], Any]:
    """``(jax.jit(make_state, out_shardings=shardings), shardings)`` when a hook places the state, else
    ``(make_state, None)``.

    The shardings come from ``jaxpipe_state_shardings`` given ``jax.eval_shape(make_state)``, so each
    device computes only its shards of the new state. The key, batch and parameters enter as host
    constants: the program spans every process's devices, and each process holds the same values.
    """
    with run_hooks(pipe) as hook:
        if not hook.jaxpipe_state_shardings.get_hookimpls():
            return _compiled_or_eager(pipe, key, sample_batch, params, keys), None
        typed = key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
        impl, key_data = jax.random.key_impl(typed), np.asarray(jax.random.key_data(typed))
        host_batch, host_params = jax.device_get((sample_batch, params))

        def make_state() -> TrainState:
            host_key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl)
            return _stage_shares(pipe, host_key, host_batch, host_params, keys)()

        shapes = jax.eval_shape(make_state)
        shardings = hook.jaxpipe_state_shardings(pipeline=pipe, state=shapes)
    if shardings is None:
        return _compiled_or_eager(pipe, key, sample_batch, params, keys), None
    return jax.jit(make_state, out_shardings=shardings), shardings


@caches.bounded(32)  # one program per pipeline (and shapes): a later init, other key, compiles nothing
def _init_program(pipe: PipelineLike) -> Callable[..., TrainState]:
    return jax.jit(lambda key, sample_batch, params: _stage_shares(pipe, key, sample_batch, params)())


def _compiled_or_eager(
    pipe: PipelineLike, key: jax.Array, sample_batch: Any, params: Any, keys: Keys | None
) -> Callable[[], TrainState]:
    """The fold as one compiled program taking the key, batch and parameters (op by op, every small eager
    operation of the stages' shares compiled a program of its own: a dozen on a first ``init``); eagerly
    when a share cannot be traced (it reads the sample batch's values), which also raises its own errors."""

    if keys is not None:  # another program's key derivation: a function of the user's, run as it is
        return _stage_shares(pipe, key, sample_batch, params, keys)

    def make_state() -> TrainState:
        try:
            return _init_program(pipe)(key, sample_batch, params)
        except Exception:
            return _stage_shares(pipe, key, sample_batch, params)()

    return make_state


def init(
    pipe: PipelineLike,
    key: jax.Array,
    sample_batch: Any,
    *,
    params: Any = None,
    keys: Keys | None = None,
    resume: bool = True,
    which: str = "newest",
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
        key (:func:`jaxpipe.split_init_key`), or as ``keys`` says.
      sample_batch: one batch of the data (a few examples), which shapes the
        parameters.
      params: the parameters to start from, for a pipeline without a
        ``.model`` stage.
      keys: how ``key`` becomes the three keys, to reproduce another
        program's derivation: a function ``key -> (params_key, step_key,
        data_key)``, or a dict of explicit keys by role (``"params"``,
        ``"step"``, ``"data"``; roles left out come from the default). None:
        :func:`jaxpipe.split_init_key`, ``jax.random.split(key, 3)``. A script
        that initialises with ``model.init(jax.random.key(0), x)`` gets the
        same parameters with ``keys=lambda k: (k, k, k)`` (or
        ``keys={"params": k}``).
      resume: False restores nothing: the fresh state, to start a run over
        with ``fit(..., resume=False)``.
      which: which checkpoint to restore: ``"newest"``, or ``"best"`` (the
        step ``.checkpoint(..., best="eval_loss")`` kept for its best
        evaluation); passed to ``jaxpipe_init_state``.

    Returns:
      The state, placed on the device(s) as the stages ask (``.data_parallel``
      replicates it over its mesh).
    """
    _check_key(key, pipe)
    _check_sample_batch(sample_batch, pipe)
    check_batch_dtypes(sample_batch, argument="sample_batch")
    _check_keys(keys, pipe)
    if not any(s.kind.training and s.kind.training.init for s in pipe.stages) and params is None:
        raise PipelineError(
            "`init` builds a training state, but no stage of this pipeline contributes to one.\n"
            "Add training stages, e.g. Pipeline(loss).model(module, input='image').optimize(optax.adam(1e-3)), "
            "or, for a hand-written step (state, batch) -> (state, metrics), pass its parameters: "
            "trainer.init(key, batch, params=params).replace(opt_state=tx.init(params)).",
            pipeline=repr(pipe),
        )
    if params is not None:
        params_key, run_key, data_key = derive_keys(key, keys, pipe)
        fresh = TrainState(jnp.zeros((), jnp.int32), None, None, run_key, {}, data_key)
        _check_params(pipe, fresh, params_key, sample_batch)
    make_state, _ = init_program(pipe, key, sample_batch, params, keys)
    state = make_state()
    with run_hooks(pipe) as hook:
        restored = (
            first_result(hook.jaxpipe_init_state, not_a_state, pipeline=pipe, state=state, which=which)
            if resume
            else None
        )
        state = state if restored is None else restored
        placed = first_result(hook.jaxpipe_place_state, not_a_state, pipeline=pipe, state=state)
    return state if placed is None else placed
