"""The ``.optimize(tx)`` stage: a loss becomes a training step with an Optax transformation.

The step is the one written by hand in every Flax + Optax tutorial:
``value_and_grad`` of the loss, ``tx.update``, ``optax.apply_updates``, a
fresh dropout key split from the state's key. It works on a
:class:`jaxpipe.TrainLoss` (what ``.model`` gives, with dropout keys and
mutable collections) or on a plain loss ``(params, batch) -> loss`` or
``-> (loss, metrics)``.

Optional parts of a TrainLoss are used when present (``.model`` has them
all): ``step_keys(key, step, params, batch, model_state) -> (next key,
model keys)`` replaces the split (its own key scheme, and no key for a model
that draws no random numbers), a ``step`` parameter of ``train`` gets
``state.step``, and ``explain_keys()`` is that scheme's line in ``explain()``.
"""

from __future__ import annotations

import difflib
import inspect
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


# What `metrics=` may ask for, each computed only when asked (see `optimize`).
METRICS = ("grad_norm", "update_norm", "param_norm", "learning_rate")


def takes_key(loss: Callable[..., Any]) -> bool:
    """Whether a plain loss asks for a key: a third positional parameter or a keyword parameter named ``key``."""
    try:
        params = list(inspect.signature(loss).parameters.values())
    except (TypeError, ValueError):
        return False
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    third = len(positional) >= 3 and positional[2].name == "key"
    return third or any(p.name == "key" and p.kind is P.KEYWORD_ONLY for p in params)


