"""A tiny GPT trained with its parameters split over a 2-D (data, model) mesh: bigger than one device.

The decoder-only transformer (Flax Linen) names the logical axes of each
kernel with ``nn.with_logical_partitioning``; ``RULES`` maps them to mesh
axes. ``.data_parallel(mesh, param_specs=("annotations", "fsdp"), rules=RULES)``
then splits the batch over ``data``, the heads, MLP and vocabulary over
``model`` (Megatron-style), and every large kernel once more over ``data``
(FSDP). ``init`` makes each device's shards directly: no device ever holds a
whole kernel. The text is the docstrings of a few standard-library modules,
read at run time, as characters.

One process, 8 CPU devices as a (2, 4) mesh, checked against one device::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/gpt_sharded.py --check

Two processes x 4 CPU devices on this machine (gloo collectives; run both)::

    python examples/gpt_sharded.py --num-processes 2 --process-id 0 --cpu-devices 4 &
    python examples/gpt_sharded.py --num-processes 2 --process-id 1 --cpu-devices 4
"""

from __future__ import annotations

import argparse
import collections
import json
import textwrap
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils

from jaxpipe import Pipeline, TrainState, sharding_report

VOCAB, EMBED, HEADS, MLP, LAYERS, CONTEXT = 128, 64, 4, 128, 2, 32
# Logical axis -> mesh axis. 'vocab', 'heads' and 'mlp' share 'model': one spec never names two of them.
RULES = [("batch", "data"), ("vocab", "model"), ("embed", None), ("heads", "model"), ("mlp", "model")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default="127.0.0.1:12356", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--cpu-devices", type=int, default=None, help="run on this many CPU devices per process")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="also train on one device and compare")
    parser.add_argument("--save", default=None, help="write the trained parameters to this .npz (process 0)")
    return parser.parse_args(argv)


def start_runtime(args: argparse.Namespace) -> None:
    """Joins the processes on 127.0.0.1 (as examples/multiprocess_train.py does). Before JAX touches a device."""
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes is not None:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            coordinator_bind_address=args.coordinator,
        )


def dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
    return nn.Dense(features, kernel_init=init, use_bias=False, name=name)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        h = nn.LayerNorm(name="norm_attention")(x)
        q, k, v = (dense(EMBED, ("embed", "heads"), n)(h).reshape(batch, length, HEADS, -1) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, EMBED)
        x = x + dense(EMBED, ("heads", "embed"), "out")(attended)
        h = nn.LayerNorm(name="norm_mlp")(x)
        return x + dense(EMBED, ("mlp", "embed"), "down")(nn.gelu(dense(MLP, ("embed", "mlp"), "up")(h)))


class GPT(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(
            VOCAB, EMBED, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        )
        position = self.param(
            "position", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")), (CONTEXT, EMBED)
        )
        x = embed(tokens) + position[: tokens.shape[1]]
        for i in range(LAYERS):
            x = Block(name=f"block_{i}")(x)
        return embed.attend(nn.LayerNorm(name="norm_out")(x))  # the output layer shares the embedding


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_data(size: int = 128) -> dict[str, np.ndarray]:
    """``size`` windows of ``CONTEXT + 1`` characters from some standard-library docstrings (same on every process)."""
    text = "\n".join(textwrap.dedent(m.__doc__ or "") for m in (argparse, json, collections))
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % VOCAB
    starts = np.random.default_rng(0).integers(0, len(codes) - CONTEXT - 1, size)
    windows = np.stack([codes[s : s + CONTEXT + 1] for s in starts])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def trainer(mesh: jax.sharding.Mesh | None) -> Pipeline:
    """The training pipeline; without a mesh, the same training on one device."""
    pipe = Pipeline(loss).model(GPT(), input="inputs", label=None).optimize(optax.sgd(0.1, momentum=0.9))
    if mesh is not None:
        pipe = pipe.data_parallel(mesh, axis="data", param_specs=("annotations", "fsdp"), rules=RULES)
    return pipe.jit()


def final_loss(params: dict, data: dict[str, np.ndarray]) -> float:
    """The loss of whole (gathered) parameters on the whole data set, on one device."""
    params = jax.device_get(params)
    return float(jax.jit(lambda p: loss(GPT().apply({"params": p}, data["inputs"]), data))(params))


def train(pipe: Pipeline, data: dict[str, np.ndarray], args: argparse.Namespace) -> TrainState:
    state = pipe.init(jax.random.key(0), data)
    return pipe.fit(state, data, epochs=args.epochs, batch_size=args.batch_size, progress=False)


def main(argv: Sequence[str] | None = None) -> TrainState:
    args = parse_args(argv)
    start_runtime(args)
    mesh = jax.make_mesh((2, jax.device_count() // 2), ("data", "model"))  # every device of every process
    data = make_data()
    pipe = trainer(mesh)
    state = train(pipe, data, args)
    batch = {k: v[: args.batch_size] for k, v in data.items()}
    params = multihost_utils.process_allgather(state.params, tiled=True)  # whole arrays on every process
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es) x {jax.local_device_count()} devices, mesh {dict(mesh.shape)}")
        print(f"step {int(state.step)}, loss {final_loss(params, data):.6f}")
        if jax.process_count() == 1:
            print(sharding_report(pipe, state, jax.device_put(batch)))
        if args.save:
            leaves = jax.tree_util.tree_leaves_with_path(params)
            np.savez(args.save, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    if args.check and jax.process_count() == 1:
        one = jax.device_get(train(trainer(None), data, args).params)
        want, got = final_loss(one, data), final_loss(params, data)
        assert abs(got - want) <= 1e-5, f"loss {got} on the mesh, {want} on one device"
        # (SGD with momentum: Adam's division by sqrt(nu) would magnify the summation order's last digits)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, one)
        print(f"the same loss as one device ({want:.6f}, within 1e-5) and the same parameters")
    return state


if __name__ == "__main__":
    main()
    if jax.process_count() > 1:
        jax.distributed.shutdown()
