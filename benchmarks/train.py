"""Training pipelines against the hand-written Flax + Optax loop, in one process.

Run: .venv/bin/python benchmarks/train.py [--quick]   (CPU or GPU; prints the device)

The model is a 2x256 MLP with dropout on 64 features, batch 128, trained with
``optax.chain(clip_by_global_norm(1.0), adamw(warmup_cosine_decay_schedule))``;
every step reports loss, gradient norm and learning rate on both sides.

1. Step: ``trainer(state, batch)`` (a ``.model().optimize().jit()`` pipeline)
   against ``jax.jit(train_step)`` written by hand; ``number`` chained steps per
   round, synchronised at the end, rounds interleaved (goal: ratio <= 1.02).
2. ``.scan(k, unroll=2)`` (and ``unroll=1``): one call running k steps with
   ``lax.scan`` over k stacked batches, against the hand-written loop of k jitted calls, dispatched
   asynchronously (goal on CPU: at least 1.3x faster per step) or reading the
   loss after each step as a progress bar does; and ``fit`` with ``.scan(11)``
   (one epoch per call) against ``fit`` one call per step.
3. ``fit`` with ``.checkpoint(every=100)`` (Orbax, asynchronous saves) against
   ``fit`` without it, each round from the same state into an emptied
   directory (goal: under 5% slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from _timing import format_seconds, paired_ratio, paired_rounds
from jaxpipe_demo import hand_written_step

from jaxpipe import Pipeline

BATCH, FEATURES, CLASSES = 128, 64, 10


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(2):
            x = nn.relu(nn.Dense(256)(x))
            x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(CLASSES)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, 10_000)


def chain():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(SCHEDULE))


def data(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.normal(size=(size, FEATURES)).astype(np.float32),
        "label": rng.integers(0, CLASSES, size).astype(np.int32),
    }


def chained(step: Callable, state, batches: list) -> Callable[[], object]:
    def run():
        s = state
        for batch in batches:
            s, metrics = step(s, batch)
        return s, metrics

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    args = parser.parse_args()
    repeat, number, scan_steps, fit_epochs = (5, 50, 50, 10) if args.quick else (15, 200, 50, 40)

    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); jax {jax.__version__}; "
        f"{os.cpu_count()} CPUs; {platform.python_implementation()} {platform.python_version()}"
    )
    model, tx = MLP(), chain()
    train = data(BATCH * scan_steps)
    trainer = Pipeline(loss).model(model, input="image").optimize(tx, learning_rate=SCHEDULE).jit()
    state = trainer.init(jax.random.key(0), {k: v[:BATCH] for k, v in train.items()})
    hand = hand_written_step(model, tx, SCHEDULE)  # the tutorial step, as the demo times it
    batch = jax.device_put({k: v[:BATCH] for k, v in train.items()})
    same = trainer.hlo(state, batch) == hand.lower(state, batch).as_text()

    # 1. one step
    steps = [batch] * number
    rounds = paired_rounds(
        {"jaxpipe": chained(trainer, state, steps), "hand": chained(hand, state, steps)}, (), number=1, repeat=repeat
    )
    r1 = paired_ratio(rounds["jaxpipe"], rounds["hand"])
    print(f"\n1. training step, {number} chained steps per round, {repeat} rounds (same lowered program: {same})")
    print(f"   jaxpipe trainer(state, batch)  {format_seconds(min(rounds['jaxpipe']) / number):>9}/step")
    print(f"   hand-written jax.jit step      {format_seconds(min(rounds['hand']) / number):>9}/step")
    print(f"   ratio jaxpipe / hand-written   {r1:.3f}   (goal <= 1.02: {'met' if r1 <= 1.02 else 'NOT met'})")

    # 2. .scan(k) against the hand-written per-step loop
    scanned = (
        Pipeline(loss).model(model, input="image").optimize(tx, learning_rate=SCHEDULE).scan(scan_steps, unroll=2).jit()
    )
    scanned_rolled = (
        Pipeline(loss).model(model, input="image").optimize(tx, learning_rate=SCHEDULE).scan(scan_steps).jit()
    )
    stacked = jax.device_put({k: v.reshape(scan_steps, BATCH, *v.shape[1:]) for k, v in train.items()})
    singles = [jax.device_put({k: v[i * BATCH : (i + 1) * BATCH] for k, v in train.items()}) for i in range(scan_steps)]
    calls = max(1, number // scan_steps)

    def scan_rounds(pipe: Pipeline = scanned) -> Callable[[], object]:
        def run():
            s = state
            for _ in range(calls):
                s, metrics = pipe(s, stacked)
            return s, metrics

        return run

    def reading_loss(step: Callable, batches: list) -> Callable[[], object]:
        """The loop with a progress bar: the loss read back (a sync) after every step."""

        def run():
            s = state
            for batch in batches:
                s, metrics = step(s, batch)
                float(metrics["loss"])
            return s

        return run

    examples = data(BATCH * 11)
    per_epoch = Pipeline(loss).model(model, input="image").optimize(tx, learning_rate=SCHEDULE).scan(11).jit()

    def fit_for(pipe: Pipeline, epochs: int) -> Callable[[], object]:
        return lambda: pipe.fit(state, examples, epochs=epochs, batch_size=BATCH, progress=False)

    candidates = {
        "scan": scan_rounds(scanned),
        "scan unroll=1": scan_rounds(scanned_rolled),
        "async loop": chained(hand, state, singles * calls),
        "synced loop": reading_loss(hand, singles * calls),
        "fit scan": fit_for(per_epoch, calls * scan_steps // 11),
        "fit": fit_for(trainer, calls * scan_steps // 11),
    }
    rounds = paired_rounds(candidates, (), number=1, repeat=repeat)
    total = calls * scan_steps
    fit_total = (total // 11) * 11
    r2 = paired_ratio(rounds["async loop"], rounds["scan"])
    print(f"\n2. .scan({scan_steps}) against hand-written per-step loops, {total} steps per round")
    print(f"   jaxpipe .scan({scan_steps}, unroll=2).jit() {format_seconds(min(rounds['scan']) / total):>9}/step")
    rolled = paired_ratio(rounds["async loop"], rounds["scan unroll=1"])
    print(
        f"   jaxpipe .scan({scan_steps}).jit()        {format_seconds(min(rounds['scan unroll=1']) / total):>9}/step"
        f"   {rolled:.2f}x faster than the async loop"
    )
    for name, what in (("async loop", "loop, async dispatch"), ("synced loop", "loop reading the loss")):
        speed = paired_ratio(rounds[name], rounds["scan"])
        print(
            f"   hand-written {what:<21} {format_seconds(min(rounds[name]) / total):>9}/step   scan {speed:.2f}x faster"
        )
    r_fit = paired_ratio(rounds["fit"], rounds["fit scan"])
    print(f"   fit, .scan(11) (one epoch/call) {format_seconds(min(rounds['fit scan']) / fit_total):>9}/step")
    fit_step = format_seconds(min(rounds["fit"]) / fit_total)
    print(f"   fit, one call per step         {fit_step:>9}/step   scan {r_fit:.2f}x faster")
    print(f"   goal on CPU: scan >= 1.3x faster than the async loop: {'met' if r2 >= 1.3 else 'NOT met'} ({r2:.2f}x)")

    # 3. fit with asynchronous checkpoints every 100 steps against none
    examples = data(BATCH * 11)
    fit_steps = fit_epochs * 11
    with tempfile.TemporaryDirectory() as root:
        directory = os.path.join(root, "checkpoints")
        checkpointed = trainer.checkpoint(directory, every=100, keep=3)

        def fit(pipe: Pipeline) -> Callable[[], object]:
            def run():
                if pipe is checkpointed:
                    shutil.rmtree(directory, ignore_errors=True)  # each round starts a new run, not a resumed one
                return pipe.fit(state, examples, epochs=fit_epochs, batch_size=BATCH, progress=False)

            return run

        rounds = paired_rounds(
            {"checkpoint": fit(checkpointed), "none": fit(trainer)}, (), number=1, repeat=max(3, repeat // 2)
        )
        saved = sorted(int(p) for p in os.listdir(directory) if p.isdigit())
    r3 = paired_ratio(rounds["checkpoint"], rounds["none"])
    print(f"\n3. fit, {fit_steps} steps, with .checkpoint(every=100, keep=3) against none (steps kept: {saved})")
    print(f"   with async checkpoints         {format_seconds(min(rounds['checkpoint'])):>9}")
    print(f"   without                        {format_seconds(min(rounds['none'])):>9}")
    print(f"   slow-down                      {100 * (r3 - 1):+.1f}%  (goal < 5%: {'met' if r3 < 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
