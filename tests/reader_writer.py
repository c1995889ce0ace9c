"""Two real processes on one checkpoint directory: a trainer that saves every step, a reader that restores.

Usage: python reader_writer.py train CHECKPOINT_DIR OUT.npz
       python reader_writer.py read CHECKPOINT_DIR OUT.npz

The trainer trains kill_resume_train's run with a save every step and writes
the final state's leaves to OUT.npz. The reader (an evaluation job) calls
``init`` on the same directory again and again until OUT.npz (or OUT.npz.stop,
which the test writes when the trainer ended) exists, and prints
one JSON line: how many restores it did, and how many began while a save was
being written.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import kill_resume_train as run
import numpy as np


def main(mode: str, directory: str, out: str) -> None:
    pipe = run.trainer(directory, every=1, keep=2)
    examples = run.data()
    sample = {k: v[: run.BATCH_SIZE] for k, v in examples.items()}
    if mode == "train":
        state = pipe.init(jax.random.key(0), sample)
        final = pipe.fit(state, examples, epochs=run.EPOCHS, batch_size=run.BATCH_SIZE, progress=False)
        with open(out + ".part", "wb") as file:
            np.savez(file, **run.leaves(final))
        os.replace(out + ".part", out)
        return
    reads = while_saving = 0
    while not (os.path.exists(out) or os.path.exists(out + ".stop")):  # trained, or the trainer failed
        saving = os.path.isdir(directory) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory))
        pipe.init(jax.random.key(1), sample)
        reads += 1
        while_saving += saving
    print(json.dumps({"reads": reads, "reads_while_saving": while_saving}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
