"""``fit`` against hand-written training loops, NNX and Keras 3, in interleaved rounds.

Run: .venv/bin/python benchmarks/fit.py [--quick]   (CPU or GPU; prints the device and the load average)

Same model, data and optimizer for every contender: a 2x256 MLP on scikit-learn's
8x8 digits tiled to 50,000 examples, batch 128, ``optax.adam(1e-3)``, one epoch
(390 steps) per timed call, each call from the same initial parameters. Each
contender's final training loss (mean cross-entropy over the training set after
the epoch) is printed beside its speed, so nothing is fast because it is broken.

Contenders, timed in one process in interleaved rounds (order flipped every round):
  fit default            ``trainer.fit(...)``: data on the device, steps per call chosen by fit
  fit .scan(32)          the same pipeline with ``.scan(32)``
  hand: host batches     a jitted step, NumPy ``x[idx]`` batches (the yardstick: ratios are to it)
  hand: device data      a jitted step gathering its batch from data on the device
  hand: epoch in a scan  one ``lax.scan`` over the whole epoch, data on the device (the bare compiled steps)
  jaxpipe step, epoch in a scan  the same, scanning jaxpipe's own step (which also computes the gradient norm)
  nnx.jit loop           Flax NNX ``@nnx.jit`` step, host batches
Keras 3 (``KERAS_BACKEND=jax``, ``model.fit`` with steps_per_execution 1 and 32) runs in its own
subprocess, with its own copy of the yardstick, and is reported relative to it.

Also: fit's own cost per step over the bare compiled steps (both hand-scanned steps), and (on a GPU) peak device memory
after ``fit`` against the data's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import _timing as rounds  # the paired-rounds helpers shared by the benchmarks (benchmarks/_timing.py)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxpipe_demo import digits

from jaxpipe import Pipeline, hookimpl

BATCH, HIDDEN, CLASSES, LR = 128, 256, 10, 1e-3


def load(examples: int) -> dict[str, np.ndarray]:
    train, _ = digits()
    reps = -(-examples // len(train["label"]))
    return {k: np.concatenate([v] * reps)[:examples] for k, v in train.items()}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(CLASSES)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def hand_written(data: dict[str, np.ndarray], params0) -> dict:
    """Three hand-written loops with the same order as fit (a keyed permutation per epoch)."""
    model, tx = MLP(), optax.adam(LR)
    steps = len(data["label"]) // BATCH

    def loss_of(params, x, y):
        return loss(model.apply({"params": params}, x), {"label": y})

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss_of)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    jstep = jax.jit(step, donate_argnums=(0, 1))
    x_dev, y_dev = jnp.asarray(data["image"]), jnp.asarray(data["label"])
    key = jax.random.key(1)

    @jax.jit
    def order_of(key):
        return jax.random.permutation(key, len(data["label"]))

    def host_batches():
        params, opt_state = jax.tree.map(jnp.copy, params0), tx.init(params0)
        order = np.asarray(order_of(key))
        for i in range(steps):
            idx = order[i * BATCH : (i + 1) * BATCH]
            params, opt_state, _ = jstep(params, opt_state, data["image"][idx], data["label"][idx])
        return params

    @jax.jit
    def gather_step(params, opt_state, order, i):
        idx = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
        return step(params, opt_state, x_dev[idx], y_dev[idx])

    gather = jax.jit(gather_step, donate_argnums=(0, 1))

    def device_data():
        params, opt_state = jax.tree.map(jnp.copy, params0), tx.init(params0)
        order = order_of(key)
        for i in range(steps):
            params, opt_state, _ = gather(params, opt_state, order, i)
        return params

    @jax.jit
    def epoch(params, opt_state, order):
        def body(carry, i):
            params, opt_state = carry
            params, opt_state, value = gather_step(params, opt_state, order, i)
            return (params, opt_state), value

        (params, _), _ = jax.lax.scan(body, (params, opt_state), jnp.arange(steps))
        return params

    def epoch_scan():
        return epoch(params0, tx.init(params0), order_of(key))

    return {"hand: host batches": host_batches, "hand: device data": device_data, "hand: epoch in a scan": epoch_scan}


def step_scan(step: Pipeline, state0, data: dict[str, np.ndarray]):
    """jaxpipe's own step (no ``.jit()``) scanned over one epoch by hand, data on the device: the bare steps fit runs.

    The same step as ``fit``'s (it also computes the gradient norm), so the difference to ``fit`` is the loop's.
    """
    steps = len(data["label"]) // BATCH
    on_device = jax.device_put(data)

    @jax.jit
    def epoch(state, order):
        def body(state, i):
            index = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
            state, metrics = step(state, jax.tree.map(lambda x: x[index], on_device))
            return state, metrics["loss"]

        state, _ = jax.lax.scan(body, state, jnp.arange(steps))
        return state.params

    order = jax.jit(lambda key: jax.random.permutation(key, len(data["label"])))
    return lambda: epoch(state0, order(jax.random.key(1)))


def nnx_loop(data: dict[str, np.ndarray]):
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, HIDDEN, rngs=rngs)
            self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
            self.l3 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

        def __call__(self, x):
            return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    steps = len(data["label"]) // BATCH

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return value

    def run():
        model = Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)
        order = np.random.default_rng(0).permutation(len(data["label"]))
        for i in range(steps):
            idx = order[i * BATCH : (i + 1) * BATCH]
            train_step(model, optimizer, data["image"][idx], data["label"][idx])
        return model

    def final_loss(model) -> float:
        return float(optax.softmax_cross_entropy_with_integer_labels(model(data["image"]), data["label"]).mean())

    return run, final_loss


def keras_child(examples: int, repeat: int) -> None:
    """In a subprocess with KERAS_BACKEND=jax: Keras model.fit against the yardstick loop, as JSON."""
    import keras

    data = load(examples)
    params0 = MLP().init(jax.random.key(0), data["image"][:1])["params"]
    yard = hand_written(data, params0)["hand: host batches"]

    def make(spe):
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(HIDDEN, activation="relu"),
             keras.layers.Dense(HIDDEN, activation="relu"), keras.layers.Dense(CLASSES)]
        )  # fmt: skip
        model.compile(
            optimizer=keras.optimizers.Adam(LR),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=spe,
        )
        return model

    models = {f"keras model.fit (steps_per_execution {spe})": make(spe) for spe in (1, 32)}

    def fit_with(name):
        def run():
            models[name].fit(data["image"], data["label"], batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
            return jnp.zeros(())

        return run

    candidates = {name: fit_with(name) for name in models} | {"yardstick": yard}
    times = rounds.paired_rounds(candidates, (), number=1, repeat=repeat)
    out = {}
    for name, spe in zip(models, (1, 32), strict=True):
        # The timed models trained one more epoch every round; the loss beside the speed is that of one
        # epoch from a fresh model, as every other contender's is.
        fresh = make(spe)
        fresh.fit(data["image"], data["label"], batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
        value = float(fresh.evaluate(data["image"], data["label"], batch_size=4096, verbose=0))
        out[name] = {"seconds": statistics.median(times[name]), "vs_yardstick": rounds.paired_ratio(
            times["yardstick"], times[name]), "loss": value}  # fmt: skip
    out["yardstick"] = {"seconds": statistics.median(times["yardstick"])}
    print("KERAS " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k examples, 3 rounds: a smoke test")
    parser.add_argument("--keras-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    examples, repeat = (10_000, 3) if args.quick else (50_000, 9)
    if args.keras_child:
        keras_child(examples, repeat)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data = load(examples)
    steps = examples // BATCH
    trainer = Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(LR)).jit()
    scanned = Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(LR)).scan(32).jit()
    state0 = trainer.init(jax.random.key(0), {k: v[:BATCH] for k, v in data.items()})
    params0 = state0.params
    runs: dict = {}

    def fit_with(pipe, name):
        def run():
            state = pipe.fit(state0, data, epochs=1, batch_size=BATCH, progress=False)
            return state.params

        return run

    candidates = {"fit default": fit_with(trainer, "fit default"), "fit .scan(32)": fit_with(scanned, "fit .scan(32)")}
    candidates |= hand_written(data, params0)
    candidates["jaxpipe step, epoch in a scan"] = step_scan(Pipeline(loss).model(MLP(), input="image").optimize(
        optax.adam(LR)), state0, data)  # fmt: skip
    nnx_run, nnx_loss = nnx_loop(data)
    candidates["nnx.jit loop"] = nnx_run

    def kept(name, fn):
        def run():
            runs[name] = fn()
            return jax.tree.leaves(runs[name])[0] if name != "nnx.jit loop" else jnp.zeros(())

        return run

    times = rounds.paired_rounds({n: kept(n, f) for n, f in candidates.items()}, (), number=1, repeat=repeat)
    apply = jax.jit(lambda p: loss(MLP().apply({"params": p}, data["image"]), data))
    base = times["hand: host batches"]
    print(f"\n{examples} examples, batch {BATCH}, {steps} steps per epoch; median of {repeat} interleaved rounds")
    print(f"{'contender':<24} {'epoch':>9} {'per step':>9} {'speed vs host loop':>19} {'final loss':>11}")
    for name in candidates:
        final = nnx_loss(runs[name]) if name == "nnx.jit loop" else float(apply(runs[name]))
        epoch = statistics.median(times[name])
        ratio = rounds.paired_ratio(base, times[name])
        print(
            f"{name:<24} {rounds.format_seconds(epoch):>9} {rounds.format_seconds(epoch / steps):>9} "
            f"{ratio:>18.2f}x {final:>11.4f}"
        )
    for bare in ("hand: epoch in a scan", "jaxpipe step, epoch in a scan"):
        overhead = statistics.median(a - b for a, b in zip(times["fit default"], times[bare], strict=True))
        print(f"fit default over {bare!r}: {rounds.format_seconds(overhead / steps)} a step")
    per_call = PerCall()
    trainer.fit(state0, data, epochs=1, batch_size=BATCH, progress=False, hooks=[per_call])
    print(f"fit ran: {per_call.text}")
    stats = jax.devices()[0].memory_stats() or {}
    size = sum(v.nbytes for v in data.values())
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**20:.1f} MB for {size / 2**20:.1f} MB of data")
    else:
        print(f"peak device memory: not reported by this backend ({size / 2**20:.1f} MB of data)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    env = dict(os.environ, KERAS_BACKEND="jax")
    cmd = [sys.executable, __file__, "--keras-child", *(["--quick"] if args.quick else [])]
    started = time.perf_counter()
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in child.stdout.splitlines() if x.startswith("KERAS ")), None)
    if line is None:
        print(f"keras: no result ({child.returncode}): {child.stderr[-800:]}")
        return
    keras = json.loads(line[6:])
    print(f"\nKeras 3 (JAX backend), own process ({time.perf_counter() - started:.0f} s), vs its own yardstick loop:")
    fit_vs_yard = rounds.paired_ratio(base, times["fit default"])
    for name, row in keras.items():
        if name == "yardstick":
            continue
        print(
            f"{name:<42} {rounds.format_seconds(row['seconds']):>9} {row['vs_yardstick']:>6.2f}x host loop, "
            f"fit default is {fit_vs_yard / row['vs_yardstick']:.2f}x it; final loss {row['loss']:.4f}"
        )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


class PerCall:
    """Reads ``run.per_call`` (what fit ran per compiled call) at the end of a run."""

    text = ""

    @hookimpl
    def jaxpipe_fit_end(self, run, state):
        self.text = run.per_call


if __name__ == "__main__":
    main()
