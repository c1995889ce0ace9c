"""Reading one step folder with Orbax, and the state layouts older versions of jaxpipe saved."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from jaxpipe_orbax._layout import abstract


def read(directory: str, step: int, items: dict[str, Any]) -> Any:
    """Orbax's restore of one step folder; reads nothing else (a manager would list every step)."""
    import orbax.checkpoint as ocp

    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        return reader.restore(os.path.join(directory, str(step)), args=ocp.args.Composite(**items))
    finally:
        reader.close()


def read_state(directory: str, step: int, items: dict[str, Any], state: Any) -> Any:
    """:func:`read`; a state with an empty ``extra`` also restores a checkpoint saved before ``TrainState.extra``."""
    import orbax.checkpoint as ocp

    try:
        return read(directory, step, items)
    except Exception as err:
        if state.extra:
            raise
        older = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "extra"}
        try:
            restored = read(
                directory, step, {**items, "state": ocp.args.StandardRestore(jax.tree.map(abstract, older))}
            )
        except Exception:
            raise err from None  # not the older layout either: the first error says what is wrong
        return {**restored, "state": state.replace(**restored["state"])}
