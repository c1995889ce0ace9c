"""Sharded training: jaxpipe's ``.data_parallel(mesh)`` step against hand-written ``jax.jit`` with the same shardings.

Run: .venv/bin/python benchmarks/sharded.py [--quick]

On the CPU the script splits the host into 8 devices (as the tests do) and
times a 2 x 256 MLP step (Flax + Optax, batch 128); on a GPU it uses the
devices there and a 4 x 4096 MLP (batch 1024). In paired, interleaved rounds
with ``block_until_ready``, one process:

1. The data-parallel step on every device, batch already placed:
   ``pipe.build()`` and ``pipe(...)`` against ``jax.jit(step, in_shardings=...,
   out_shardings=...)`` (goal: ratio <= 1.02).
2. The same from a host (NumPy) batch, as ``fit`` feeds it, 10 steps per
   synchronisation: jaxpipe places each batch (``place_batch``, what ``fit``'s
   hook does) and calls the pipeline; the hand-written jit takes the NumPy
   batch through its ``in_shardings``.
3. One device: the sharded pipeline on a 1-device mesh against the plain
   ``Pipeline(...).jit()`` (on one GPU, the cost of keeping ``.data_parallel``
   in a script that also runs on one device).
4. Sharded parameters: ``param_specs="fsdp"`` on an (N,) mesh and
   ``("annotations", "fsdp")`` on a (2, N/2) (data, model) mesh (an MLP whose
   kernels carry Flax logical annotations) against the hand-written
   ``jax.jit(step, in_shardings=..., out_shardings=...)`` with the same
   ``NamedSharding``s: the step ratio, whether the compiled programs hold the
   same collectives, and parameter + optimizer bytes per device against the
   replicated state (goal: 1/N of the sharded kernels). ``--params-only``
   runs just this part.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import statistics
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # CPU only; before jax loads

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import format_seconds, paired_ratio, paired_rounds  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxpipe import Pipeline, TrainState, sharding_report  # noqa: E402
from jaxpipe._stages.data_parallel import place_batch  # noqa: E402
from jaxpipe._stages.mesh import auto_mesh  # noqa: E402

GOAL = 1.02
LOOP = 10  # steps per synchronisation in the NumPy-batch comparison


class MLP(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def hand_written_step(module: nn.Module, tx: optax.GradientTransformation):
    """The Flax + Optax step as written by hand (what ``.model(...).optimize(tx)`` explains itself as)."""

    def model_loss(params, batch):
        return loss(module.apply({"params": params}, batch["image"]), batch)

    def train_step(state: TrainState, batch):
        key, _ = jax.random.split(state.key)
        value, grads = jax.value_and_grad(model_loss)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, key=key), metrics

    return train_step


class AnnotatedMLP(nn.Module):
    """The MLP with logical axis names on its kernels, alternating (embed, mlp) and (mlp, embed)."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features: int, names: tuple[str, str]) -> nn.Dense:
            return nn.Dense(features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names))

        x = nn.relu(dense(self.width, ("embed", "mlp"))(x))
        for _ in range(self.depth - 1):
            x = nn.relu(dense(self.width, ("mlp", "embed"))(x))
        return nn.Dense(10)(x)


RULES = [("embed", None), ("mlp", "model")]


def op_counts(hlo: str) -> collections.Counter[str]:
    """How often each HLO operation occurs in a compiled program."""
    return collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", hlo))


