"""``fit`` against hand-written training loops, NNX and Keras 3, in interleaved rounds, on three models.

Run: .venv/bin/python benchmarks/fit.py [--quick] [--models mlp256,mlp1024,cnn] [--children all|fit|none]

Models (scikit-learn's 8x8 digits tiled to ``examples``, ``optax.adam(1e-3)``, batch 128, one epoch
per timed call, every call from the same initial parameters):
  mlp256    a 2x256 MLP on the 64 pixels (the issue-11 model; a light step, dispatch matters)
  mlp1024   a 4x1024 MLP (compute-bound: ~3.2 M parameters)
  cnn       2 conv layers (32, 64 features, 3x3, SAME) + a dense layer on 8x8x1 images (Flax Linen)

Contenders, timed in one process in paired rounds (the order flips every round; ratios are medians of
per-round ratios; every contender is called once first, to compile):
  fit            ``trainer.fit(state0, data, epochs=1, batch_size=128, progress=False)``: data on the
                 device, steps per call chosen by fit (measured in the warm-up call, remembered after)
  plain loop     a hand-written ``jax.jit`` step with donation that gathers its batch from the data on the
                 device (the epoch's permutation is an argument), one call per step, as fit does
  epoch scan     the same step in one ``lax.scan`` over the whole epoch (one call per epoch)
  jaxpipe step scanned   diagnostic: jaxpipe's own step (it also computes the gradient norm) in the same
                 hand-written epoch scan; fit minus it is the cost of fit's loop alone
  nnx.jit loop   Flax NNX ``@nnx.jit`` step, host batches (the NNX tutorial's loop)
  keras spe=1 / spe=32   Keras 3 ``model.fit`` (``KERAS_BACKEND=jax``), ``steps_per_execution`` 1 and 32;
                 skipped with a note when Keras is not installed

Each contender's final training loss (cross-entropy over the training set after the epoch) is printed
beside its time, so nothing is fast because it is broken.

Children (fresh processes, one per contender; ``--children``): the first call's time (tracing and
compiling included; for fit, ``init`` included), the XLA compiles it ran (``jaxpipe.CompileEvents``), and
peak memory: the process's peak RSS during that first call (``VmHWM``, reset just before through
``/proc/self/clear_refs``) over its RSS just before (data and parameters already made).
For fit also later runs in the same process: ``init`` from
another key, then ``fit`` with other ``epochs`` and ``log_every``; then the same on data of another length.
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
from collections.abc import Callable
from typing import Any

import _timing as rounds  # the paired-rounds helpers shared by the benchmarks (benchmarks/_timing.py)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxpipe_demo import digits

from jaxpipe import CompileEvents, Pipeline, hookimpl

BATCH, CLASSES, LR = 128, 10, 1e-3
MODELS = {  # name: (examples, examples with --quick, rounds, rounds with --quick)
    "mlp256": (50_000, 10_000, 9, 3),
    "mlp1024": (10_000, 2_560, 7, 3),
    "cnn": (5_120, 2_560, 5, 3),  # the epoch scans run convolutions ~40x slower (XLA:CPU in a loop)
}
CONTENDERS = ["fit", "plain loop", "epoch scan", "jaxpipe step scanned", "nnx.jit loop", "keras spe=1", "keras spe=32"]


def load(model: str, examples: int) -> dict[str, np.ndarray]:
    train, _ = digits()
    reps = -(-examples // len(train["label"]))
    data = {k: np.concatenate([v] * reps)[:examples] for k, v in train.items()}
    if model == "cnn":
        data["image"] = data["image"].reshape(-1, 8, 8, 1)
    return data


# --- the model, written for each library --------------------------------------------------


class MLP(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(CLASSES)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


def linen(model: str) -> nn.Module:
    return {"mlp256": MLP((256, 256)), "mlp1024": MLP((1024,) * 4), "cnn": CNN()}[model]


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def trainer_of(model: str) -> Pipeline:
    return Pipeline(loss).model(linen(model), input="image").optimize(optax.adam(LR)).jit()


def first_batch(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[:BATCH] for k, v in data.items()}


# --- contenders ---------------------------------------------------------------------------


def hand_written(model: str, data: dict[str, np.ndarray], params0) -> dict[str, Callable[[], Any]]:
    """The plain jitted loop and the whole-epoch scan: the same step, data on the device, fit's kind of order."""
    module, tx = linen(model), optax.adam(LR)
    steps = len(data["label"]) // BATCH
    on_device = jax.device_put(data)
    key = jax.random.key(1)

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(lambda p: loss(module.apply({"params": p}, batch["image"]), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def gather_step(params, opt_state, data, order, i):
        index = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
        return step(params, opt_state, jax.tree.map(lambda x: jnp.take(x, index, axis=0), data))

    order_of = jax.jit(lambda key, epoch: jax.random.permutation(jax.random.fold_in(key, epoch), len(data["label"])))
    plain_step = jax.jit(gather_step, donate_argnums=(0, 1))

    def plain_loop():
        params, opt_state = jax.tree.map(jnp.copy, params0), tx.init(params0)
        order = order_of(key, 0)
        for i in range(steps):
            params, opt_state, _ = plain_step(params, opt_state, on_device, order, i)
        return params

    @jax.jit
    def epoch(params, opt_state, data, order):
        def body(carry, i):
            params, opt_state, value = gather_step(*carry, data, order, i)
            return (params, opt_state), value

        (params, _), values = jax.lax.scan(body, (params, opt_state), jnp.arange(steps))
        return params, values

    def epoch_scan():
        return epoch(params0, tx.init(params0), on_device, order_of(key, 0))[0]

    return {"plain loop": plain_loop, "epoch scan": epoch_scan}


def step_scanned(model: str, state0, data: dict[str, np.ndarray]) -> Callable[[], Any]:
    """jaxpipe's own step (no ``.jit()``) in the hand-written epoch scan: the bare steps fit runs."""
    step = Pipeline(loss).model(linen(model), input="image").optimize(optax.adam(LR))
    steps = len(data["label"]) // BATCH
    on_device = jax.device_put(data)

    @jax.jit
    def epoch(state, data, order):
        def body(state, i):
            index = jax.lax.dynamic_slice_in_dim(order, i * BATCH, BATCH)
            state, metrics = step(state, jax.tree.map(lambda x: jnp.take(x, index, axis=0), data))
            return state, metrics["loss"]

        state, _ = jax.lax.scan(body, state, jnp.arange(steps))
        return state.params

    order_of = jax.jit(lambda key: jax.random.permutation(key, len(data["label"])))
    return lambda: epoch(state0, on_device, order_of(jax.random.key(1)))


def nnx_loop(model: str, data: dict[str, np.ndarray]) -> tuple[Callable[[], Any], Callable[[Any], float]]:
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            if model == "cnn":
                self.layers = nnx.List(
                    [nnx.Conv(1, 32, (3, 3), rngs=rngs), nnx.Conv(32, 64, (3, 3), rngs=rngs)]
                )  # fmt: skip
                self.out = nnx.Linear(8 * 8 * 64, CLASSES, rngs=rngs)
            else:
                widths = [64, *linen(model).widths]
                self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:], strict=False)])
                self.out = nnx.Linear(widths[-1], CLASSES, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.out(x.reshape(x.shape[0], -1))

    steps = len(data["label"]) // BATCH

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return value

    def run():
        net = Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(net, optax.adam(LR), wrt=nnx.Param)
        order = np.random.default_rng(0).permutation(len(data["label"]))
        for i in range(steps):
            idx = order[i * BATCH : (i + 1) * BATCH]
            value = train_step(net, optimizer, data["image"][idx], data["label"][idx])
        value.block_until_ready()
        return net

    def final_loss(net) -> float:
        logits = jax.jit(lambda x: nnx.merge(*nnx.split(net))(x))(data["image"])
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, data["label"]).mean())

    return run, final_loss


