"""``fit`` against the plain jitted loop and a whole-epoch ``lax.scan`` on three models, in interleaved rounds.

Run: .venv/bin/python benchmarks/fit_models.py [--quick] [--models mlp,mlp1024,cnn]

Models (scikit-learn's 8x8 digits tiled to ``--examples``, batch 128, ``optax.adam(1e-3)``):
  mlp      2x256 MLP (dispatch-bound on a CPU)
  mlp1024  4x1024 MLP (compute-bound)
  cnn      2 conv (3x3, 32 and 64 channels) + dense (XLA:CPU runs convolutions slowly inside a loop body)
Contenders per model, one epoch per timed call, each from the same initial state:
  fit            ``trainer.fit(...)`` with its defaults (steps per call chosen by measuring)
  plain loop     a jitted step per batch, gathering its batch from data on the device (``fit``'s order)
  epoch scan     one ``lax.scan`` over the epoch of the same step, data on the device
Also per model: the XLA compiles of a first ``fit`` of a fresh trainer (``init`` included) and of a second ``fit``
with another ``epochs``/``log_every``, and what ``fit`` chose (``run.per_call``). Ratios are medians of per-round
ratios; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import platform

import _timing as rounds
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxpipe_demo import digits

import jaxpipe
from jaxpipe import Pipeline

BATCH = 128


class MLP(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


MODELS = {"mlp": lambda: MLP(256, 2), "mlp1024": lambda: MLP(1024, 4), "cnn": CNN}


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def load(examples: int) -> dict[str, np.ndarray]:
    train, _ = digits()
    reps = -(-examples // len(train["label"]))
    return {k: np.concatenate([v] * reps)[:examples] for k, v in train.items()}


class Chosen:
    accepts_calls = True
    per_call = ""

    @jaxpipe.hookimpl
    def jaxpipe_fit_end(self, run, state):
        Chosen.per_call = run.per_call


def compiles(fn) -> int:
    with jaxpipe.CompileEvents() as events:
        jax.block_until_ready(fn())
    return events.compiles


def bench(name: str, data: dict[str, np.ndarray], repeat: int) -> dict[str, object]:
    module = MODELS[name]()
    sample = {k: v[:BATCH] for k, v in data.items()}
    trainer = Pipeline(loss).model(module, input="image").optimize(optax.adam(1e-3)).jit()
    first = compiles(
        lambda: trainer.fit(trainer.init(jax.random.key(0), sample), data, batch_size=BATCH, progress=False)
    )
    state0 = trainer.init(jax.random.key(0), sample)
    again = compiles(lambda: trainer.fit(state0, data, epochs=2, batch_size=BATCH, progress=False, log_every=7))
    step = trainer.build()  # the jitted step fit's program runs, called by hand
    bare = Pipeline(trainer.fn).model(module, input="image").optimize(optax.adam(1e-3)).build()  # not jitted
    on_device = jax.device_put(data)
    steps = len(data["label"]) // BATCH
    order = jax.random.permutation(jax.random.fold_in(state0.data_key, 0), len(data["label"]))

    @jax.jit
    def gather(i):
        index = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
        return jax.tree.map(lambda x: x[index], on_device)

    def plain_loop():
        state = state0
        for i in range(steps):
            state, _ = step(state, gather(i))
        return state.params

    @jax.jit
    def epoch(state):
        def body(state, i):
            index = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
            state, metrics = bare(state, jax.tree.map(lambda x: x[index], on_device))
            return state, metrics["loss"]

        return jax.lax.scan(body, state, jnp.arange(steps))[0].params

    def fit_default():
        return trainer.fit(state0, data, batch_size=BATCH, progress=False, hooks=[Chosen()]).params

    timed = rounds.paired_rounds(
        {"fit": fit_default, "plain loop": plain_loop, "epoch scan": lambda: epoch(state0)},
        (),
        number=1,
        repeat=repeat,
    )
    per_step = {k: min(v) / steps for k, v in timed.items()}
    return {
        "per step": per_step,
        "fit / plain loop": rounds.paired_ratio(timed["fit"], timed["plain loop"]),
        "fit / epoch scan": rounds.paired_ratio(timed["fit"], timed["epoch scan"]),
        "first fit compiles": first,
        "second fit compiles": again,
        "fit chose": Chosen.per_call,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples and rounds: a smoke test")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--examples", type=int, default=None)
    args = parser.parse_args()
    examples = args.examples or (5_000 if args.quick else 25_000)
    repeat = 3 if args.quick else 7
    data = load(examples)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {examples} examples, batch {BATCH}"
    )
    for name in args.models.split(","):
        load_before = os.getloadavg()[0]
        result = bench(name, data, repeat)
        per_step = ", ".join(f"{k} {rounds.format_seconds(v)}" for k, v in result["per step"].items())
        print(f"\n{name}: {per_step} a step (best round)")
        print(
            f"  fit / plain loop {result['fit / plain loop']:.3f}, fit / epoch scan {result['fit / epoch scan']:.3f}"
            f"  (medians of per-round ratios; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f})"
        )
        print(
            f"  XLA compiles: first fit (init included) {result['first fit compiles']}, "
            f"a second fit with other epochs and log_every {result['second fit compiles']}"
        )
        print(f"  fit chose: {result['fit chose']}")


if __name__ == "__main__":
    main()
