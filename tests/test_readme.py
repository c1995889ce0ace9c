"""Every ```python block of README.md runs as written.

The convention, for everyone who writes README.md:

- Every block fenced with ```python is code a reader can paste. The blocks run in the order they appear, in one
  shared namespace (a later block may use what an earlier one defined, as in one notebook), with the current
  directory a fresh temporary one (so `.checkpoint("runs/x")` writes there). A block that needs names defined
  nowhere above must define them, or a small ```python block just before it must ("The data and model of the
  examples below: ..."). Keep them fast: small data and few epochs, where the README can honestly say so.
- Code that is not Python to run goes in ```bash, ``` (plain) or another fence; those are not run.
- A python block that cannot run here (it needs 8 devices, several hosts, a GPU) is skipped only when the line
  right above its fence is the visible marker

      <!-- readme-test: skip (needs 8 GPUs) -->

  with the reason in parentheses; the test reports each skipped block with its reason and line.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line of the fence, code, skip reason or None) for each ```python block, in order."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index
            index += 1
            body = []
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            marker = SKIP.search(lines[start - 1]) if start else None
            blocks.append((start + 1, "\n".join(body) + "\n", marker.group("reason") if marker else None))
        index += 1
    return blocks


def test_the_block_reader_follows_the_convention() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- readme-test: skip (needs 8 GPUs) -->\n```python\ny\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", None), (6, "y\n", "needs 8 GPUs")]


def test_every_python_block_of_the_readme_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    skipped = []
    for line, code, reason in blocks:
        if reason is not None:
            skipped.append(f"README.md:{line} ({reason})")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # third-party deprecations are not the README's
            # dont_inherit: a block runs as pasted, without this file's `from __future__ import annotations`
            exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
        if "print(jaxpipe.evaluate(trainer, state, test))" in code:  # the training example must train well
            import jaxpipe

            accuracy = jaxpipe.evaluate(namespace["trainer"], namespace["state"], namespace["test"])["accuracy"]
            assert accuracy >= 0.97, f"README.md:{line}: the training example reaches only {accuracy:.1%}"
    if skipped:
        warnings.warn("README blocks skipped: " + "; ".join(skipped), UserWarning, stacklevel=1)
