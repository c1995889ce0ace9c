"""jaxpipe's Flax plugin: the ``.model(module, input=...)`` stage.

Registered only through the ``jaxpipe`` entry-point group. Flax itself is
imported when a ``.model()`` stage is first added, not when jaxpipe loads.
"""

from __future__ import annotations

import jaxpipe


@jaxpipe.hookimpl
def jaxpipe_register_stages() -> list[jaxpipe.StageKind]:
    from jaxpipe_flax._stage import MODEL

    return [MODEL]
