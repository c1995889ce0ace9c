"""Data-parallel training of one jaxpipe pipeline across several processes (hosts).

The same script runs once per process; ``jax.distributed.initialize`` joins them
into one JAX runtime whose mesh spans every process's devices. Each process
holds the same data set, ``fit`` takes this process's rows of every global batch,
and the parameters stay replicated, so the result matches a single device.
Checkpoints go to one directory that every process can reach (a shared file
system or bucket on real hosts); each process writes its part through Orbax.

Try it on one machine with 2 processes x 4 CPU devices (run both lines)::

    python examples/multiprocess_train.py --num-processes 2 --process-id 0 --cpu-devices 4 &
    python examples/multiprocess_train.py --num-processes 2 --process-id 1 --cpu-devices 4

On GPU hosts, one process per host, every host pointing at the first one::

    python examples/multiprocess_train.py --coordinator host0:1234 --num-processes 4 --process-id $RANK

Under SLURM, Open MPI or on a TPU pod, leave the three options out:
``jax.distributed.initialize()`` reads them from the cluster.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import linen as nn

from jaxpipe import Pipeline, TrainState


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default="127.0.0.1:12355", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--cpu-devices", type=int, default=None, help="run on this many CPU devices per process")
    parser.add_argument("--checkpoint-dir", default="runs/multiprocess")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch, split over all devices")
    return parser.parse_args(argv)


def start_runtime(args: argparse.Namespace) -> None:
    """Joins this process to the others. Must run before JAX touches a device."""
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    if args.num_processes is None:
        jax.distributed.initialize()  # SLURM, Open MPI, TPU pods: found from the environment
        return
    host, port = args.coordinator.rsplit(":", 1)
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        # the coordinator listens on the address given, not on every interface
        coordinator_bind_address=f"{host}:{port}" if host in ("127.0.0.1", "localhost") else None,
    )


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Dense(64)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def make_data(size: int = 512) -> dict[str, np.ndarray]:
    """A synthetic data set, the same on every process (a fixed seed)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(size, 16)).astype(np.float32)
    label = (image[:, :10].argmax(axis=1) + (image[:, 10] > 1)) % 10
    return {"image": image, "label": label}


def trainer(mesh: jax.sharding.Mesh | None, checkpoint_dir: str | None) -> Pipeline:
    """The training pipeline; without a mesh, the same training on one device."""
    pipe = Pipeline(loss).model(MLP(), input="image").optimize(optax.adam(1e-3))
    if mesh is not None:
        pipe = pipe.data_parallel(mesh, axis="data")
    if checkpoint_dir is not None:
        pipe = pipe.checkpoint(checkpoint_dir, every=16, keep=2)
    return pipe.jit()


def main(argv: Sequence[str] | None = None) -> TrainState:
    args = parse_args(argv)
    start_runtime(args)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # every device of every process
    data = make_data()
    pipe = trainer(mesh, os.path.abspath(args.checkpoint_dir))
    state = pipe.init(jax.random.key(0), data)
    state = pipe.fit(state, data, epochs=args.epochs, batch_size=args.batch_size, progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(
            f"{jax.process_count()} processes x {jax.local_device_count()} devices: step {int(state.step)}, "
            f"checkpoints in {args.checkpoint_dir}"
        )
    return state


if __name__ == "__main__":
    main()
    jax.distributed.shutdown()
