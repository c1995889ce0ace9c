"""PRNG keys in a jaxpipe training run, and the same keys split by hand.

Run: .venv/bin/python examples/prng_splitting.py

JAX has no global random state: every random draw takes a key, and a key used
twice gives the same numbers twice. The pattern the JAX docs recommend is to
*split* a key into fresh ones before each use. A jaxpipe training run does
exactly that, visibly:

- ``init(key, ...)`` splits ``key`` into three: parameter initialisation, the
  state's step key, and the data key (``jaxpipe.split_init_key``).
- each step splits the state's key: ``key, dropout_key = jax.random.split(state.key)``;
  the new ``key`` goes into the next state, ``dropout_key`` to the model.
- epoch ``e`` shuffles with ``jax.random.fold_in(data_key, e)``, so a resumed run
  sees the batches it would have seen.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpipe
from jaxpipe import Pipeline


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(nn.Dropout(0.5, deterministic=not train)(x))


def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def same_key(a, b) -> bool:
    return bool(jnp.array_equal(jax.random.key_data(a), jax.random.key_data(b)))


def main() -> bool:
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 8)).astype(np.float32), "label": rng.integers(0, 10, 16).astype(np.int32)}
    trainer = Pipeline(loss).model(DropoutMLP(), input="image").optimize(optax.adam(1e-3)).jit()

    key = jax.random.key(42)
    state = trainer.init(key, batch)
    params_key, run_key, data_key = jax.random.split(key, 3)  # what init did
    documented = jaxpipe.split_init_key(key)
    print(
        "init splits the key into (params, step, data):",
        all(map(same_key, documented, (params_key, run_key, data_key))),
    )
    print(
        "state.key is the step key:",
        same_key(state.key, run_key),
        "| state.data_key:",
        same_key(state.data_key, data_key),
    )

    expected = run_key
    for step in range(3):
        expected, dropout_key = jax.random.split(expected)  # the split each step makes
        state, _ = trainer(state, batch)
        print(f"step {step + 1}: state.key == split(previous state.key)[0]: {same_key(state.key, expected)}")

    # Reusing a key repeats the draw; splitting gives independent ones.
    a, b = jax.random.split(jax.random.key(0))
    print("same key, same draw:", bool(jnp.array_equal(jax.random.normal(a, (3,)), jax.random.normal(a, (3,)))))
    print(
        "split keys, different draws:",
        not bool(jnp.array_equal(jax.random.normal(a, (3,)), jax.random.normal(b, (3,)))),
    )

    order = jax.random.permutation(jax.random.fold_in(state.data_key, 0), 16)
    print("epoch 0 visits the examples in the order", np.asarray(order).tolist())
    return same_key(state.key, expected)


if __name__ == "__main__":
    main()
