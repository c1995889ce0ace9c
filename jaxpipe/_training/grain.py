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

A ``MapDataset``'s epoch ``e`` is Grain's own epoch ``e`` of it, as
``ds.repeat()`` reads it: its shuffles and random maps seeded with their seed
and the epoch, so each epoch has a new order, the same in every run (see
:class:`Epochs`).
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

    Anything not from Grain is returned unchanged. A finite ``MapDataset``
    becomes :class:`Epochs` (a new order each epoch). A ``MapDataset`` repeated
    without end (``.repeat()`` makes its ``len`` ``sys.maxsize``, divided by
    any later batching) becomes its ``IterDataset``, so ``fit`` does not plan
    that many steps per epoch but trains until stopped.
    """
    if not is_grain(data):
        return data
    import grain

    if isinstance(data, grain.MapDataset):
        return data.to_iter_dataset() if len(data) >= _ENDLESS else Epochs(data)
    if isinstance(data, (grain.IterDataset, grain.DataLoader, grain.DatasetIterator, grain.DataLoaderIterator)):
        return data
    raise PipelineError(
        f"`fit` reads Grain data as a `grain.MapDataset`, `grain.IterDataset` or `grain.DataLoader` (or their "
        f"iterators) of batches, got {type(data).__module__}.{type(data).__qualname__}.\n"
        f"Give e.g. grain.MapDataset.source(records).shuffle(seed=0).map(to_dict).batch(128, drop_remainder=True)."
    )


class Epochs:
    """A finite ``MapDataset`` read one Grain epoch per ``fit`` epoch.

    Epoch ``e`` (from 0) is ``dataset.repeat()[e * n:(e + 1) * n]`` with
    ``n = len(dataset)``: exactly the elements ``dataset.repeat(epochs)``
    gives for that epoch. Grain indexes past a dataset's end as later epochs,
    and its ``shuffle`` (and ``random_map``) use their seed plus the epoch
    there, so each epoch is a new permutation, derived from the seed alone: a
    run resumed mid-epoch builds the same epoch and sets its iterator's saved
    position (``{"next_index": i}``, counted within the epoch). Epoch 0 is the
    dataset itself; a dataset without random transformations gives the same
    batches every epoch.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Any:
        return iter(self.dataset)

    def for_epoch(self, epoch: int) -> Any:
        """The dataset of ``epoch`` (counted from 0)."""
        if epoch == 0:
            return self.dataset
        n = len(self.dataset)
        return self.dataset.repeat()[epoch * n : (epoch + 1) * n]