def optimize(
    loss: Callable[..., Any],
    tx: Any,
    *,
    learning_rate: Any = None,
    per_example: bool = False,
    metrics: tuple[str, ...] = ("learning_rate",),
) -> Callable[..., Any]:
    """Makes the training step ``(state, batch) -> (state, metrics)`` with an Optax transformation.

    The step is the one every Flax + Optax tutorial writes: ``value_and_grad``
    of the loss, ``tx.update``, ``optax.apply_updates``, fresh keys from
    ``state.key``. The loss is what ``.model`` made (a module's loss, with its
    keys and BatchNorm statistics), or a plain loss on parameters:
    ``Pipeline(loss).optimize(optax.adam(1e-3))`` with
    ``trainer.init(key, batch, params=params)``.

    Args:
      tx: any ``optax.GradientTransformation`` (``optax.chain``,
        ``optax.MultiSteps`` for gradient accumulation, ...), e.g.
        ``.optimize(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))``.
      learning_rate: the schedule (a function of the step) or number given to
        ``tx``, reported as the ``learning_rate`` metric:
        ``.optimize(optax.adam(schedule), learning_rate=schedule)``. Without it
        the learning rate is reported where the chain exposes it
        (``optax.inject_hyperparams``).
      per_example: gives ``tx`` per-example gradients, each leaf with a
        leading batch axis, for transformations that clip or noise each example
        (``optax.contrib.dpsgd``): as Optax's DP-SGD example does, each example
        is run as a batch of one, ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``
        over ``batch`` with an axis inserted at 1. Each example gets its own
        key; the loss and metrics are the means over examples; ``grad_norm``
        is the norm of the mean gradient.
        ``.optimize(optax.contrib.dpsgd(0.1, 1.0, 1.1, seed=0), per_example=True)``.
      metrics: what the step reports besides ``loss`` and the loss's own
        metrics, each computed only when asked, so a step pays for none it
        does not report: ``"grad_norm"`` (the global norm of the gradient,
        before ``tx``), ``"update_norm"`` (of ``tx``'s updates),
        ``"param_norm"`` (of the new parameters) and ``"learning_rate"`` (where
        known, see above; the default). E.g.
        ``.optimize(tx, metrics=("grad_norm", "learning_rate"))``;
        ``metrics=()`` reports the loss alone.

    A plain loss may ask for a key, ``loss(params, batch, key)`` (the third
    positional parameter, or a keyword parameter, named ``key``), for dropout
    in a model it calls itself, e.g. an Equinox model:
    ``jax.vmap(model)(x, key=jax.random.split(key, len(x)))``. Each step gives
    it a fresh one, ``key, loss_key = jax.random.split(state.key)``, the
    default scheme of ``.model``; evaluation gives it ``state.key``.
    """
    import optax

    name = getattr(loss, "__name__", type(loss).__name__)
    # A model: dropout keys, mutable collections. Typed as any callable: `train` may take the optional `step`
    # keyword that TrainLoss documents but does not declare (asked below with `inspect.signature`).
    train: Callable[..., Any] | None = loss.train if isinstance(loss, TrainLoss) else None
    keys = getattr(loss, "step_keys", None)  # the model's own key scheme (`.model(..., rng=...)`), if any
    wants_step = train is not None and "step" in inspect.signature(train).parameters
    wants_key = train is None and takes_key(loss)

    def objective(params: Any, batch: Any, key: Any, model_state: Any, step: Any) -> Any:
        if train is not None:
            return (
                train(params, batch, key, model_state, step=step)
                if wants_step
                else train(params, batch, key, model_state)
            )
        value = loss(params, batch, key=key) if wants_key else loss(params, batch)
        value, metrics = loss_and_metrics(value, name, "optimize")
        return value, (metrics, model_state)

    def gradients(state: TrainState, batch: Any, key: Any) -> Any:
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if not per_example:
            return grad_fn(state.params, batch, key, state.model_state, state.step)
        _check_per_example(state, batch)
        examples = jax.tree.map(lambda x: x[:, None], batch)  # each example a batch of one
        count = jax.tree.leaves(batch)[0].shape[0]
        example_keys = None if key is None else jax.tree.map(lambda k: jax.random.split(k, count), key)
        per = jax.vmap(grad_fn, in_axes=(None, 0, None if key is None else 0, None, None))
        (values, (metrics, _)), grads = per(state.params, examples, example_keys, state.model_state, state.step)
        return (values.mean(), (jax.tree.map(jnp.mean, metrics), state.model_state)), grads

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_state(state)
        if train is None:
            key, dropout_key = jax.random.split(state.key) if wants_key else (state.key, None)
        elif keys is not None:
            key, dropout_key = keys(state.key, state.step, state.params, batch, state.model_state)
        else:
            key, dropout_key = jax.random.split(state.key)
        (value, (aux, model_state)), grads = gradients(state, batch, dropout_key)
        updates, opt_state = _update(tx, grads, state, per_example)
        params = optax.apply_updates(state.params, updates)
        out = {**aux, "loss": value}
        if "grad_norm" in metrics:
            out["grad_norm"] = optax.tree.norm(jax.tree.map(lambda g: g.mean(0), grads) if per_example else grads)
        if "update_norm" in metrics:
            out["update_norm"] = optax.tree.norm(updates)
        if "param_norm" in metrics:
            out["param_norm"] = optax.tree.norm(params)
        if "learning_rate" in metrics:
            if learning_rate is not None:
                out["learning_rate"] = learning_rate(state.step) if callable(learning_rate) else learning_rate
            else:
                injected = _injected_learning_rate(opt_state)
                if injected is not None:
                    out["learning_rate"] = injected
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, key=key, model_state=model_state
        )
        return new_state, out

    return train_step


def _check_per_example(state: TrainState, batch: Any) -> None:
    if state.model_state:
        raise PipelineError(
            f"`per_example=True` runs each example alone, so the model's collections "
            f"{sorted(state.model_state)} (BatchNorm statistics) would be computed from one example.\n"
            f"Use a normalisation without batch statistics (nnx.LayerNorm, nnx.GroupNorm), as DP-SGD requires.",
            stage_name="optimize",
        )
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise PipelineError(
            f"`per_example=True` splits every array of the batch along axis 0, but their leading sizes are "
            f"{sorted(sizes, key=str)}.\nGive batches whose arrays all have the examples on axis 0.",
            stage_name="optimize",
        )


