"""``scripts/install-chromium`` (run by ``scripts/test``) on machines with and without apt-get, sudo and a network.

Each case runs the real script with PATH stripped to a folder of stand-ins (``id``, ``sudo``, ``apt-get``, the
venv's python) that record how they were called, so nothing is installed. The script must never fail: where no
browser can be had, ``tests/test_browser.py`` skips (checked last, through pytest itself) and everything else runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-chromium"
BASH = shutil.which("bash") or "/bin/bash"


def stand_in(folder: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``folder`` that logs its arguments to calls.log, then runs ``body``."""
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls.log"\n{body}\n')
    path.chmod(0o755)


def run_script(tmp_path: Path, uid: int, tools: dict[str, str], download_ok: bool) -> tuple[int, str, list[str]]:
    """Runs the script on a PATH holding only ``tools`` and ``id`` (saying ``uid``); returns rc, stderr, calls."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stand_in(bin_, "id", f"echo {uid}")
    for name, body in tools.items():
        stand_in(bin_, name, body)
    stand_in(bin_, "python", "exit 0" if download_ok else "echo 'Host system is unreachable' >&2; exit 1")
    env = {"PATH": str(bin_), "PYTHON": str(bin_ / "python"), "HOME": str(tmp_path)}
    done = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)
    log = bin_ / "calls.log"
    calls = [line for line in log.read_text().splitlines() if not line.startswith("id")] if log.exists() else []
    return done.returncode, done.stderr, calls


APT = "exit 0"
SUDO = 'if [ "$1" = -n ]; then shift; fi\n[ "$1" = true ] && exit 0\nexec "$@"'
PLAYWRIGHT = "python -m playwright install chromium"
APT_CALLS = ["apt-get update -qq", "apt-get install -y -qq chromium"]


CASES = {  # name: (uid, stand-ins on PATH, whether Playwright's download works, the calls made, what it says)
    "chromium already there": (1000, {"chromium": "exit 0"}, False, [], ""),
    "root with apt-get": (0, {"apt-get": APT}, False, APT_CALLS, ""),
    "sudo with apt-get": (
        1000,
        {"apt-get": APT, "sudo": SUDO},
        False,
        ["sudo -n true", "sudo -n apt-get update -qq", "apt-get update -qq"]
        + ["sudo -n apt-get install -y -qq chromium", "apt-get install -y -qq chromium"],
        "",
    ),
    "apt-get but no sudo": (1000, {"apt-get": APT}, True, [PLAYWRIGHT], "apt-get needs root"),
    "sudo asks a password": (
        1000,
        {"apt-get": APT, "sudo": "exit 1"},
        True,
        ["sudo -n true", PLAYWRIGHT],
        "sudo is absent or asks for a password",
    ),
    "apt-get fails": (0, {"apt-get": "exit 100"}, True, ["apt-get update -qq", PLAYWRIGHT], "could not install"),
    "no apt-get": (1000, {}, True, [PLAYWRIGHT], "no apt-get"),
    "nothing works (no network)": (1000, {}, False, [PLAYWRIGHT], "tests/test_browser.py will skip"),
}


@pytest.mark.parametrize("case", CASES)
def test_install_chromium_uses_what_the_machine_has_and_never_fails(tmp_path: Path, case: str) -> None:
    uid, tools, download_ok, calls, says = CASES[case]
    rc, stderr, made = run_script(tmp_path, uid, tools, download_ok)
    assert rc == 0, stderr
    assert made == calls
    assert says in stderr
    assert ("will skip" in stderr) == (case == "nothing works (no network)")


def test_scripts_test_installs_the_browser_after_the_venv_and_ci_runs_scripts_test() -> None:
    text = (ROOT / "scripts" / "test").read_text()
    assert text.index("pip install") < text.index("scripts/install-chromium") < text.index("-m pytest")
    assert "set -euo pipefail" in text  # any failing check still fails the command
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_without_any_chromium_the_browser_test_skips_saying_why(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), PLAYWRIGHT_BROWSERS_PATH=str(empty))
    env.pop("JAXPIPE_CHROMIUM", None)
    env.pop("CI", None)  # a developer's machine: the test skips (under CI it fails, see tests/environment.py)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_browser.py", "-rs", "-p", "no:cacheprovider", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 skipped" in done.stdout and "no chromium to drive" in done.stdout, done.stdout[-3000:]
    assert "playwright install chromium" in done.stdout