def keras_models(model: str, data: dict[str, np.ndarray]) -> dict[str, Any] | str:
    """Keras 3 models (JAX backend) compiled with steps_per_execution 1 and 32, or why there are none."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        return "Keras 3 is not installed (pip install 'keras>=3', the `bench` extra): skipped"
    if keras.backend.backend() != "jax":
        return f"Keras runs on {keras.backend.backend()!r}, not JAX (set KERAS_BACKEND=jax): skipped"

    def make(spe: int) -> Any:
        layers = keras.layers
        if model == "cnn":
            body = [
                keras.Input((8, 8, 1)),
                layers.Conv2D(32, 3, padding="same", activation="relu"),
                layers.Conv2D(64, 3, padding="same", activation="relu"),
                layers.Flatten(),
            ]
        else:
            body = [keras.Input((64,)), *[layers.Dense(w, activation="relu") for w in linen(model).widths]]
        net = keras.Sequential([*body, layers.Dense(CLASSES)])
        net.compile(
            optimizer=keras.optimizers.Adam(LR),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=spe,
        )
        return net

    return {f"keras spe={spe}": (lambda spe=spe: make(spe)) for spe in (1, 32)}


def keras_run(net: Any, data: dict[str, np.ndarray]) -> Callable[[], Any]:
    def run():
        net.fit(data["image"], data["label"], batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
        return net

    return run


def keras_loss(make: Callable[[], Any], data: dict[str, np.ndarray]) -> float:
    """The loss after one epoch from a fresh model, as every other contender's (the timed one trained more)."""
    net = make()
    keras_run(net, data)()
    return float(net.evaluate(data["image"], data["label"], batch_size=4096, verbose=0))


