"""`jaxpipe demo`, run twice as a user would: it trains, checkpoints, plots, times, then resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def demo_env():
    """The environment with the demo package importable: installed (`pip install -e '.[demo]'`) or from demo/."""
    env = dict(os.environ)
    if importlib.util.find_spec("jaxpipe_demo") is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "demo"), env.get("PYTHONPATH")) if p)
    return env


def run_demo(out):
    command = [sys.executable, "-m", "jaxpipe.cli", "demo", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=demo_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


def accuracy(stdout):
    match = re.search(r"test accuracy: ([\d.]+)% on 360 held-out digits", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "jaxpipe-demo"
    first = run_demo(out)
    second = run_demo(out)
    return out, first, second


def test_first_run_trains_to_95_percent_and_writes_its_files(runs):
    out, (stdout, stderr), _ = runs
    assert "jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))" in stdout  # the per-example-gradients part
    assert "equal to hand-written: True, same lowered program: True" in stdout
    assert "equivalent JAX:" in stdout and "def train_step(state, batch):" in stdout
    assert "jax.value_and_grad(model_loss, has_aux=True)" in stdout and "jax.jit(train_step)" in stdout
    assert "220/220" in stderr  # the progress bar
    assert "epoch 20: eval_accuracy=" in stdout + stderr
    assert accuracy(stdout) >= 95.0
    assert "total: 85,002 parameters in 6 arrays" in stdout
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [100, 200, 220]
    assert "resum" not in stdout


SECONDS = r"([\d.]+) ([mµn]?s)"
COMPARED = r"(?:([\d.]+)x (slower|faster) than|as fast as)"


def seconds(number, unit):
    return float(number) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}[unit]


def test_timing_table_compares_with_hand_written_jax_in_one_statistic(runs):
    _, (stdout, _), _ = runs
    assert "time per step: the median of 3 paired rounds; each ratio compares the times shown" in stdout
    ours = re.search(rf"jaxpipe step  trainer\(state, batch\)\s+{SECONDS}\s+{COMPARED} the hand-written step", stdout)
    hand = re.search(rf"hand-written  jax.jit\(train_step\)\s+{SECONDS}", stdout)
    scan = re.search(rf"jaxpipe .scan\(\d+\), per step\s+{SECONDS}\s+{COMPARED} one call per step", stdout)
    loop = re.search(rf"jaxpipe one call per step\s+{SECONDS}", stdout)
    assert ours and hand and scan and loop, stdout
    for row, baseline in ((ours, hand), (scan, loop)):  # the words agree with the times shown, in direction and size
        time, base = seconds(*row.group(1, 2)), seconds(*baseline.group(1, 2))
        if row.group(4) is None:
            assert time == pytest.approx(base, rel=0.02)
        else:
            assert row.group(4) == ("slower" if time > base else "faster")
            ratio = max(time, base) / min(time, base)
            assert float(row.group(3)) == pytest.approx(ratio, rel=0.02)  # times are shown to 3 digits


def test_second_run_resumes_from_the_checkpoints(runs):
    out, (first, _), (second, second_err) = runs
    assert "resuming from step 220" in second
    assert "resumed at step 220 of 220: training is already complete" in second
    assert "epoch 1: eval_accuracy" not in second + second_err  # nothing trained again
    assert accuracy(second) == accuracy(first)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 220 + 20  # the curve keeps the first run's steps and epochs


def test_metrics_jsonl_counts_steps_and_epochs_from_1_as_ints(runs):
    out, _, _ = runs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if not row.get("eval")]
    evals = [row for row in rows if row.get("eval")]
    assert all(type(row["step"]) is int and type(row["epoch"]) is int for row in rows)
    assert [row["step"] for row in train] == list(range(1, 221))
    assert [row["epoch"] for row in train[:12]] == [1] * 11 + [2]  # 11 steps per epoch
    assert train[-1]["epoch"] == 20
    assert [(row["epoch"], row["step"]) for row in evals] == [(e, 11 * e) for e in range(1, 21)]


def test_ctrl_c_during_training_stops_and_says_how_to_resume(tmp_path):
    command = [sys.executable, "-u", "-m", "jaxpipe.cli", "demo", "--quick", "--out", str(tmp_path / "demo")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=demo_env())
    seen = []
    for line in proc.stdout:  # Ctrl-C once the first epoch's eval line shows training is under way
        seen.append(line)
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    match = re.search(r"interrupted at step (\d+); run again to resume", out)
    assert match, out[-3000:]
    assert 11 <= int(match.group(1)) < 220
    assert "test accuracy" not in out and "timing:" not in out  # no results of an unfinished run
    saved = sorted(int(p.name) for p in (tmp_path / "demo" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == int(match.group(1))  # the stopped state is saved: the next run resumes there


@pytest.mark.parametrize("script", ["per_example_gradients.py", "prng_splitting.py"])
def test_seed_pattern_examples_run(script, capsys):
    path = Path(__file__).resolve().parent.parent / "examples" / script
    result = runpy.run_path(str(path), run_name="example")["main"]()
    out = capsys.readouterr().out
    if script == "per_example_gradients.py":
        assert "equivalent JAX: jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))" in out
        assert "per-example gradient shapes: {'b': (256, 10), 'w': (256, 64, 10)}" in out
        assert "equal to a Python loop over examples: True" in out
        assert "mean of per-example gradients equals the batch gradient: True" in out
        assert result["w"].shape == (256, 64, 10)
    else:
        assert result is True
        assert "init splits the key into (params, step, data): True" in out
        assert out.count("state.key == split(previous state.key)[0]: True") == 3
        assert "same key, same draw: True" in out and "split keys, different draws: True" in out