_PER_EXAMPLE_ADVICE = (
    "`.optimize(tx, per_example=True)` gives per-example gradients (a leading batch axis on every leaf) "
    "for transformations that need them, such as optax.contrib.dpsgd; leave it off for a transformation "
    "of the mean gradient (optax.adam, optax.sgd, optax.clip_by_global_norm, ...)."
)


def _update(tx: Any, grads: Any, state: TrainState, per_example: bool) -> tuple[Any, Any]:
    """``tx.update``, with a ``PipelineError`` when ``tx`` and ``per_example`` disagree about the batch axis."""
    try:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    except ValueError as err:
        if per_example or "batch dimension" not in str(err):
            raise
        raise PipelineError(
            f"`tx` expects per-example gradients but got the mean gradient: {err}\n"
            f"Write .optimize(tx, per_example=True).\n{_PER_EXAMPLE_ADVICE}",
            stage_name="optimize",
        ) from err
    except Exception as err:
        if not per_example:
            raise
        raise PipelineError(
            f"`tx.update` failed on per-example gradients: {type(err).__name__}: {err}\n"
            f"Is `tx` a transformation of the mean gradient? Then drop per_example=True.\n{_PER_EXAMPLE_ADVICE}",
            stage_name="optimize",
        ) from err
    want = [jnp.shape(p) for p in jax.tree.leaves(state.params)]
    got = [jnp.shape(u) for u in jax.tree.leaves(updates)]
    if len(got) != len(want):
        raise PipelineError(
            f"`tx` returned {len(got)} update arrays for {len(want)} parameter arrays; updates must have the "
            f"parameters' structure.",
            stage_name="optimize",
        )
    if got != want:
        where = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
        shapes = f"updates of shape {got[where]} for a parameter of shape {want[where]}"
        if per_example:
            message = (
                f"`tx` treats the per-example gradients as one mean gradient and returns {shapes} "
                f"(the batch axis kept).\nDrop per_example=True for this transformation."
            )
        elif got[where] == want[where][1:]:
            message = (
                f"`tx` returns {shapes}: it reduced axis 0 as a batch axis, so it expects per-example "
                f"gradients.\nWrite .optimize(tx, per_example=True)."
            )
        else:
            message = f"`tx` returns {shapes}; updates must have the parameters' shapes."
        raise PipelineError(f"{message}\n{_PER_EXAMPLE_ADVICE}", stage_name="optimize")
    return updates, opt_state


def _check(ctx: StageContext, options: dict[str, Any]) -> None:
    del ctx  # any loss will do: a TrainLoss, or a plain loss on (params, batch)
    tx = options["tx"]
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"`.optimize()` needs an Optax transformation (with `init` and `update`), got "
            f"{type(tx).__name__} {tx!r}.\nFor example .optimize(optax.adam(1e-3))."
        )
    if not isinstance(options.get("per_example", False), bool):
        raise TypeError(f"`per_example` must be True or False, got {options['per_example']!r}.")
    lr = options.get("learning_rate")
    if lr is not None and not callable(lr) and not isinstance(lr, (int, float)):
        raise TypeError(
            f"`learning_rate` is what the step reports as its learning rate: a schedule (a function of the "
            f"step) or a number, got {lr!r}.\nPass the schedule you gave the optimizer."
        )
    asked = options.get("metrics", ("learning_rate",))
    if isinstance(asked, str) or not isinstance(asked, (tuple, list)):
        raise TypeError(
            f"`metrics` is a tuple of the metrics to report, some of {METRICS}, got {asked!r}.\n"
            f"For example .optimize(tx, metrics=('grad_norm', 'learning_rate'))."
        )
    unknown = [name for name in asked if name not in METRICS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), METRICS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`metrics` names {unknown[0]!r}, which `.optimize()` does not compute.{hint}\n"
            f"It computes {', '.join(METRICS)} (each only when asked); the loss and the loss's own metrics "
            f"are always reported."
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
    wants_key = takes_key(loss)

    def evaluate(state: TrainState, batch: Any) -> dict[str, jax.Array]:
        value = loss(state.params, batch, key=state.key) if wants_key else loss(state.params, batch)
        value, metrics = loss_and_metrics(value, name, "optimize")
        return {**metrics, "loss": value}

    return evaluate