def compare(
    title: str, candidates: dict, args: tuple, number: int, repeat: int, goal: float | None, steps_per_call: int = 1
) -> None:
    rounds = paired_rounds(candidates, args, number=number, repeat=repeat)
    rounds = {name: [t / steps_per_call for t in times] for name, times in rounds.items()}
    base_name = next(iter(candidates))
    print(f"{title}\n  {base_name:<40} {format_seconds(statistics.median(rounds[base_name]))} per step")
    for name in list(candidates)[1:]:
        ratio = paired_ratio(rounds[name], rounds[base_name])
        verdict = f"  (goal <= {goal:.2f}: {'met' if ratio <= goal else 'MISSED'})" if goal else ""
        print(f"  {name:<40} {format_seconds(statistics.median(rounds[name]))}  ratio {ratio:.3f}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test or one GPU")
    parser.add_argument("--params-only", action="store_true", help="only part 4, the sharded parameters")
    options = parser.parse_args()
    quick = options.quick
    gpu = jax.default_backend() == "gpu"
    width, depth, batch_size = (4096, 4, 1024) if gpu else (256, 2, 128)
    number, repeat = (20, 5) if quick else (200 if gpu else 50, 21)
    devices = jax.devices()
    print(
        f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(f"MLP {depth} x {width}, batch {batch_size}, Adam; {number} steps per round, {repeat} rounds\n")

    module, tx = MLP(width, depth), optax.adam(1e-3)
    rng = np.random.default_rng(0)
    host = {
        "image": rng.normal(size=(batch_size, 784)).astype(np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    if options.params_only:
        sharded_params(AnnotatedMLP(width, depth), tx, host, number, repeat)
        return
    trainer = Pipeline(loss).model(module, input="image").optimize(tx)

    mesh = jax.make_mesh((len(devices),), ("data",))
    pipe = trainer.data_parallel(mesh).jit()
    state = pipe.init(jax.random.key(0), host)  # placed: replicated over the mesh
    auto = auto_mesh(mesh)
    state_sharding = jax.tree.map(lambda _: NamedSharding(auto, P()), state)
    batch_sharding = {k: NamedSharding(auto, P("data")) for k in host}
    hand = jax.jit(
        hand_written_step(module, tx),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(auto, P())),
    )
    batch = jax.device_put(host, batch_sharding)

    ours, theirs = pipe(state, batch), hand(state, batch)  # the same numbers
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours[0].params, theirs[0].params)
    same_ops = op_counts(pipe.hlo(state, batch, optimized=True)) == op_counts(
        hand.lower(state, batch).compile().as_text()
    )
    print(f"compiled per-device programs have the same operations: {same_ops}\n")

    compare(
        f"1. data-parallel step on {len(devices)} devices, batch placed:",
        {"hand-written jax.jit(in/out_shardings)": hand, "pipe.build()(...)": pipe.build(), "pipe(...)": pipe},
        (state, batch),
        number,
        repeat,
        GOAL,
    )

    def train_loop(step: Any) -> Any:
        """``LOOP`` steps, each on a NumPy batch, synchronised once at the end (as ``fit`` runs them)."""

        def run(state: TrainState, host: dict) -> object:
            for _ in range(LOOP):
                state, metrics = step(state, host)
            return state, metrics

        return run

    def pipe_from_host(state: TrainState, host: dict) -> object:
        return pipe(state, place_batch(host, auto, "data", stacked=False, whole=True))

    compare(
        f"2. {LOOP} steps from a NumPy batch each, synchronised once (as fit runs them):",
        {
            "hand-written jax.jit(in/out_shardings)": train_loop(hand),
            "place_batch + pipe(...)": train_loop(pipe_from_host),
        },
        (state, host),
        max(1, number // LOOP),
        repeat,
        GOAL,
        steps_per_call=LOOP,
    )

    one = jax.make_mesh((1,), ("data",), devices=devices[:1])
    plain, sharded = trainer.jit(), trainer.data_parallel(one).jit()
    one_state = sharded.init(jax.random.key(0), host)
    one_batch = jax.device_put(host, devices[0])
    same = jax.tree.map(
        lambda a, b: bool(jnp.allclose(a, b, atol=1e-6)),
        plain(one_state, one_batch)[0],
        sharded(one_state, one_batch)[0],
    )
    compare(
        "3. one device: .data_parallel on a 1-device mesh against the plain pipeline:",
        {"Pipeline(...).jit()": plain, ".data_parallel(1-device mesh).jit()": sharded},
        (one_state, one_batch),
        number,
        repeat,
        None,
    )
    print(f"  same state after one step: {all(jax.tree.leaves(same))}\n")
    sharded_params(AnnotatedMLP(width, depth), tx, host, number, repeat)


def collective_counts(hlo: str) -> dict[str, int]:
    return {op: n for op, n in op_counts(hlo).items() if op.split("-start")[0] in COLLECTIVES}


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def sharded_params(module: nn.Module, tx: optax.GradientTransformation, host: dict, number: int, repeat: int) -> None:
    """Part 4: FSDP and (data, model) steps against jax.jit with the same NamedShardings; bytes per device."""
    devices = jax.devices()
    trainer = Pipeline(loss).model(module, input="image").optimize(tx)
    replicated_pipe = trainer.data_parallel(jax.make_mesh((len(devices),), ("data",))).jit()
    whole = sharding_report(replicated_pipe, replicated_pipe.init(jax.random.key(0), host), host)
    setups = {
        f"FSDP on ({len(devices)},)": trainer.data_parallel(
            jax.make_mesh((len(devices),), ("data",)), param_specs="fsdp"
        ),
        f"annotations + FSDP on (2, {len(devices) // 2})": trainer.data_parallel(
            jax.make_mesh((2, len(devices) // 2), ("data", "model")), param_specs=("annotations", "fsdp"), rules=RULES
        ),
    }
    for title, stage in setups.items():
        pipe = stage.jit()
        state = pipe.init(jax.random.key(0), host)
        mesh = jax.tree.leaves(state.params)[0].sharding.mesh
        shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = {k: NamedSharding(mesh, P("data")) for k in host}
        hand = jax.jit(
            hand_written_step(module, tx),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, NamedSharding(mesh, P())),
        )
        batch = jax.device_put(host, batch_sharding)
        ours, theirs = pipe(state, batch), hand(state, batch)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours[0].params, theirs[0].params
        )
        mine = collective_counts(pipe.hlo(state, batch, optimized=True))
        written = collective_counts(hand.lower(state, batch).compile().as_text())
        report = sharding_report(pipe, state, batch)
        compare(
            f"4. {title}, param_specs={stage.stages[-1].options['param_specs']!r}:",
            {"hand-written jax.jit(in/out_shardings)": hand, "pipe(...)": pipe},
            (state, batch),
            number,
            repeat,
            GOAL,
        )
        print(f"  collectives: jaxpipe {mine}, hand-written {written} (same: {mine == written})")
        print(
            f"  per device: params {report.param_bytes} B, opt_state {report.opt_state_bytes} B; replicated: "
            f"{whole.param_bytes} B, {whole.opt_state_bytes} B (1/{whole.param_bytes / report.param_bytes:.2f}, "
            f"1/{whole.opt_state_bytes / report.opt_state_bytes:.2f})\n"
        )


if __name__ == "__main__":
    main()
