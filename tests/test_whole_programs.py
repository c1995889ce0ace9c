"""``fit``'s reliability findings across a real process boundary: scripts run as a user runs them.

Each test runs one case of ``whole_program_train.py`` in its own Python process (real signals, real exit
codes, the real ``sys.excepthook``) and checks what the user would see: the exit status, what was printed, and
what is on disk. ``test_fit_parts.py`` and ``test_plugin_isolation.py`` hold the in-process versions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import whole_program_train as script

from jaxpipe import Pipeline

SCRIPT = Path(__file__).with_name("whole_program_train.py")


def run(case: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Runs ``case`` in a fresh process (checkpoints under tmp_path/ck); returns the process and that folder."""
    directory = tmp_path / "ck"
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), case, str(directory)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done, directory


def result_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("result: "))
    return json.loads(line.removeprefix("result: "))


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_ctrl_c_in_a_script_exits_with_keyboard_interrupt_after_saving_the_step(tmp_path: Path) -> None:
    done, directory = run("ctrl_c", tmp_path)
    # Python ends an uncaught KeyboardInterrupt by SIGINT (-2 here; 130 through a shell), or exits 1
    assert done.returncode in (-2, 130, 1), (done.returncode, done.stderr[-3000:])
    assert "KeyboardInterrupt: fit was interrupted at step 3" in done.stderr, done.stderr[-3000:]
    assert "final accuracy" not in done.stdout  # the script did not go on as if training had finished
    assert saved_steps(directory) == [3]
    assert not [p for p in directory.iterdir() if "tmp" in p.name]
    plain = Pipeline(script.linear_loss).optimize(optax.sgd(0.05)).jit()  # its init starts afresh, not resumed
    saver = Pipeline(script.linear_loss).optimize(optax.sgd(0.05)).checkpoint(directory, every=100).jit()
    restored = saver.restore(script.start(plain))
    want = script.by_hand(plain, script.start(plain), 3)
    assert int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, restored.params, want.params)  # the same bits


def test_a_raising_end_hook_in_a_script_is_the_error_and_the_final_checkpoint_is_there(tmp_path: Path) -> None:
    done, directory = run("end_hook", tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "RuntimeError: my end hook broke", done.stderr[-3000:]  # the user's error, as raised
    assert "final accuracy" not in done.stdout
    assert saved_steps(directory)[-1] == 15  # the final save ran although the user's hook raised
    assert not list(directory.glob("*.orbax-checkpoint-tmp*"))


def test_a_list_of_examples_in_a_script_trains_len_over_batch_size_steps_per_epoch(tmp_path: Path) -> None:
    got = result_of(run("examples", tmp_path)[0])
    assert got["step"] == 2 * (70 // 16)
    assert got["epochs"] == [1] * 4 + [2] * 4


def test_host_mode_nan_in_a_script_warns_the_step_it_returns_and_keeps_no_row_after(tmp_path: Path) -> None:
    done, _ = run("host_nan", tmp_path)
    got = result_of(done)
    warning = re.search(r"RuntimeWarning: `fit` stopped at step (\d+) .*\(step (\d+):", done.stderr)
    assert warning is not None, done.stderr[-3000:]
    stopped, kept = int(warning.group(1)), int(warning.group(2))
    assert kept == got["step"] < stopped
    assert got["last_row"] <= kept and got["finite"]


def test_a_nan_in_one_element_of_a_vector_metric_stops_a_script(tmp_path: Path) -> None:
    done, _ = run("vector_nan", tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"NonFiniteError: .*\n`fit` stopped at step \d+ .*non-finite per_class=nan", done.stderr)
    assert "final accuracy" not in done.stdout
