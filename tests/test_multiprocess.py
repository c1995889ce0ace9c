"""The documented multi-process script, run as 2 processes x 4 CPU devices on 127.0.0.1 with gloo collectives.

It must train to the same parameters as one device, and its Orbax checkpoint
must restore in a single process.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 100

sys.path.insert(0, str(ROOT / "examples"))
import multiprocess_train as example  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both processes of one training run: (work directory, each process's output)."""
    work = tmp_path_factory.mktemp("multiprocess")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 4 devices each, not the tests' 8
    env["PYTHONUNBUFFERED"] = "1"
    options = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--cpu-devices", "4"]
    options += ["--checkpoint-dir", str(work / "checkpoints")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(work / "params.npz"), *options, "--process-id", str(i)],
            env=env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(
            f"the 2-process run did not finish in {TIMEOUT_S} s:\n" + "\n".join(p.communicate()[0] for p in procs)
        )
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed:\n{output[-4000:]}"
    return work, outputs


@pytest.fixture(scope="module")
def one_device():
    """The same training on one device of this process: the reference."""
    data = example.make_data()
    pipe = example.trainer(mesh=None, checkpoint_dir=None)
    return pipe.fit(pipe.init(jax.random.key(0), data), data, epochs=2, batch_size=32, progress=False)


def saved_params(work):
    with np.load(work / "params.npz") as saved:
        return dict(saved)


def assert_params_equal(params, saved):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert sorted(saved) == sorted(jax.tree_util.keystr(path) for path, _ in leaves)
    for path, leaf in leaves:
        np.testing.assert_allclose(np.asarray(leaf), saved[jax.tree_util.keystr(path)], rtol=2e-5, atol=2e-6)


def test_two_processes_train_to_the_same_params_as_one_device(run, one_device):
    work, outputs = run
    assert "2 processes x 4 devices: step 32" in outputs[0]
    assert_params_equal(one_device.params, saved_params(work))


def test_their_checkpoint_restores_in_one_process(run):
    work, _ = run
    data = example.make_data()
    pipe = example.trainer(mesh=None, checkpoint_dir=str(work / "checkpoints"))
    state = pipe.init(jax.random.key(1), data)  # another seed: the numbers below come from the checkpoint
    assert int(state.step) == 32
    assert_params_equal(state.params, saved_params(work))
