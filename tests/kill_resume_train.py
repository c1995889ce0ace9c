"""A small real training run that test_kill_resume.py kills with SIGKILL and restarts.

Usage: python kill_resume_train.py CHECKPOINT_DIR OUT.npz

Reports its progress on stdout and waits for a line on stdin after each report,
so the test decides where a kill lands by what the process has done, not by
time: ``ready`` once imported, ``initialised`` after ``init`` (and its restore),
and ``step N`` after each training step (before that step's checkpoint is
saved). When training finishes it writes the final state's leaves to OUT.npz
(plain arrays, no pickle).
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe import Pipeline, hookimpl

EPOCHS, BATCH_SIZE, EVERY, KEEP = 6, 8, 3, 2  # 10 steps per epoch, 60 in all


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)  # the run depends on the saved key stream
        x = nn.BatchNorm(use_running_average=not train)(x)  # and on the saved model_state
        return nn.Dense(3)(x)


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    return {"x": x, "label": (x @ np.array([1.0, -1.0, 0.5, 2.0]) > 0).astype(np.int32) + (x[:, 0] > 1)}


def report(line: str) -> None:
    """Says how far the run got, then waits until the test lets it go on (or kills it)."""
    print(line, flush=True)
    sys.stdin.readline()


class ReportSteps:
    """Registered after the checkpoint stage's hooks, so pluggy calls it first: the report comes before the save."""

    @hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        report(f"step {run.step}")


def trainer(directory: str | None, every: int = EVERY, keep: int = KEEP) -> Pipeline:
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100))
    )
    pipe = Pipeline(loss).model(MLP(), input="x").optimize(tx).jit()
    return pipe if directory is None else pipe.checkpoint(directory, every=every, keep=keep)


def train(directory: str | None, reports: bool = False) -> object:
    """Trains to the end, resuming from ``directory``'s newest checkpoint if there is one."""
    pipe = trainer(directory)
    examples = data()
    state = pipe.init(jax.random.key(0), {k: v[:BATCH_SIZE] for k, v in examples.items()})
    if reports:
        report("initialised")
    hooks = [ReportSteps()] if reports else []
    return pipe.fit(state, examples, epochs=EPOCHS, batch_size=BATCH_SIZE, progress=False, hooks=hooks)


def leaves(state: object) -> dict[str, np.ndarray]:
    """Every leaf as plain numpy bits, keyed by its path (typed keys through their key data)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    raw = {}
    for path, leaf in flat:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        raw[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return raw


if __name__ == "__main__":
    report("ready")
    directory, out = sys.argv[1:3]
    final = train(directory, reports=True)
    with open(out, "wb") as file:
        np.savez(file, **leaves(final))
