"""Grain data for ``fit``: a ``MapDataset``, ``IterDataset`` or ``DataLoader`` (or their iterators) as batches.

Grain's iterators save their position (``get_state()`` / ``set_state()``), so
``fit`` resumes one where a checkpoint left it instead of re-reading and
dropping the batches already trained on (see ``run.data_state``). Here Grain
objects are only recognised and checked; grain is imported only when the
object's type comes from it.

One pass over what ``fit`` is given is one epoch: ``fit`` starts a new
iterator each epoch. A ``MapDataset`` says how many batches a pass has (its
``len``); an ``IterDataset``, a ``DataLoader`` or an iterator does not, and
``fit`` trains one pass over it, to its end.
"""

from __future__ import annotations

from typing import Any

from jaxpipe.errors import PipelineError

_ENDLESS = 2**40  # batches: more than any pass reads; Grain's endless repeat has sys.maxsize elements


def is_grain(data: Any) -> bool:
    """Whether ``data``'s type comes from the grain package (checked without importing grain)."""
    return type(data).__module__.partition(".")[0] == "grain"


def as_batches(data: Any) -> Any:
    """``data`` as ``fit`` reads it: an iterable of batches whose iterator can save its position.

    Anything not from Grain is returned unchanged. A ``MapDataset`` repeated
    without end (``.repeat()`` makes its ``len`` ``sys.maxsize``, divided by
    any later batching) becomes its ``IterDataset``, so ``fit`` does not plan
    that many steps per epoch but trains until stopped.
    """
    if not is_grain(data):
        return data
    import grain

    if isinstance(data, grain.MapDataset):
        return data.to_iter_dataset() if len(data) >= _ENDLESS else data
    if isinstance(data, (grain.IterDataset, grain.DataLoader, grain.DatasetIterator, grain.DataLoaderIterator)):
        return data
    raise PipelineError(
        f"`fit` reads Grain data as a `grain.MapDataset`, `grain.IterDataset` or `grain.DataLoader` (or their "
        f"iterators) of batches, got {type(data).__module__}.{type(data).__qualname__}.\n"
        f"Give e.g. grain.MapDataset.source(records).shuffle(seed=0).map(to_dict).batch(128, drop_remainder=True)."
    )