def _explain(ctx: StageContext, inner: str, options: dict[str, Any]) -> tuple[str, str]:
    wrapped = ctx.wrapped()
    with_model = isinstance(wrapped, TrainLoss)  # a model stage before: train with its key and state
    explain_keys = getattr(wrapped, "explain_keys", None)  # the model's own key scheme, as it runs
    key_line = (
        explain_keys() if with_model and callable(explain_keys) else "key, dropout_key = jax.random.split(state.key)"
    )
    keyed = not with_model and takes_key(wrapped)  # a plain loss that asks for a key
    if with_model:
        grads = (
            f"    {key_line}\n"
            f"    (value, (metrics, model_state)), grads = jax.value_and_grad({inner}, has_aux=True)(\n"
            "        state.params, batch, dropout_key, state.model_state)\n"
        )
        replace = "params=params, opt_state=opt_state, key=key, model_state=model_state"
    elif keyed:
        grads = (
            "    key, loss_key = jax.random.split(state.key)\n"
            f"    value, grads = jax.value_and_grad({inner})(state.params, batch, key=loss_key)\n"
        )
        replace = "params=params, opt_state=opt_state, key=key"
    else:
        grads = f"    value, grads = jax.value_and_grad({inner})(state.params, batch)\n"
        replace = "params=params, opt_state=opt_state"
    if options.get("per_example"):
        if with_model:
            args = "state.params, examples, jax.random.split(dropout_key, n), state.model_state"
            axes = "(None, 0, 0, None)"
            aux = "(values, (metrics, model_state))"
        elif keyed:
            args, axes, aux = "state.params, examples, jax.random.split(loss_key, n)", "(None, 0, 0)", "values"
        else:
            args, axes, aux = "state.params, examples", "(None, 0)", "values"
        grads = (
            (
                f"    {key_line}\n"
                if with_model
                else "    key, loss_key = jax.random.split(state.key)\n"
                if keyed
                else ""
            )
            + "    examples = jax.tree.map(lambda x: x[:, None], batch)  # each example a batch of one\n"
            + ("    n = len(batch[next(iter(batch))])\n" if with_model or keyed else "")
            + f"    {aux}, grads = jax.vmap(jax.value_and_grad({inner}{', has_aux=True' if with_model else ''}), "
            f"in_axes={axes})(\n        {args})  # per-example gradients\n"
            + "    value = values.mean()\n"
            + ("    metrics, model_state = jax.tree.map(jnp.mean, metrics), state.model_state\n" if with_model else "")
        )
    asked = options.get("metrics", ("learning_rate",))
    norm = "jax.tree.map(lambda g: g.mean(0), grads)" if options.get("per_example") else "grads"
    extra = ""
    for name, value in (("grad_norm", norm), ("update_norm", "updates"), ("param_norm", "params")):
        if name in asked:
            extra += f'    metrics["{name}"] = optax.tree.norm({value})\n'
    lr = options.get("learning_rate")
    if "learning_rate" not in asked:
        pass
    elif lr is not None:
        value = f"{getattr(lr, '__name__', 'schedule')}(state.step)" if callable(lr) else repr(lr)
        extra += f'    metrics["learning_rate"] = {value}\n'
    elif _exposes_learning_rate(options["tx"]):
        extra += '    metrics["learning_rate"] = optax.tree_utils.tree_get(opt_state, "learning_rate")\n'
    code = (
        "tx = ...  # the Optax transformation given to .optimize()\n\n"
        "def train_step(state, batch):\n"
        f"{grads}"
        "    updates, opt_state = tx.update(grads, state.opt_state, state.params)\n"
        "    params = optax.apply_updates(state.params, updates)\n"
        f'    metrics = {{{"**metrics, " if with_model else ""}"loss": value}}\n'
        f"{extra}"
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
)
