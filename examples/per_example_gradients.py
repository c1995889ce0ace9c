"""Per-example gradients: one pipeline instead of a Python loop over the batch.

Run: .venv/bin/python examples/per_example_gradients.py

``Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()`` is exactly
``jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))``: the gradient of a
single example's loss, mapped over the batch with the parameters shared. Here
it ranks the digits a briefly trained logistic regression finds hardest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxpipe import Pipeline


def example_loss(params, example):
    """The loss of one example: an image of 64 pixels and its label."""
    logits = example["image"] @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def main() -> dict[str, jax.Array]:
    images, labels = load_digits(return_X_y=True)
    batch = {"image": jnp.asarray(images[:256] / 16.0, jnp.float32), "label": jnp.asarray(labels[:256])}
    mean_loss = Pipeline(lambda p, b: jax.vmap(example_loss, (None, 0))(p, b).mean(), name="mean_loss")
    trainer = mean_loss.optimize(optax.adam(0.05)).jit()
    state = trainer.init(jax.random.key(0), batch, params={"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)})
    state = trainer.fit(state, [batch], epochs=30, progress=False)  # 30 full-batch steps
    params = state.params

    per_example = Pipeline(example_loss).grad().vmap(in_axes=(None, 0)).jit()
    print(per_example)
    print("equivalent JAX:", per_example.explain())
    grads = per_example(params, batch)
    print("per-example gradient shapes:", jax.tree.map(jnp.shape, grads))

    examples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    one_gradient = jax.jit(jax.grad(example_loss))
    one_by_one = [one_gradient(params, example) for example in examples]
    same = all(jnp.allclose(grads["w"][i], g["w"], atol=1e-6) for i, g in enumerate(one_by_one))
    print("equal to a Python loop over examples:", same)

    mean_grad = jax.tree.map(lambda g: g.mean(0), grads)  # their mean is the batch gradient
    batch_grad = jax.jit(jax.grad(mean_loss.fn))(params, batch)
    agree = bool(jnp.allclose(mean_grad["w"], batch_grad["w"], atol=1e-6))
    print("mean of per-example gradients equals the batch gradient:", agree)

    norms = jnp.sqrt(sum(jnp.sum(g.reshape(len(g), -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
    hardest = np.argsort(-np.asarray(norms))[:5]
    print("hardest digits (largest gradient norm):", ", ".join(f"#{i} (a {labels[i]})" for i in hardest))
    return grads


if __name__ == "__main__":
    main()
