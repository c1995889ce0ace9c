"""The fit dashboard's cost to the training loop: fit with the dashboard vs fit with no progress display.

Paired rounds in one process: the same tiny training run (steps of ~100 µs, where a per-step cost
would show most) with ``progress=False``, with fit's default tqdm bar, and with the dashboard
plugin supplying the progress display. Prints per-step times and the ratios to the bare loop, the
cost of a redraw, and the cost of the Stop button's read of the kernel's widget messages (in a real kernel).

    .venv/bin/python benchmarks/dashboard.py [--steps 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe import Pipeline
from jaxpipe.ipython.dashboard import REFRESH_SECONDS, Dashboard, FitView


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    batch_size = 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(options.steps * batch_size, 16)).astype(np.float32)
    data = {"x": x, "y": (x @ rng.normal(size=16)).astype(np.float32)}
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.01)).jit()
    start = trainer.init(jax.random.key(0), data, params={"w": jnp.zeros(16)})

    def run(progress: bool, hooks: list[object]) -> float:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            began = time.perf_counter()
            state = trainer.fit(start, data, epochs=1, batch_size=batch_size, progress=progress, hooks=hooks)
            jax.block_until_ready(state)
            return (time.perf_counter() - began) / options.steps

    variants = {
        "no progress display": lambda: run(False, []),
        "tqdm bar (default)": lambda: run(True, []),
        "dashboard": lambda: run(True, [Dashboard()]),
    }
    for fn in variants.values():  # compile and warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    base = statistics.median(times["no progress display"])
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {options.steps} steps x {options.rounds} rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<22} {median * 1e6:8.1f} µs/step   ratio {median / base:.3f}")

    from jaxpipe import FitRun

    fit_run = FitRun(trainer, epochs=1, batch_size=8, steps_per_epoch=10**6, total_steps=10**6)
    view = FitView(fit_run)
    calls = 200_000
    began = time.perf_counter()
    for _ in range(calls):
        view.update(1)
    print(f"  FitView.update between redraws: {(time.perf_counter() - began) / calls * 1e9:.0f} ns/call")

    # a redraw reads only the rows added since the last one: its cost does not grow with the run
    for rows in (1_000, 100_000):
        fit_run.history.extend({"loss": 1.0 / (i + 1), "grad_norm": 2.0 / (i + 1)} for i in range(rows))
        fit_run.step = len(fit_run.history)
        view.draw()  # takes the backlog
        draws = []
        for _ in range(20):
            fit_run.history.extend({"loss": 0.1, "grad_norm": 0.2} for _ in range(500))  # 0.5 s of steps
            began = time.perf_counter()
            view.draw()
            draws.append(time.perf_counter() - began)
        median = statistics.median(draws)
        print(
            f"  redraw at {len(fit_run.history):,} steps of history: {median * 1e3:.2f} ms "
            f"({median / REFRESH_SECONDS:.2%} of the loop at one redraw per {REFRESH_SECONDS} s)"
        )

    began = time.perf_counter()
    for _ in range(calls):
        view.poll()
    print(f"  FitView.poll between reads of widget messages: {(time.perf_counter() - began) / calls * 1e9:.0f} ns/call")
    print(f"  one read of the kernel's pending widget messages, none waiting: {kernel_poll_cost():.1f} µs")


# Run in a real kernel: the cost of SocketPoller.poll() when no message waits, what each read costs fit.
_POLL_CELL = """
import time
from jaxpipe.ipython.uipoll import comm_poller
poller = comm_poller()
for _ in range(1000):
    poller.poll()
began = time.perf_counter()
for _ in range(20000):
    poller.poll()
print((time.perf_counter() - began) / 20000 * 1e6)
poller.close()
"""


def kernel_poll_cost() -> float:
    import queue

    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        msg_id = client.execute(_POLL_CELL)
        while True:
            try:
                msg = client.get_iopub_msg(timeout=60)
            except queue.Empty as err:
                raise RuntimeError("the kernel did not answer") from err
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                return float(msg["content"]["text"])
            if msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