# --- one model: paired rounds -------------------------------------------------------------


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_model(model: str, examples: int, repeat: int) -> dict[str, Any]:
    data = load(model, examples)
    steps = examples // BATCH
    trainer = trainer_of(model)
    state0 = trainer.init(jax.random.key(0), first_batch(data))
    runs: dict[str, Any] = {}
    per_call = PerCall()

    def fit():
        state = trainer.fit(state0, data, epochs=1, batch_size=BATCH, progress=False, hooks=[per_call])
        return state.params

    candidates: dict[str, Callable[[], Any]] = {"fit": fit}
    candidates |= hand_written(model, data, state0.params)
    if model != "cnn":  # a diagnostic of fit's loop only where fit runs scans; ~40x slower for the CNN
        candidates["jaxpipe step scanned"] = step_scanned(model, state0, data)
    nnx_run, nnx_loss = nnx_loop(model, data)
    candidates["nnx.jit loop"] = nnx_run
    keras = keras_models(model, data)
    note = keras if isinstance(keras, str) else ""
    if not isinstance(keras, str):
        candidates |= {name: keras_run(make(), data) for name, make in keras.items()}

    def kept(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            runs[name] = out = fn()
            return jax.tree.leaves(out)[0] if isinstance(out, dict) else jnp.zeros(())

        return run

    load_before = load_text()
    times = rounds.paired_rounds({n: kept(n, f) for n, f in candidates.items()}, (), number=1, repeat=repeat)
    load_after = load_text()
    apply = jax.jit(lambda p: loss(linen(model).apply({"params": p}, data["image"]), data))
    losses = {}
    for name in candidates:
        if name == "nnx.jit loop":
            losses[name] = nnx_loss(runs[name])
        elif name.startswith("keras"):
            losses[name] = keras_loss(keras[name], data)
        else:
            losses[name] = float(apply(runs[name]))
    best_hand = [min(a, b) for a, b in zip(times["plain loop"], times["epoch scan"], strict=True)]
    ratios = {
        "fit / min(plain, scan)": rounds.paired_ratio(times["fit"], best_hand),
        "fit / plain loop": rounds.paired_ratio(times["fit"], times["plain loop"]),
        "fit / epoch scan": rounds.paired_ratio(times["fit"], times["epoch scan"]),
    }
    if "jaxpipe step scanned" in times:
        ratios["fit / jaxpipe step scanned"] = rounds.paired_ratio(times["fit"], times["jaxpipe step scanned"])
    if not note:
        keras_best = [min(a, b) for a, b in zip(times["keras spe=1"], times["keras spe=32"], strict=True)]
        ratios["fit / keras best"] = rounds.paired_ratio(times["fit"], keras_best)
    return {
        "model": model,
        "examples": examples,
        "steps": steps,
        "rounds": repeat,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "vs_plain": {name: rounds.paired_ratio(t, times["plain loop"]) for name, t in times.items()},
        "loss": losses,
        "ratios": ratios,
        "per_call": per_call.text,
        "keras_note": note,
        "load": (load_before, load_after),
    }


class PerCall:
    """Reads ``run.per_call`` (what fit ran per compiled call) at the end of a run."""

    text = ""

    @hookimpl
    def jaxpipe_fit_end(self, run, state):
        self.text = run.per_call


# --- children: first call, compiles, peak memory --------------------------------------------


def rss_bytes() -> int:
    """The RSS now, after resetting the peak (``VmHWM``) to it: ``ru_maxrss`` would include the parent's RSS
    at the fork (Linux keeps it across ``exec``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """The peak RSS since :func:`rss_bytes` (``VmHWM`` in ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(model: str, contender: str, examples: int) -> None:
    data = load(model, examples)
    out: dict[str, Any] = {}
    if contender == "fit":
        trainer = trainer_of(model)
        keys = [jax.random.key(i) for i in range(3)]  # the caller's keys: made before counting
        batch = first_batch(data)
        before = rss_bytes()
        with CompileEvents() as events:
            start = time.perf_counter()
            state = trainer.init(keys[0], batch)
            state = trainer.fit(state, data, epochs=1, batch_size=BATCH, progress=False)
            jax.block_until_ready(state.params)
            out["first_call_s"] = time.perf_counter() - start
        out["compiles"] = events.compiles
        peak = peak_bytes()
        # Later runs from a fresh state (init from another key): other epochs and log_every on the same
        # data, then also a data set of another length (one batch and 3 examples fewer).
        shorter = {k: v[: examples - BATCH - 3] for k, v in data.items()}
        for name, key, train in (("second", keys[1], data), ("third", keys[2], shorter)):
            with CompileEvents() as again:
                start = time.perf_counter()
                state = trainer.init(key, batch)
                state = trainer.fit(state, train, epochs=2, batch_size=BATCH, progress=False, log_every=7)
                jax.block_until_ready(state.params)
                out[f"{name}_call_s"] = time.perf_counter() - start
            out[f"{name}_compiles"] = again.compiles
    else:
        params0 = linen(model).init(jax.random.key(0), first_batch(data)["image"])["params"]
        if contender in ("plain loop", "epoch scan"):
            fn = hand_written(model, data, params0)[contender]
        elif contender == "jaxpipe step scanned":
            trainer = trainer_of(model)
            fn = step_scanned(model, trainer.init(jax.random.key(0), first_batch(data)), data)
        elif contender == "nnx.jit loop":
            fn = nnx_loop(model, data)[0]
        else:
            keras = keras_models(model, data)
            if isinstance(keras, str):
                print("CHILD " + json.dumps({"skipped": keras}))
                return
            fn = keras_run(keras[contender](), data)
        before = rss_bytes()
        with CompileEvents() as events:
            start = time.perf_counter()
            result = fn()
            jax.block_until_ready(result if isinstance(result, (dict, jax.Array)) else None)
            out["first_call_s"] = time.perf_counter() - start
        out["compiles"] = events.compiles
        peak = peak_bytes()
    out["peak_rss_mb"] = peak / 2**20
    out["peak_over_start_mb"] = max(peak - before, 0) / 2**20
    print("CHILD " + json.dumps(out))


def run_child(model: str, contender: str, examples: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", model, contender, "--examples", str(examples)]
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("CHILD ")), None)
    if line is None:
        return {"error": f"exit {done.returncode}: {done.stderr[-400:]}"}
    return json.loads(line[6:])


# --- the report ---------------------------------------------------------------------------


def report(result: dict[str, Any], children: dict[str, dict[str, Any]]) -> None:
    model, steps = result["model"], result["steps"]
    print(
        f"\n## {model}: {result['examples']} examples, batch {BATCH}, {steps} steps per epoch, median of "
        f"{result['rounds']} paired rounds; load average {result['load'][0]} before, {result['load'][1]} after"
    )
    print(f"fit ran: {result['per_call']}")
    if result["keras_note"]:
        print(f"keras: {result['keras_note']}")
    head = f"{'contender':<22} {'epoch':>9} {'per step':>9} {'vs plain loop':>14} {'final loss':>11}"
    if children:
        head += f" {'first call':>11} {'compiles':>9} {'peak RSS over start':>20}"
    print(head)
    for name, seconds in result["seconds"].items():
        line = (
            f"{name:<22} {rounds.format_seconds(seconds):>9} {rounds.format_seconds(seconds / steps):>9} "
            f"{result['vs_plain'][name]:>13.3f}x {result['loss'][name]:>11.4f}"
        )
        c = children.get(name)
        if c and "error" not in c and "skipped" not in c:
            line += (
                f" {rounds.format_seconds(c['first_call_s']):>11} {c['compiles']:>9} "
                f"{c['peak_over_start_mb']:>13.1f} MB of {c['peak_rss_mb']:.0f}"
            )
        elif c:
            line += f"  ({c.get('error') or c.get('skipped')})"
        print(line)
    fc = children.get("fit")
    if fc and "second_compiles" in fc:
        print(
            f"fit, first run (init included): {fc['compiles']} compiles, {rounds.format_seconds(fc['first_call_s'])}; "
            f"then init from another key + fit(epochs=2, log_every=7): {fc['second_compiles']} compiles, "
            f"{rounds.format_seconds(fc['second_call_s'])}; the same on data {BATCH + 3} examples shorter: "
            f"{fc['third_compiles']} compiles, {rounds.format_seconds(fc['third_call_s'])}"
        )
    for name, ratio in result["ratios"].items():
        print(f"{name:<28} {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, 3 rounds: a smoke test")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default: per model)")
    parser.add_argument(
        "--children", choices=["all", "fit", "none"], default=None, help="fresh processes per contender "
        "for first-call time, compiles and peak RSS (default: all; fit with --quick)"
    )  # fmt: skip
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.examples)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    which = args.children or ("fit" if args.quick else "all")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    summary = []
    for model in models:
        full, quick, repeat, quick_repeat = MODELS[model]
        examples = quick if args.quick else full
        result = bench_model(model, examples, args.rounds or (quick_repeat if args.quick else repeat))
        names = [] if which == "none" else ["fit"] if which == "fit" else list(result["seconds"])
        children = {name: run_child(model, name, examples) for name in names}
        report(result, children)
        summary.append((model, result, children.get("fit", {})))
    print(f"\n## summary (load average now {load_text()})")
    print(
        f"{'model':<9} {'fit/min(plain,scan)':>20} {'fit/keras best':>15} {'first fit compiles':>19} {'later':>6} "
        f"{'other length':>13}"
    )
    for model, result, fc in summary:
        keras = result["ratios"].get("fit / keras best")
        print(
            f"{model:<9} {result['ratios']['fit / min(plain, scan)']:>20.3f} "
            f"{'-' if keras is None else f'{keras:.3f}':>15} {fc.get('compiles', '-'):>19} "
            f"{fc.get('second_compiles', '-'):>6} {fc.get('third_compiles', '-'):>13}"
        )


if __name__ == "__main__":
    main()
