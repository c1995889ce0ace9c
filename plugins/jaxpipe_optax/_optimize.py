"""The ``.optimize(tx)`` stage: a loss becomes a training step with an Optax transformation.

The step is the one written by hand in every Flax + Optax tutorial:
``value_and_grad`` of the loss, ``tx.update``, ``optax.apply_updates``, a
fresh dropout key split from the state's key. It works on a
:class:`jaxpipe.TrainLoss` (what ``.model`` gives, with dropout keys and
mutable collections) or on a plain loss ``(params, batch) -> loss`` or
``-> (loss, metrics)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe import PipelineError, StageContext, StageKind, Training, TrainLoss, TrainState, loss_and_metrics


def _has_lr(value: Any) -> bool:
    return hasattr(value, "shape")  # an injected value, not the schedule's own state


def _injected_learning_rate(opt_state: Any) -> Any:
    """The learning rate ``optax.inject_hyperparams`` stores in the state, if exactly one."""
    import optax

    try:
        return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda path, v: _has_lr(v))
    except KeyError:  # several optimizers in the chain: no single learning rate to report
        return None


def _check_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise PipelineError(
            f"the training step takes the TrainState from `init` as its first argument, got "
            f"{type(state).__name__}.\nWrite state = trainer.init(jax.random.key(0), sample_batch); "
            f"state, metrics = trainer(state, batch).",
            stage_name="optimize",
        )
    if state.opt_state is None or state.params is None:
        raise PipelineError(
            "this TrainState has no parameters or optimizer state: it was not made by a pipeline with "
            "`.optimize()`.\nCall `init` on the pipeline you train.",
            stage_name="optimize",
        )


def optimize(loss: Callable[..., Any], tx: Any, *, learning_rate: Any = None) -> Callable[..., Any]:
    """Makes the training step ``(state, batch) -> (state, metrics)`` with an Optax transformation.

    ``tx`` is any ``optax.GradientTransformation`` (``optax.chain``,
    ``optax.MultiSteps`` for gradient accumulation, ...). Metrics: ``loss``,
    ``grad_norm`` (before clipping), ``learning_rate`` where the chain exposes
    it (``optax.inject_hyperparams``) or as ``learning_rate(state.step)`` for a
    schedule given here, and the loss's own metrics.
    """
    import optax

    name = getattr(loss, "__name__", type(loss).__name__)
    train = loss.train if isinstance(loss, TrainLoss) else None  # a model: dropout keys, mutable collections

    def objective(params: Any, batch: Any, key: Any, model_state: Any) -> Any:
        if train is not None:
            return train(params, batch, key, model_state)
        value, metrics = loss_and_metrics(loss(params, batch), name, "optimize")
        return value, (metrics, model_state)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_state(state)
        key, dropout_key = jax.random.split(state.key) if train is not None else (state.key, None)
        (value, (metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, batch, dropout_key, state.model_state
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": value, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step) if callable(learning_rate) else learning_rate
        else:
            injected = _injected_learning_rate(opt_state)
            if injected is not None:
                metrics["learning_rate"] = injected
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, key=key, model_state=model_state
        )
        return new_state, metrics

    return train_step


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # any loss will do: a TrainLoss, or a plain loss on (params, batch)
    tx = options["tx"]
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"`.optimize()` needs an Optax transformation (with `init` and `update`), got "
            f"{type(tx).__name__} {tx!r}.\nFor example .optimize(optax.adam(1e-3))."
        )
    lr = options.get("learning_rate")
    if lr is not None and not callable(lr) and not isinstance(lr, (int, float)):
        raise TypeError(
            f"`learning_rate` is what the step reports as its learning rate: a schedule (a function of the "
            f"step) or a number, got {lr!r}.\nPass the schedule you gave the optimizer."
        )


def _init(state: TrainState, key: jax.Array, batch: Any, tx: Any, **options: Any) -> TrainState:
    del key, batch, options  # the optimizer state depends only on the parameters
    if state.params is None:
        raise PipelineError(
            "`.optimize()` needs parameters to optimize, and no stage before it made any.\n"
            "Add `.model(module, input=...)` before it, or pass them: trainer.init(key, batch, params=params).",
            stage_name="optimize",
        )
    return state.replace(opt_state=tx.init(state.params))


def _evaluate(loss: Callable[..., Any], tx: Any, **options: Any) -> Callable[..., Any] | None:
    del tx, options  # evaluation does not step the optimizer
    if isinstance(loss, TrainLoss):
        return None  # the model stage evaluates, with accuracy
    name = getattr(loss, "__name__", type(loss).__name__)

    def evaluate(state: TrainState, batch: Any) -> dict[str, jax.Array]:
        value, metrics = loss_and_metrics(loss(state.params, batch), name, "optimize")
        return {**metrics, "loss": value}

    return evaluate


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    with_model = isinstance(ctx.wrapped(), TrainLoss)  # a model stage before: train with its key and state
    if with_model:
        grads = (
            "    key, dropout_key = jax.random.split(state.key)\n"
            f"    (value, (metrics, model_state)), grads = jax.value_and_grad({inner}, has_aux=True)(\n"
            "        state.params, batch, dropout_key, state.model_state)\n"
        )
        replace = "params=params, opt_state=opt_state, key=key, model_state=model_state"
    else:
        grads = f"    value, grads = jax.value_and_grad({inner})(state.params, batch)\n"
        replace = "params=params, opt_state=opt_state"
    lr = options.get("learning_rate")
    if lr is not None:
        value = f"{getattr(lr, '__name__', 'schedule')}(state.step)" if callable(lr) else repr(lr)
        lr_line = f'    metrics["learning_rate"] = {value}\n'
    elif _exposes_learning_rate(options["tx"]):
        lr_line = '    metrics["learning_rate"] = optax.tree_utils.tree_get(opt_state, "learning_rate")\n'
    else:
        lr_line = ""
    code = (
        "tx = ...  # the Optax transformation given to .optimize()\n\n"
        "def train_step(state, batch):\n"
        f"{grads}"
        "    updates, opt_state = tx.update(grads, state.opt_state, state.params)\n"
        "    params = optax.apply_updates(state.params, updates)\n"
        f'    metrics = {{{"**metrics, " if with_model else ""}"loss": value, "grad_norm": optax.tree.norm(grads)}}\n'
        f"{lr_line}"
        f"    return state.replace(step=state.step + 1, {replace}), metrics"
    )
    return code, "train_step"


def _exposes_learning_rate(tx: Any) -> bool:
    try:
        return _injected_learning_rate(jax.eval_shape(tx.init, {"w": jnp.zeros(1)})) is not None
    except Exception:  # explain() is best effort about what the chain holds
        return False


OPTIMIZE = StageKind(
    "optimize",
    optimize,
    "optax",
    check=_check,
    explain=_explain,
    training=Training(init=_init, evaluate=_evaluate),
    doc="Training step with an Optax transformation: value_and_grad, tx.update, optax.apply_updates.",
)
