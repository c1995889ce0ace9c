"""A training run that reads its batches from Grain; test_grain.py kills it with SIGKILL and restarts it.

Usage: python grain_resume_train.py CHECKPOINT_DIR OUT.npz READS_FILE

Prints ``ready`` once imported and ``step N`` after each training step;
appends one byte to READS_FILE for every record Grain reads (the map function
a real loader would decode in), so the test can count the reads of each run.
When training finishes, writes the final state's leaves to OUT.npz.
"""

from __future__ import annotations

import os
import sys

import grain
import jax
import numpy as np
import optax
from kill_resume_train import MLP, data, leaves, loss

from jaxpipe import Pipeline, hookimpl

EPOCHS, BATCH_SIZE, EVERY, KEEP = 6, 8, 3, 2  # 10 steps per epoch, 60 in all
READ_AHEAD = 2  # batches Grain prepares ahead of the one fit takes


class PrintSteps:
    """Registered after the checkpoint stage's hooks, so pluggy calls it first: the line comes before the save."""

    @hookimpl
    def jaxpipe_fit_step(self, run, state, metrics):
        print(f"step {run.step}", flush=True)


class CountReads:
    """A Grain map that appends a byte to a file per record: O_APPEND writes are atomic across threads."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)
        return record


def dataset(reads: str) -> grain.IterDataset:
    """The 80 examples, a new order each epoch (Grain's shuffle then repeat), in batches of 8."""
    examples = data()
    records = [{key: value[i] for key, value in examples.items()} for i in range(len(examples["x"]))]
    return (
        grain.MapDataset.source(records)
        .shuffle(seed=0)
        .repeat(EPOCHS)
        .map(CountReads(reads))
        .batch(BATCH_SIZE, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=READ_AHEAD))
    )


def train(directory: str | None, reads: str) -> object:
    """Trains to the end of the data, resuming from ``directory``'s newest checkpoint if there is one."""
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100))
    )
    pipe = Pipeline(loss).model(MLP(), input="x").optimize(tx).jit()
    if directory is not None:
        pipe = pipe.checkpoint(directory, every=EVERY, keep=KEEP)
    examples = data()
    state = pipe.init(jax.random.key(0), {k: v[:BATCH_SIZE] for k, v in examples.items()})
    hooks = [PrintSteps()] if directory is not None else []
    return pipe.fit(state, dataset(reads), progress=False, hooks=hooks)


if __name__ == "__main__":
    print("ready", flush=True)
    directory, out, reads = sys.argv[1:4]
    final = train(directory, reads)
    with open(out, "wb") as file:
        np.savez(file, **leaves(final))
