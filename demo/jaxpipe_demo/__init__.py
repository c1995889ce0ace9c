"""``jaxpipe demo``: the main job, end to end, against hand-written JAX.

Per-example gradients, then an MLP trained on scikit-learn's bundled 8x8
digits: the equivalent JAX code, progress, test accuracy, Orbax checkpoints
(a second run resumes from them), a loss curve, and a timing table.

A package of its own, not library code: it needs scikit-learn (the data) and
matplotlib (the curve), which ``pip install -e '.[demo]'`` adds; the library
itself does not depend on them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import History, Pipeline, enable_compilation_cache
from jaxpipe_demo.timing import format_seconds, paired_rounds  # shared with benchmarks/

NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # import name -> distribution
INSTALL = "pip install -e '.[demo]'"


def missing() -> list[str]:
    """The demo's own dependencies that are not installed (the ``demo`` extra)."""
    return [dist for module, dist in NEEDS.items() if not _importable(module)]


def _importable(module: str) -> bool:
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _linear_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return (x @ w - y) ** 2


def per_example_gradients(quick: bool = False) -> None:
    """Per-example gradients: the pipeline, its JAX, its numbers and its speed."""
    print("== per-example gradients ==")
    pipe = Pipeline(_linear_loss, name="loss").grad().vmap(in_axes=(None, 0, 0)).jit()
    print(pipe)
    print("equivalent JAX:", pipe.explain())
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=16), jnp.float32)
    x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=256), jnp.float32)
    hand = jax.jit(jax.vmap(jax.grad(_linear_loss), in_axes=(None, 0, 0)))
    ours, theirs = pipe(w, x, y), hand(w, x, y)
    same_program = pipe.hlo(w, x, y) == hand.lower(w, x, y).as_text()
    print(
        f"output {ours.shape}, equal to hand-written: {bool(jnp.array_equal(ours, theirs))}, "
        f"same lowered program: {same_program}"
    )
    number, repeat = (200, 3) if quick else (2000, 7)
    timing = pipe.timing(w, x, y, number=number, repeat=repeat)
    print(timing)
    rounds = paired_rounds({"pipe": pipe, "hand": hand}, (w, x, y), number=number, repeat=repeat)
    a, b = statistics.median(rounds["pipe"]), statistics.median(rounds["hand"])
    print(
        f"steady state, median of {repeat} paired rounds: pipeline {format_seconds(a)}, "
        f"hand-written {format_seconds(b)}: the pipeline is {compare(a, b)} the hand-written function"
    )


def compare(time: float, baseline: float) -> str:
    """``time`` against ``baseline`` in words: "1.08x slower than", "2.50x faster than", "as fast as"."""
    ratio = time / baseline
    if abs(ratio - 1) < 0.005:
        return "as fast as"
    return f"{ratio:.2f}x slower than" if ratio > 1 else f"{1 / ratio:.2f}x faster than"


# --- training: an MLP on scikit-learn's bundled 8x8 digits -------------------------

EPOCHS, BATCH_SIZE, SCAN_STEPS, SAVE_EVERY = 20, 128, 10, 100


def _mlp() -> Any:
    import flax.linen as nn

    class MLP(nn.Module):
        """Two hidden layers of 256 with dropout: the model of benchmarks/train.py."""

        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            for _ in range(2):
                x = nn.relu(nn.Dense(256)(x))
                x = nn.Dropout(0.1, deterministic=not train)(x)
            return nn.Dense(10)(x)

    return MLP()


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def digits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's 8x8 digits (bundled, no download): 80% train, 20% test, pixels in [0, 1].

    Read straight from the package's data file, as ``sklearn.datasets.load_digits``
    does, because importing scikit-learn itself takes seconds.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        with gzip.open(path) as file:
            table = np.loadtxt(file, delimiter=",")
        images, labels = table[:, :-1], table[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = (images[order] / 16.0).astype(np.float32), labels[order].astype(np.int32)
    cut = int(0.8 * len(labels))
    return {"image": images[:cut], "label": labels[:cut]}, {"image": images[cut:], "label": labels[cut:]}


def hand_written_step(model: Any, tx: Any, schedule: Any) -> Any:
    """The step a Flax + Optax tutorial writes, computing the metrics jaxpipe reports."""
    import optax

    def train_step(state: Any, batch: Any) -> Any:
        key, dropout_key = jax.random.split(state.key)

        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key})
            return loss(logits, batch)

        value, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), metrics

    return jax.jit(train_step)


def _save_history(out: Path, history: History, start: int) -> list[dict[str, Any]]:
    """Adds this run's rows to ``metrics.jsonl``, after the earlier runs' rows up to ``start``, where it resumed.

    Steps are counts of steps done and epochs count from 1 (the step's epoch; for an
    eval row, the epoch just finished), both ints, as everywhere a person reads them.
    """
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [row for row in rows if row["step"] <= start]
    rows += history.steps
    for row in history.epochs:
        metrics = {k: v for k, v in row.items() if k.startswith("eval_")}
        rows.append({"eval": True, "step": row["step"], "epoch": row["epoch"], **metrics})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [row for row in rows if not row.get("eval")]
    evals = [row for row in rows if row.get("eval")]
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="test loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy")
    axes.set_yscale("log")
    axes.legend(loc="upper right")
    axes.set_title("jaxpipe demo: MLP on 8x8 digits")
    fig.savefig(path, dpi=100)


