"""Where a call's batches come from: one data source per mode, one rule for stacking.

* :class:`DeviceArrays`: a dict of arrays put on the device(s) once; each call
  gathers its batches there, in the epoch's order (``order`` is an input).
* :class:`Streamed`: host batches (a larger dict of arrays gathered on the
  host in the same order, or an iterable in its own order) placed for each
  call in a background thread one call ahead.

Whatever the source, :func:`call_input` alone decides the shape a call gets:
stacked on a leading axis of steps when the call runs several (``.scan(k)``,
or ``fit``'s own many-step program), else exactly the one batch a hand-written
loop would pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe._core.run import FitRun
from jaxpipe._training import data as host_data
from jaxpipe._training import program as compiled
from jaxpipe._training.callbacks import Callbacks


@dataclasses.dataclass
class Call:
    """One call's input: its steps, the program's source arguments, and an iterator's state after them."""

    n: int
    inputs: tuple[Any, ...]
    data_state: Any = None


def call_input(batches: Any, stacked: bool) -> Any:
    """A call's batches as the step takes them: stacked on a new leading axis, or the one batch.

    ``batches`` is a list of batches (from an iterable) or already stacked
    arrays (gathered from a dict of arrays).
    """
    if isinstance(batches, list):
        if stacked:
            stack = jnp.stack if any(isinstance(x, jax.Array) for x in jax.tree.leaves(batches[0])) else np.stack
            return jax.tree.map(lambda *xs: stack(xs), *batches)
        assert len(batches) == 1, "a call that takes one batch runs one step"
        return batches[0]
    if stacked:
        return batches
    assert all(np.shape(x)[0] == 1 for x in jax.tree.leaves(batches)), "a call that takes one batch runs one step"
    return jax.tree.map(lambda x: x[0], batches)


def pad(stacked: Any, rows: int) -> Any:
    """Stacked batches with zero batches appended up to ``rows`` (never run): one program for every call."""

    def pad_leaf(x: Any) -> Any:
        if x.shape[0] >= rows:
            return x
        lib = jnp if isinstance(x, jax.Array) else np
        return lib.concatenate([x, lib.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])

    return jax.tree.map(pad_leaf, stacked)


class DeviceArrays:
    """A dict of arrays on the device(s), placed once; under ``.data_parallel`` split along the batch axis."""

    mode = "device"

    def __init__(self, run: FitRun, data: Mapping[str, Any], data_key: jax.Array, callbacks: Callbacks) -> None:
        assert run.batch_size is not None and run.steps_per_epoch is not None
        self.run, self.callbacks = run, callbacks
        host = {k: np.asarray(v) for k, v in data.items()}
        self.size = next(iter(host.values())).shape[0]
        pad_rows = -self.size % callbacks.batch_shards()  # rows the permutation never picks: equal shares
        if pad_rows:
            host = {k: np.concatenate([v, np.zeros((pad_rows, *v.shape[1:]), v.dtype)]) for k, v in host.items()}
        placed = callbacks.hook.jaxpipe_place_data(run=run, data=host)
        self.data = jax.device_put(host) if placed is None else placed
        self.data_key = compiled.host_key(data_key)  # kept: the state's own is donated with each call

    def check_placement(self, stacked: bool) -> None:
        """Asks the placing hooks about one batch, as for host batches: they say when the devices cannot split it."""
        if self.callbacks.hook.jaxpipe_place_batch.get_hookimpls():
            size = self.run.batch_size
            sample = {k: np.asarray(v[:size])[None] if stacked else v[:size] for k, v in self.data.items()}
            self.callbacks.hook.jaxpipe_place_batch(run=self.run, batch=sample, whole=True)

    def calls(self, count: Callable[[int], int]) -> Iterator[Call]:
        run = self.run
        assert run.steps_per_epoch is not None and run.total_steps is not None
        orders: dict[int, jax.Array] = {}
        while run.step < run.total_steps:
            epoch = run.step // run.steps_per_epoch
            if epoch not in orders:
                orders = {epoch: compiled.epoch_order_on_device(self.data_key, epoch, self.size)}
            yield Call(count(run.step), (self.data, orders[epoch]))

    def close(self) -> None:
        pass


class Streamed:
    """Host batches, each call's placed one call ahead by a background thread."""

    def __init__(self, mode: str, groups: Iterator[Any], place: Callable[[Any], Call]) -> None:
        self.mode = mode
        self.prefetcher = host_data.Prefetcher(groups, place)

    def calls(self, count: Callable[[int], int]) -> Iterator[Call]:
        del count  # the groups were sized by the schedule as they were read
        return iter(self.prefetcher)

    def close(self) -> None:
        self.prefetcher.close()
