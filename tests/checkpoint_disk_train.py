"""A small real training run for test_checkpoint_robust.py's disks: read-only, full.

Usage: python checkpoint_disk_train.py fit|save|restore DIRECTORY [EPOCHS]

``fit`` trains EPOCHS epochs of 8 steps, saving every step; ``save`` saves the
initial state by hand (``trainer.save``); ``restore`` restores the newest
checkpoint. Each prints one line, ``done step N`` or ``PipelineError: ...``
(then the message), and the process must then exit by itself.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe import Pipeline, PipelineError


def loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(64, 4)).astype(np.float32), "y": rng.normal(size=(64,)).astype(np.float32)}


def main(mode: str, directory: str, epochs: int) -> None:
    pipe = Pipeline(loss).optimize(optax.adam(1e-2)).jit().checkpoint(directory, every=1, keep=None)
    batches = data()
    sample = {k: v[:8] for k, v in batches.items()}
    try:
        state = pipe.init(jax.random.key(0), sample, params={"w": np.zeros(4, np.float32)})
        if mode == "fit":
            state = pipe.fit(state, batches, epochs=epochs, batch_size=8, progress=False)
        elif mode == "save":
            pipe.save(state)
        print(f"done step {int(state.step)}", flush=True)
    except PipelineError as err:
        print(f"PipelineError: {err}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
