"""One process of tests/test_multiprocess.py: runs the documented example, then saves the parameters.

Usage: python tests/multiprocess_worker.py OUT.npz [examples/multiprocess_train.py options]
Process 0 writes the trained parameters to OUT.npz, keyed by their pytree paths.
"""

from __future__ import annotations

import pathlib
import sys


def run(out: str, argv: list[str]) -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import jax
    import numpy as np
    from multiprocess_train import main

    state = main(argv)
    if jax.process_index() == 0:  # the parameters are replicated: every process holds all of them
        leaves = jax.tree_util.tree_leaves_with_path(state.params)
        np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    jax.distributed.shutdown()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
