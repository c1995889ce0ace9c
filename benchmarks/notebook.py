"""The notebook extension's costs and savings, driven through a real IPython shell.

Run: .venv/bin/python benchmarks/notebook.py [--quick]

1. ``%load_ext jaxpipe`` after ``import jax`` and IPython are loaded, in fresh
   subprocesses (median; goal < 0.2 s).
2. Compilations when an unchanged ``%%jaxpipe`` cell is re-run, and when the
   cell above redefines its function with the same code (goal: zero), counted
   with ``jax.monitoring`` events.
3. ``%jit_timing``'s steady state against a hand-written ``block_until_ready``
   loop on the same call, in paired rounds (goal: within 5%).
4. The persistent compilation cache (``%jaxpipe_cache on``): the first call of
   a pipeline whose compile takes over 0.5 s, in a fresh process, with and
   without the cache (goal: at least 5x faster with it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
from _timing import format_seconds, paired_ratio
from IPython.core.interactiveshell import InteractiveShell

from jaxpipe._tools.compile_cache import CompileEvents

LOAD_EXT = """
import gc, sys, time, jax
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
if sys.argv[1] == "core-loaded":
    import jaxpipe
collecting = []  # the garbage collector's pauses: a full collection of jax's heap may fall in the window
gc.callbacks.append(lambda phase, info: collecting.append((phase, time.perf_counter())))
start = time.perf_counter()
shell.run_line_magic("load_ext", "jaxpipe")
total = time.perf_counter() - start
paused = sum(t for phase, t in collecting if phase == "stop") - sum(t for phase, t in collecting if phase == "start")
assert "jaxpipe.ipython.widgets" not in sys.modules  # the widgets load when first shown
print(total, paused)
"""

FIRST_CALL = """
import sys, time, jax, jax.numpy as jnp
from IPython.core.interactiveshell import InteractiveShell
from jaxpipe._tools.compile_cache import COMPILE_EVENT

compile_seconds = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compile_seconds.append(seconds) if event == COMPILE_EVENT else None)
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "jaxpipe")
if sys.argv[1] != "-":
    shell.run_line_magic("jaxpipe_cache", "on " + sys.argv[1])
