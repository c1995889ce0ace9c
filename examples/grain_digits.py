"""Training from Grain: scikit-learn's 8x8 digits as a ``grain.MapDataset``, checkpointed with its position.

Run: .venv/bin/python examples/grain_digits.py [--out grain-digits] [--epochs 20]

``fit`` takes the Grain dataset as it is. With a ``.checkpoint()`` stage the
Grain iterator's position is saved in each checkpoint beside the training
state, so running the script again (or after Ctrl-C, or a crash) goes on from
the last checkpoint: Grain jumps to the saved position instead of reading and
dropping the batches already trained on. The script counts the records Grain
reads to show it.

Grain shuffles with a fixed seed; ``.shuffle(seed).repeat(epochs)`` gives every
epoch its own order, in one pass that ``fit`` trains as one epoch. Across
several processes, each reads its own shard: ``ds[jax.process_index()::
jax.process_count()]`` (a no-op in one process), and ``fit`` assembles the
global batch from the processes' shares.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import flax.linen as nn
import grain
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxpipe import Pipeline, evaluate

BATCH_SIZE = 64


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


class Reads:
    """A Grain map that counts the records read (a real source would decode them here)."""

    def __init__(self) -> None:
        self.count, self._lock = 0, threading.Lock()  # Grain reads ahead on several threads

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.count += 1
        return record


def main(out: str = "grain-digits", epochs: int = 20) -> float:
    images, labels = load_digits(return_X_y=True)
    records = [
        {"image": (x / 16.0).astype(np.float32), "label": np.int32(y)} for x, y in zip(images, labels, strict=True)
    ]
    train, test = records[:1400], records[1400:]
    reads = Reads()
    dataset = (
        grain.MapDataset.source(train)[jax.process_index() :: jax.process_count()]  # this process's shard
        .shuffle(seed=0)
        .repeat(epochs)  # a new order every epoch
        .map(reads)
        .batch(BATCH_SIZE, drop_remainder=True)
    )
    trainer = (
        Pipeline(loss)
        .model(MLP(), input="image")
        .optimize(optax.adam(1e-3))
        .jit()
        .checkpoint(Path(out).resolve() / "checkpoints", every=50)
    )
    state = trainer.init(jax.random.key(0), dataset[0])  # resumes from the latest checkpoint, if any
    reads.count = 0  # the sample batch does not count
    state = trainer.fit(state, dataset, epochs=1)  # one pass of the dataset holds all its epochs
    steps = len(dataset)
    test_set = {key: np.stack([r[key] for r in test]) for key in ("image", "label")}
    accuracy = evaluate(trainer, state, test_set)["accuracy"]
    print(f"trained to step {int(state.step)} of {steps}; Grain read {reads.count} records in this run")
    print(f"test accuracy: {accuracy:.1%} on {len(test)} held-out digits")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="grain-digits")
    parser.add_argument("--epochs", type=int, default=20)
    options = parser.parse_args()
    main(options.out, options.epochs)