def training(out: Path, quick: bool = False) -> float | None:
    """Trains, evaluates, checkpoints and times the digits MLP; returns the test accuracy.

    Returns None when Ctrl-C stopped training: the state at that step is saved,
    and the next run resumes from it.
    """
    import optax

    from jaxpipe import evaluate, param_summary

    print("\n== training: an MLP on scikit-learn's 8x8 digits ==")
    train, test = digits()
    steps = EPOCHS * (len(train["label"]) // BATCH_SIZE)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    model = _mlp()
    step = (
        Pipeline(loss)
        .model(model, input="image")
        .optimize(  # the training step
            tx, learning_rate=schedule, metrics=("grad_norm", "learning_rate")
        )
    )
    trainer = step.jit().checkpoint(out / "checkpoints", every=SAVE_EVERY, keep=3)
    print(trainer)
    print("\nequivalent JAX:\n" + trainer.explain() + "\n")
    sample = {k: v[:BATCH_SIZE] for k, v in train.items()}
    state = trainer.init(jax.random.key(0), sample)
    start = int(state.step)
    per_epoch = steps // EPOCHS
    if start >= steps:
        print(f"resumed at step {start} of {steps}: training is already complete (delete {out} to start over)")
    elif start:
        epoch = start // per_epoch + 1
        print(f"resumed at step {start} of {steps}: training goes on from there (epoch {epoch} of {EPOCHS})")
    history = History()
    try:
        state = trainer.fit(state, train, epochs=EPOCHS, batch_size=BATCH_SIZE, eval_data=test, hooks=[history])
    except KeyboardInterrupt as stopped:  # Ctrl-C: fit ended after a step, and the checkpoint stage saved it
        _save_history(out, history, start)
        step = int(stopped.state.step) if hasattr(stopped, "state") else "?"
        print(f"\ninterrupted at step {step}; run again to resume")
        return None
    accuracy = evaluate(trainer, state, test)["accuracy"]
    print(f"test accuracy: {accuracy:.1%} on {len(test['label'])} held-out digits (goal: at least 95%)")
    print("trained parameters:\n" + str(param_summary(state.params)))
    rows = _save_history(out, history, start)
    _plot(rows, out / "loss.png")
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    print(
        f"wrote {out / 'loss.png'}, {out / 'metrics.jsonl'} and checkpoints {', '.join(saved)} in {out / 'checkpoints'}"
    )
    _timing_table(step, model, tx, schedule, state, train, quick)
    return accuracy


def _timing_table(step: Any, model: Any, tx: Any, schedule: Any, state: Any, train: Any, quick: bool) -> None:
    """jaxpipe's step against the hand-written one, and .scan(k) against one call per step."""
    scanned = step.scan(SCAN_STEPS).jit()
    # The trainer's step without its .checkpoint() stage (which saves only in fit): equal pipelines share one
    # compiled step, so this compiles nothing new.
    step = step.jit()
    batch = {k: v[:BATCH_SIZE] for k, v in train.items()}
    stacked = {k: v[: SCAN_STEPS * BATCH_SIZE].reshape(SCAN_STEPS, BATCH_SIZE, *v.shape[1:]) for k, v in train.items()}
    hand = hand_written_step(model, tx, schedule)
    number, repeat = (30, 3) if quick else (100, 7)
    steps = paired_rounds(
        {"jaxpipe": lambda: step(state, batch), "hand": lambda: hand(state, batch)}, (), number=number, repeat=repeat
    )
    scan = paired_rounds(
        {"scan": lambda: scanned(state, stacked), "loop": lambda: [step(state, batch) for _ in range(SCAN_STEPS)]},
        (),
        number=max(1, number // SCAN_STEPS),
        repeat=repeat,
    )
    median = {name: statistics.median(rounds) for name, rounds in steps.items()}
    per_step = {name: statistics.median(rounds) / SCAN_STEPS for name, rounds in scan.items()}
    device = jax.devices()[0]
    where = device.platform if device.device_kind == device.platform else f"{device.platform} ({device.device_kind})"
    print(f"\ntiming: one training step, batch {BATCH_SIZE}, on {where}")
    print(f"  time per step: the median of {repeat} paired rounds; each ratio compares the times shown")
    rows = [
        (
            "jaxpipe step  trainer(state, batch)",
            format_seconds(median["jaxpipe"]),
            f"{compare(median['jaxpipe'], median['hand'])} the hand-written step",
        ),
        ("hand-written  jax.jit(train_step)", format_seconds(median["hand"]), ""),
        (
            f"jaxpipe .scan({SCAN_STEPS}), per step",
            format_seconds(per_step["scan"]),
            f"{compare(per_step['scan'], per_step['loop'])} one call per step",
        ),
        ("jaxpipe one call per step", format_seconds(per_step["loop"]), ""),
    ]
    for name, seconds, note in rows:
        print(f"  {name:<38} {seconds:>10}  {note}".rstrip())


def main(quick: bool = False, out: str | os.PathLike[str] = "jaxpipe-demo") -> int:
    """Runs the demo; the exit status is 0 when the model reached 95%, 130 after Ctrl-C."""
    try:
        per_example_gradients(quick)
        directory = Path(out).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        cache = enable_compilation_cache(directory / "compile-cache")  # a second run loads, not compiles
        print(f"\ncompiled programs are kept in {cache}, so a second run skips compiling")
        accuracy = training(directory, quick)
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C inside it
        print("\ninterrupted; run again to resume from the last checkpoint")
        return 130
    if accuracy is None:
        return 130
    return 0 if accuracy >= 0.95 else 1
