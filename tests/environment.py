"""What a test needs from the machine, and what happens when it is missing.

On a developer's machine a missing browser or mount permission skips the one test that needs it, saying why.
Under CI (``CI`` set, as ``.ci/run`` runs) it fails instead: the CI machine is set up by ``scripts/test`` to
have them, so a skip there would hide a test that no longer runs.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(why: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: this machine is meant to have it)")
    pytest.skip(why)
