"""Small real training programs that test_whole_programs.py runs as separate processes.

Usage: python whole_program_train.py CASE [CHECKPOINT_DIR]

Each case is a script as a user would write it: it trains, and prints what the test checks (a line of JSON
starting with ``result:``, or ``final accuracy`` after ``fit`` returns). The cases:

- ``ctrl_c``: sends itself SIGINT from a hook at step 3, as Ctrl-C in a terminal would.
- ``end_hook``: the user's ``jaxpipe_fit_end`` raises; 15 steps, checkpoints every 4.
- ``examples``: a list of per-example dicts (70 of them), ``batch_size=16``, 2 epochs.
- ``host_nan``: ``.scan(5)`` without ``.jit()`` (fit calls it as built) diverges; ``on_nonfinite="stop"``.
- ``vector_nan``: a vector metric ``per_class`` with a NaN in one element from some step on.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpipe
from jaxpipe import Pipeline

N, BATCH = 64, 16  # 4 steps per epoch
X = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
DATA = {"x": X, "y": (X @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


def linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def vector_metric_loss(params, batch):
    loss = linear_loss(params, batch)
    per_class = jnp.stack([jnp.float32(1.0), jnp.where(params["w"][0] > 0.3, jnp.nan, 0.0), jnp.float32(2.0)])
    return loss, {"per_class": per_class}


def start(trainer):
    return trainer.init(jax.random.key(0), DATA, params={"w": jnp.zeros(3)})


def by_hand(trainer, state, steps):
    """The hand-written loop ``fit`` equals: epoch e's order is permutation(fold_in(data_key, e))."""
    per_epoch = N // BATCH
    for step in range(steps):
        epoch, offset = divmod(step, per_epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(state.data_key, epoch), N))
        state, _ = trainer(state, {k: v[order[offset * BATCH : (offset + 1) * BATCH]] for k, v in DATA.items()})
    return state


def result(**values):
    print("result: " + json.dumps(values), flush=True)


def accuracy(state):
    return float(jnp.mean(jnp.abs(DATA["x"] @ state.params["w"] - DATA["y"]) < 0.5))


def ctrl_c(directory):
    class CtrlCAtStep3:
        @jaxpipe.hookimpl
        def jaxpipe_fit_step(self, run, state, metrics):
            if run.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the terminal

    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(directory, every=100).jit()
    state = trainer.fit(start(trainer), DATA, epochs=50, batch_size=BATCH, progress=False, hooks=[CtrlCAtStep3()])
    print("final accuracy", accuracy(state))


def end_hook(directory):
    class BrokenEnd:
        @jaxpipe.hookimpl
        def jaxpipe_fit_end(self, run, state):
            raise RuntimeError("my end hook broke")

    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).checkpoint(directory, every=4).jit()
    state = trainer.fit(start(trainer), DATA, steps=15, batch_size=BATCH, progress=False, hooks=[BrokenEnd()])
    print("final accuracy", accuracy(state))


def examples(directory):
    del directory  # nothing saved
    records = [{"x": X[i % N], "y": DATA["y"][i % N]} for i in range(70)]  # 70 // 16 = 4 full batches per epoch
    history = jaxpipe.History()
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    state = trainer.fit(start(trainer), records, epochs=2, batch_size=16, progress=False, hooks=[history])
    result(step=int(state.step), epochs=[row.get("epoch") for row in history.steps])


def host_nan(directory):
    del directory  # nothing saved
    eager = Pipeline(linear_loss).optimize(optax.sgd(30.0)).scan(5)  # no .jit(): fit calls it as built
    history = jaxpipe.History()
    state = eager.fit(
        start(eager), DATA, epochs=10, batch_size=BATCH, progress=False, on_nonfinite="stop", hooks=[history]
    )
    rows = [row["step"] for row in history.steps]
    finite = all(np.isfinite(row["loss"]) for row in history.steps)
    result(step=int(state.step), last_row=max(rows, default=0), finite=finite)


def vector_nan(directory):
    del directory  # nothing saved
    trainer = Pipeline(vector_metric_loss).optimize(optax.sgd(0.05)).jit()
    state = trainer.fit(start(trainer), DATA, epochs=20, batch_size=BATCH, progress=False)
    print("final accuracy", accuracy(state))


if __name__ == "__main__":
    case, directory = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    {"ctrl_c": ctrl_c, "end_hook": end_hook, "examples": examples, "host_nan": host_nan, "vector_nan": vector_nan}[
        case
    ](directory)
