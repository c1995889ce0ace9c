"""examples/gpt_sharded.py: a tiny GPT on a (data, model) mesh, in one process and as 2 processes x 4 CPU devices.

Both must end with one device's loss (within 1e-5) and parameters.
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
EXAMPLE = ROOT / "examples" / "gpt_sharded.py"
TIMEOUT_S = 300

sys.path.insert(0, str(ROOT / "examples"))
import gpt_sharded as example  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_device():
    """The example's training on one device: (parameters, loss)."""
    args = example.parse_args(["--epochs", "1"])
    params = jax.device_get(example.train(example.trainer(None), example.make_data(), args).params)
    return params, example.final_loss(params, example.make_data())


def test_one_process_on_a_2x4_mesh_checks_itself_against_one_device(capsys):
    example.main(["--epochs", "1", "--check"])
    assert "the same loss as one device" in capsys.readouterr().out


def test_two_processes_of_four_devices_train_as_one_device(tmp_path, one_device):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 4 devices each, not the tests' 8
    env["PYTHONUNBUFFERED"] = "1"
    out = tmp_path / "params.npz"
    options = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--cpu-devices", "4", "--epochs", "1"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), *options, "--process-id", str(i), "--save", str(out)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(
            f"the 2-process run did not finish in {TIMEOUT_S} s:\n" + "\n".join(p.communicate()[0] for p in procs)
        )
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed:\n{output[-4000:]}"
    assert "2 process(es) x 4 devices, mesh {'data': 2, 'model': 4}" in outputs[0]
    params, loss = one_device
    with np.load(out) as saved:
        leaves = jax.tree_util.tree_leaves_with_path(params)
        assert sorted(saved) == sorted(jax.tree_util.keystr(path) for path, _ in leaves)
        for path, leaf in leaves:
            np.testing.assert_allclose(saved[jax.tree_util.keystr(path)], np.asarray(leaf), rtol=1e-5, atol=1e-5)
    got = float(outputs[0].split(", loss ")[1].split()[0])
    assert abs(got - loss) <= 1e-5
