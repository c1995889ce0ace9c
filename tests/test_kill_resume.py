"""SIGKILL a real training process at random points, restart it until it finishes, compare with no kills.

The kill points come from a fixed seed (printed; override with JAXPIPE_KILL_SEED) so a failure can be
reproduced: a kill comes either at a random time during start-up (restore, compilation) or a random number of
steps into training plus a random delay, so it lands during steps, blocking saves and asynchronous writes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import kill_resume_train
import numpy as np

SCRIPT = Path(__file__).with_name("kill_resume_train.py")
KILLS = 6
SEED = int(os.environ.get("JAXPIPE_KILL_SEED", "20260"))
RESUMED = re.compile(r"jaxpipe: resuming from step (\d+) of ")
STEP = re.compile(r"^step (\d+)$", re.MULTILINE)


def newest_complete_step(directory: Path) -> int | None:
    """What Orbax lists: step directories that were renamed into place (unfinished ones carry a tmp suffix)."""
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps, default=None)


def test_sigkill_at_random_points_then_resume_gives_bit_identical_parameters(tmp_path):
    print(f"kill seed: {SEED} (rerun with JAXPIPE_KILL_SEED={SEED})")
    rng = random.Random(SEED)
    directory, out = tmp_path / "ckpt", tmp_path / "final.npz"
    home, tmp, cwd = (tmp_path / name for name in ("home", "tmp", "cwd"))
    for folder in (home, tmp, cwd):
        folder.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "PYTHONDONTWRITEBYTECODE": "1",
        # restarts reuse the first run's compiled programs (the cache is JAX's, kept apart from the checkpoints)
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    command = [sys.executable, str(SCRIPT), str(directory), str(out)]

    kills, runs, log = 0, 0, []
    while True:
        runs += 1
        assert runs <= KILLS + 5, "the run made no progress across restarts"
        expected = newest_complete_step(directory)
        started = time.perf_counter()
        with open(tmp_path / "stderr.txt", "w") as errors:  # Orbax logs plenty; kept for a failure message
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", (tmp_path / "stderr.txt").read_text()[-3000:]
        lines = []
        if kills < KILLS:
            if rng.random() < 0.3:  # during start-up: restore, compilation
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # a few steps in: during a step, the blocking part of a save, or its async write
                target, seen = rng.randint(1, 12), 0
                for line in process.stdout:
                    lines.append(line)
                    seen += line.startswith("step ")
                    if seen >= target:
                        break
                time.sleep(rng.uniform(0.0, 0.12))
            process.send_signal(signal.SIGKILL)
        output = "".join(lines) + process.communicate(timeout=120)[0]
        said = [int(m.group(1)) for m in RESUMED.finditer(output)]
        steps = [int(m.group(1)) for m in STEP.finditer(output)]
        log.append(
            f"run {runs} ({time.perf_counter() - started:.1f} s): newest complete step {expected}, "
            f"resumed from {said}, trained steps {steps[:1]}..{steps[-1:]}"
        )
        if said or (steps and expected is not None):  # restored from the newest complete checkpoint, once
            assert said == [expected], log
        if steps:  # and went on from there
            assert steps[0] == (expected or 0) + 1, log
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
        kills += 1

    print("\n".join(log))
    assert kills == KILLS, f"only {kills} kills landed before training finished; lengthen the run"
    with np.load(out) as saved:
        killed = dict(saved)
    uninterrupted = kill_resume_train.leaves(kill_resume_train.train(None))
    assert killed.keys() == uninterrupted.keys()
    for path, value in uninterrupted.items():
        assert killed[path].dtype == value.dtype
        np.testing.assert_array_equal(killed[path], value, err_msg=path)
    assert int(killed[".step"]) == kill_resume_train.EPOCHS * 10
    # nothing written outside the checkpoint directory; no step was found damaged
    assert [p.name for p in (home, tmp, cwd) if any(p.iterdir())] == []
    assert not [p.name for p in directory.iterdir() if ".damaged" in p.name]
