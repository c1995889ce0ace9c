"""The ``.ema(decay)`` stage: an exponential moving average of the parameters, kept in ``state.extra``.

In the Optax plugin because the update is Optax's own
``optax.incremental_update`` (the core does not import Optax). Each step, after
``.optimize``'s update, inside the same compiled step::

    ema_params = optax.incremental_update(new_state.params, state.extra["ema_params"], step_size=1 - decay)

``init`` starts it at a copy of the initial parameters. Evaluate on it with
``jaxpipe.evaluate(trainer, state, data, params=state.extra["ema_params"])``
or ``fit(..., eval_params=lambda state: state.extra["ema_params"])``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe import PipelineError, StageContext, TrainState, after_step_kind

FIELD = "ema_params"


def ema(state: TrainState, new_state: TrainState, decay: float = 0.999) -> TrainState:
    """Keeps an EMA of the parameters in ``state.extra["ema_params"]``, updated inside each step.

    ``optax.incremental_update(new_params, ema, step_size=1 - decay)`` after
    every step (with ``optax.MultiSteps``, every mini-step); place it after
    ``.optimize()`` and before ``.jit()``.
    """
    import optax

    if FIELD not in state.extra:
        raise PipelineError(
            f'this state has no extra["{FIELD}"]: it was not made by a pipeline with `.ema()`.\n'
            f"Call `init` on the pipeline you train (its `.ema()` stage starts the average).",
            stage_name="ema",
        )
    average = optax.incremental_update(new_state.params, state.extra[FIELD], step_size=1 - decay)
    return new_state.replace(extra={**new_state.extra, FIELD: average})


def _init(state: TrainState, key: jax.Array, batch: Any, decay: float = 0.999) -> TrainState:
    del key, batch, decay  # the average starts at the initial parameters
    if state.params is None:
        raise PipelineError(
            "`.ema()` averages the parameters, and no stage before it made any.\n"
            "Place it after .model(...).optimize(tx), or pass them: trainer.init(key, batch, params=params).",
            stage_name="ema",
        )
    copy = jax.tree.map(jnp.copy, state.params)  # own buffers: fit donates the state, and a buffer only once
    return state.replace(extra={**state.extra, FIELD: copy})


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # placement is checked by after_step_kind
    decay = options.get("decay", 0.999)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(
            f"`decay` is the EMA's weight on its old value, a number in [0, 1), got {decay!r}.\n"
            f"For example .ema(0.999)."
        )


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    del ctx  # the same code wherever it is placed
    decay = options.get("decay", 0.999)
    code = (
        "def step_with_ema(state, batch):\n"
        f"    new_state, metrics = {inner}(state, batch)\n"
        f'    ema_params = optax.incremental_update(new_state.params, state.extra["{FIELD}"], '
        f"step_size=1 - {decay!r})\n"
        f'    return new_state.replace(extra={{**new_state.extra, "{FIELD}": ema_params}}), metrics'
    )
    return code, "step_with_ema"


EMA = after_step_kind("ema", ema, init=_init, check=_check, explain=_explain, jax_name="optax.incremental_update")
