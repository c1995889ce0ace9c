"""jaxpipe's Optax plugin: the ``.optimize(tx)`` and ``.ema(decay)`` stages.

Registered only through the ``jaxpipe`` entry-point group. Optax itself is
imported when a training step is first built, not when jaxpipe loads.
"""

from __future__ import annotations

import jaxpipe


@jaxpipe.hookimpl
def jaxpipe_register_stages() -> list[jaxpipe.StageKind]:
    from jaxpipe_optax._ema import EMA
    from jaxpipe_optax._optimize import OPTIMIZE

    return [OPTIMIZE, EMA]