shell.run_cell('''
import jax, jax.numpy as jnp
def deep(w, x):  # 16 layers, unrolled: a program that takes XLA a while to compile
    for i in range(16):
        x = jnp.tanh(x @ w + jnp.sin(x) * i)
    return jnp.sum(x ** 2)
w, xs = jnp.ones((16, 16)), jnp.ones((8, 16))
jax.block_until_ready((w, xs))
''')
shell.run_cell("%%jaxpipe per_example\\ndeep | grad | vmap(in_axes=(None, 0)) | jit")
compile_seconds.clear()
start = time.perf_counter()
result = shell.run_cell("jax.block_until_ready(per_example(w, xs))")
assert result.success, result.error_in_exec
print(time.perf_counter() - start, sum(compile_seconds))
"""


def fresh_python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "jaxpipe-bench-pycache")  # as installed: .pyc
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def load_ext_time(runs: int) -> float:
    fresh_python(LOAD_EXT, "-")  # writes the .pyc files

    def measure(mode: str) -> tuple[list[float], list[float]]:
        pairs = [tuple(map(float, fresh_python(LOAD_EXT, mode).split())) for _ in range(runs)]
        return [total for total, _ in pairs], [total - paused for total, paused in pairs]

    times, without_gc = measure("-")
    own, own_without_gc = measure("core-loaded")
    median = statistics.median(times)
    print(
        f"%load_ext jaxpipe after import jax: median {format_seconds(median)} over {runs} fresh processes "
        f"(min {format_seconds(min(times))}, max {format_seconds(max(times))}; goal < 0.2 s: "
        f"{'met' if median < 0.2 else 'MISSED'}); without garbage-collector pauses "
        f"{format_seconds(statistics.median(without_gc))}. The extension itself, after `import jaxpipe`: "
        f"{format_seconds(statistics.median(own))}, without GC pauses "
        f"{format_seconds(statistics.median(own_without_gc))}"
    )
    return median


def rerun_compiles(shell: InteractiveShell, reruns: int) -> tuple[int, int]:
    define = "def loss(w, x):\n    return jnp.sum(jnp.tanh(x @ w) ** 2)"
    spec = "%%jaxpipe per_example\nloss | grad | vmap(in_axes=(None, 0)) | jit"
    call = "jax.block_until_ready(per_example(w, xs))"
    shell.run_cell("import jax, jax.numpy as jnp\nw, xs = jnp.ones((64, 64)), jnp.ones((32, 64))")

    def cells(*sources: str) -> tuple[CompileEvents, float]:
        start = time.perf_counter()
        with CompileEvents() as events, contextlib.redirect_stdout(io.StringIO()):  # the magic's own output
            for source in sources:
                result = shell.run_cell(source, silent=True)
                assert result.success, result.error_in_exec
        return events, time.perf_counter() - start

    first, first_s = cells(define, spec, call)
    print(
        f"first run of the cells (define, %%jaxpipe, call): {first.traces} traces, {first.compiles} XLA compiles, "
        f"{format_seconds(first_s)}"
    )
    totals = []
    for label, sources in (
        ("unchanged %%jaxpipe cell re-run", (spec, call)),
        ("function redefined, same code, cells re-run", (define, spec, call)),
    ):
        runs = [cells(*sources) for _ in range(reruns)]
        compiles = sum(events.compiles for events, _ in runs)
        traces = sum(events.traces for events, _ in runs)
        seconds = statistics.median(s for _, s in runs)
        print(
            f"{label}: {traces} traces, {compiles} XLA compiles over {reruns} re-runs, median "
            f"{format_seconds(seconds)} (goal: 0 compiles: {'met' if compiles == 0 else 'MISSED'})"
        )
        totals.append(compiles)
    changed, _ = cells(define.replace("** 2", "** 3"), spec, call)
    print(
        f"function redefined with different code: {changed.compiles} XLA compile(s) (must recompile: "
        f"{'yes' if changed.compiles else 'NO - WRONG'})"
    )
    return totals[0], totals[1]


def jit_timing_accuracy(shell: InteractiveShell, label: str, setup: str, number: int, rounds: int) -> float:
    """``%jit_timing -n number -r 1 f(a, b)`` against a hand loop on the same call, in alternating order."""
    shell.run_cell(setup + "\njax.block_until_ready(f(a, b))", silent=True)
    f, a, b = shell.user_ns["f"], shell.user_ns["a"], shell.user_ns["b"]

    def by_hand() -> float:
        start = time.perf_counter()
        for _ in range(number):
            f(a, b).block_until_ready()
        return (time.perf_counter() - start) / number

    def by_magic() -> float:
        with contextlib.redirect_stdout(io.StringIO()):  # the magic's table
            return float(shell.run_line_magic("jit_timing", f"-o -n {number} -r 1 f(a, b)").median)

    magic, hand = [], []
    for index in range(rounds):
        if index % 2 == 0:
            magic.append(by_magic())
            hand.append(by_hand())
        else:
            hand.append(by_hand())
            magic.append(by_magic())
    ratio = paired_ratio(magic, hand)
    print(
        f"%jit_timing steady state on {label}: {format_seconds(statistics.median(magic))} vs hand-timed loop "
        f"{format_seconds(statistics.median(hand))} per call ({rounds} paired rounds of {number} calls): "
        f"ratio {ratio:.3f} (goal within 5%: {'met' if abs(ratio - 1) <= 0.05 else 'MISSED'})"
    )
    return ratio


MATMUL = "f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b)\na = jnp.ones((192, 192)); b = jnp.ones((192, 192))"
TINY = "f = jax.jit(lambda a, b: a * b + 1)\na = jnp.ones(3); b = jnp.ones(3)"


def persistent_cache() -> float:
    with tempfile.TemporaryDirectory() as directory:
        off, compile_off = map(float, fresh_python(FIRST_CALL, "-").split())
        fill, _ = map(float, fresh_python(FIRST_CALL, directory).split())
        on, compile_on = map(float, fresh_python(FIRST_CALL, directory).split())
    ratio = off / on
    print(
        f"first call in a fresh process: {format_seconds(off)} without the cache (XLA compile "
        f"{format_seconds(compile_off)}), {format_seconds(fill)} filling it, {format_seconds(on)} with it "
        f"(load {format_seconds(compile_on)}): {ratio:.1f}x faster (goal >= 5x: {'met' if ratio >= 5 else 'MISSED'}; "
        f"compile over 0.5 s: {'yes' if compile_off > 0.5 else 'NO'})"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke test")
    quick = parser.parse_args().quick
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    load_ext_time(3 if quick else 7)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jaxpipe")
    rerun_compiles(shell, 2 if quick else 5)
    jit_timing_accuracy(shell, "a 192x192 matmul chain", MATMUL, 50, 11 if quick else 41)
    jit_timing_accuracy(shell, "a tiny dispatch-bound call", TINY, 2000, 11 if quick else 41)
    persistent_cache()


if __name__ == "__main__":
    main()
