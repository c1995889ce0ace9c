"""`jaxpipe demo`, run twice as a user would: it trains, checkpoints, plots, times, then resumes."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest


def run_demo(out):
    command = [sys.executable, "-m", "jaxpipe.cli", "demo", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
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


def test_timing_table_compares_with_hand_written_jax(runs):
    _, (stdout, _), _ = runs
    assert re.search(r"jaxpipe step  trainer\(state, batch\)\s+[\d.]+ [mµ]s\s+[\d.]+x the hand-written step", stdout)
    assert re.search(r"hand-written  jax.jit\(train_step\)\s+[\d.]+ [mµ]s", stdout)
    assert re.search(r"jaxpipe .scan\(\d+\), per step\s+[\d.]+ [mµ]s\s+[\d.]+x faster than one call per step", stdout)


def test_second_run_resumes_from_the_checkpoints(runs):
    out, (first, _), (second, second_err) = runs
    assert "resuming from step 220" in second
    assert "resumed at step 220 of 220: training is already complete" in second
    assert "epoch 1: eval_accuracy" not in second + second_err  # nothing trained again
    assert accuracy(second) == accuracy(first)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 220 + 20  # the curve keeps the first run's steps and epochs


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
