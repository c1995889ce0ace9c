"""Where ``fit``'s batches come from: the data plan.

Three sources, one order. A dict of arrays that fits the memory budget is put
on the device(s) once and each call gathers its batches there (see
``_fit_program``). A larger dict of arrays is gathered on the host in the same
order, and an iterable of batches is read in its own order; both are stacked
per call and copied to the device by a background thread one call ahead
(double buffering), so the copy overlaps the previous call.

Epoch ``e``'s order is ``jax.random.permutation(fold_in(state.data_key, e))``
and the position in it is a function of the state's step, so a resumed run
sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextvars
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxpipe.errors import PipelineError


def check_arrays(data: Mapping[str, Any], what: str, argument: str = "data") -> int:
    """The number of examples of a dict of arrays, or a PipelineError saying what is wrong."""
    sizes: dict[str, int | None] = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in data.items()}
    size = next(iter(sizes.values()), None)
    if size is None or len(set(sizes.values())) != 1:
        raise PipelineError(
            f"`fit` needs {what} as a dict of arrays with the same number of examples along axis 0, "
            f"got sizes {sizes}.\nGive e.g. {{'image': x_train, 'label': y_train}}."
        )
    if size == 0:
        raise PipelineError(
            f"`{argument}` has no examples (every array has 0 rows along axis 0, got sizes {sizes}).\n"
            f"Give at least one example, e.g. {argument}={{'image': x_test, 'label': y_test}}."
        )
    return size


def check_data(data: Any) -> None:
    """Refuses data that ``fit`` would misread, with the way to write it."""
    if data is None or isinstance(data, (str, bytes)):
        raise PipelineError(
            f"`data` must be a dict of arrays or an iterable of batches, got {type(data).__name__} {data!r:.60}.\n"
            f"Give e.g. trainer.fit(state, {{'image': x_train, 'label': y_train}}, batch_size=128)."
        )
    if isinstance(data, (list, tuple)) and data and all(_is_array(x) for x in data):
        shapes = [np.shape(x) for x in data]
        if isinstance(data, tuple) or len(set(shapes)) > 1:
            raise PipelineError(
                f"`data` is a {type(data).__name__} of {len(data)} arrays (shapes {shapes}); `fit` takes a "
                f"list or tuple as an iterable of batches, one batch per item, so this would train on each array "
                f"as a batch of its own.\nPut the arrays in a dict, named as the loss reads them: "
                f"trainer.fit(state, {{'image': X, 'label': Y}}, batch_size=128)."
            )
    if not isinstance(data, Mapping) and not isinstance(data, Iterable):
        raise PipelineError(
            f"`data` must be a dict of arrays or an iterable of batches, got {type(data).__name__}.\n"
            f"Give e.g. trainer.fit(state, {{'image': x_train, 'label': y_train}}, batch_size=128)."
        )


def check_not_examples(data: Any) -> None:
    """Refuses a list of single examples given as batches (each would be a step of batch size 1).

    Every value of a batch has a leading batch axis; an item with a scalar
    value (a label, say) is one example.
    """
    if isinstance(data, (list, tuple)) and data:
        leaves = jax.tree.leaves(data[0])
        if leaves and any(np.ndim(x) == 0 for x in leaves):
            raise PipelineError(
                f"`data` is a {type(data).__name__} of {len(data)} items holding scalars: single "
                f"examples, not batches (a batch has a leading axis in every value), so each step would train "
                f"on one example.\n"
                f"Pass batch_size to batch them, e.g. trainer.fit(state, records, batch_size=32)."
            )


class Collated:
    """An iterable of examples read as batches of ``batch_size`` stacked examples.

    The last partial batch of a pass is dropped, as for a dict of arrays. An
    iterator with ``get_state``/``set_state`` (Grain's) keeps them, with the
    state right after each batch's last example, so a run resumes exactly.
    """

    def __init__(self, examples: Iterable[Any], batch_size: int) -> None:
        self.examples, self.batch_size = examples, batch_size

    def __iter__(self) -> Iterator[Any]:
        return _CollatedIterator(iter(self.examples), self.batch_size)

    def for_epoch(self, epoch: int) -> Iterable[Any]:
        """Epoch ``epoch``'s batches: of that epoch's examples where they have epochs (a Grain ``MapDataset``)."""
        return type(self)(for_epoch(self.examples, epoch), self.batch_size)


class SizedCollated(Collated):
    def __len__(self) -> int:
        return len(self.examples) // self.batch_size  # type: ignore[arg-type]


def collated(examples: Iterable[Any], batch_size: int) -> Collated:
    """Batches of ``batch_size`` from an iterable of examples (with a length when the examples have one)."""
    return (SizedCollated if hasattr(examples, "__len__") else Collated)(examples, batch_size)


class _CollatedIterator:
    def __init__(self, examples: Iterator[Any], batch_size: int) -> None:
        self.examples, self.batch_size = examples, batch_size
        if _resumable(examples):  # the position after a batch is the position after its last example
            self.get_state = examples.get_state  # type: ignore[attr-defined]
            self.set_state = examples.set_state  # type: ignore[attr-defined]

    def __iter__(self) -> _CollatedIterator:
        return self

    def __next__(self) -> Any:
        group = []
        for _ in range(self.batch_size):
            example = next(self.examples, _END)
            if example is _END:
                raise StopIteration
            group.append(example)
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *group)


def batch_signature(data: Any) -> Any:
    """Hashable shapes and dtypes of a dict of arrays (per example), or the type of an iterable."""
    if isinstance(data, Mapping):
        items = sorted(data.items(), key=lambda kv: str(kv[0]))
        return tuple((k, np.shape(v)[1:], str(getattr(v, "dtype", ""))) for k, v in items)
    return type(data).__name__


def for_epoch(data: Iterable[Any], epoch: int) -> Iterable[Any]:
    """What ``data`` gives in ``epoch`` (from 0): ``data.for_epoch(epoch)`` where it has one (see
    ``grain.Epochs``), else ``data`` itself, the same each epoch."""
    method = getattr(data, "for_epoch", None)
    return data if method is None else method(epoch)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and np.ndim(x) >= 1


def epoch_order(data_key: jax.Array, epoch: int, size: int) -> np.ndarray:
    """The example order of ``epoch`` on the host: a permutation keyed by (data_key, epoch)."""
    if isinstance(data_key, jax.Array) and len(data_key.sharding.device_set) > 1 and data_key.is_fully_replicated:
        data_key = data_key.addressable_data(0)  # a key replicated over a mesh: shuffle on one local device
    return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), size))


# --- the memory budget ------------------------------------------------------------------------


def nbytes(data: Mapping[str, Any]) -> int:
    return sum(int(np.prod(np.shape(v))) * np.dtype(getattr(v, "dtype", np.float32)).itemsize for v in data.values())


def free_bytes(device: Any) -> int | None:
    """Free memory on ``device``: its allocator's figures, or the host's available memory for a CPU."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends have none
        pass
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def choose_device_data(choice: bool | str, data: Mapping[str, Any], shards: int) -> tuple[bool, str]:
    """Whether the data goes on the device, and why in a few words (for the progress line).

    ``"auto"``: yes when each device's share takes at most a quarter of its free
    memory, leaving room for the model, the optimizer and XLA's buffers.
    """
    size = nbytes(data)
    if choice is True or choice is False:
        return (
            choice,
            f"data {'on the device' if choice else 'streamed from the host'} ({_mb(size)}, device_data={choice})",
        )
    free = free_bytes(jax.local_devices()[0])
    share = size // max(shards, 1)
    if free is not None and share <= free // 4:
        return True, f"data on the device ({_mb(size)}, {_mb(free)} free)"
    why = "free memory unknown" if free is None else f"over a quarter of the {_mb(free)} free"
    return False, f"data streamed from the host ({_mb(size)}: {why})"


def _mb(n: int) -> str:
    return f"{n / 2**20:.3g} MB" if n < 2**30 else f"{n / 2**30:.3g} GB"


# --- host groups: one call's batches -------------------------------------------------------------


def array_groups(
    data: Mapping[str, Any],
    data_key: jax.Array,
    batch_size: int,
    steps_per_epoch: int,
    start: int,
    end: int,
    count: Callable[[int], int],
) -> Iterator[tuple[int, Any, Any]]:
    """(steps, stacked host batches, None) from step ``start`` to ``end``; ``count(step)`` sizes each call."""
    host = {key: np.asarray(value) for key, value in data.items()}
    size = next(iter(host.values())).shape[0]
    step = start
    while step < end:
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(data_key, epoch, size)
        while offset < steps_per_epoch and step < end:
            n = count(step)
            index = order[offset * batch_size : (offset + n) * batch_size].reshape(n, batch_size)
            yield n, {key: value[index] for key, value in host.items()}, None
            offset += n
            step += n


class ResumableSource:
    """An iterable of batches, read epoch by epoch, with the iterator's position when it has one.

    Each epoch reads ``for_epoch(data, epoch)``: a Grain ``MapDataset``'s own
    epoch (a new shuffle each), any other iterable as it is.

    An iterator with ``get_state()``/``set_state()`` (Grain's) resumes from a
    saved position; any other skips the batches already trained on.
    """

    def __init__(self, data: Iterable[Any], steps_per_epoch: int | None, epochs: int) -> None:
        self.data, self.steps_per_epoch, self.epochs = data, steps_per_epoch, epochs

    def groups(self, start: int, end: int | None, saved: Any, count: Callable[[int], int]) -> Iterator[Any]:
        """(steps, stacked batches, data state after them) from step ``start``."""
        per_epoch = self.steps_per_epoch
        epoch, offset = divmod(start, per_epoch) if per_epoch else (0, start)
        step = start
        while end is None or step < end:
            iterator = iter(for_epoch(self.data, epoch))
            if offset and saved is not None and _resumable(iterator):
                iterator.set_state(decode_state(saved, iterator))  # type: ignore[attr-defined]
            else:
                for skipped in range(offset):
                    if next(iterator, _END) is _END:
                        self._short(epoch, skipped)
            saved, held, held_state = None, _END, None
            while per_epoch is None or offset < per_epoch:
                if end is not None and step >= end:
                    return
                n = count(step)
                if per_epoch is not None:
                    n = min(n, per_epoch - offset)
                group, held, after, held_state = _take(iterator, n, held, held_state)
                if not group:
                    if per_epoch is not None:
                        self._short(epoch, offset)
                    return
                yield len(group), group, after
                offset += len(group)
                step += len(group)
                if len(group) < n and held is _END:
                    if per_epoch is not None:
                        self._short(epoch, offset)
                    return
            epoch, offset = epoch + 1, 0
            if epoch >= self.epochs:
                return

    def _short(self, epoch: int, got: int) -> None:
        raise PipelineError(
            f"`data` says it has {self.steps_per_epoch} batches (its `len`), but in epoch {epoch + 1} it gave only "
            f"{got}.\nMake `__len__` return the number of batches one pass yields, or pass an iterator without a "
            f"length (e.g. iter(batches)) to train one pass over whatever it gives."
        )


_END = object()


def _take(iterator: Iterator[Any], n: int, held: Any, held_state: Any) -> tuple[list[Any], Any, Any, Any]:
    """Up to ``n`` batches of one structure and shapes (so they stack); the first that differs is held back.

    Returns the group, the held batch (or ``_END``), the iterator's state right
    after the group's last batch, and the state right after the held batch.
    """
    resumable = _resumable(iterator)
    group = [] if held is _END else [held]
    state = held_state
    signature = _signature(group[0]) if group else None
    while len(group) < n:
        batch = next(iterator, _END)
        if batch is _END:
            return group, _END, state, None
        now = encode_state(iterator.get_state()) if resumable else None  # type: ignore[attr-defined]
        if signature is None:
            signature = _signature(batch)
        elif _signature(batch) != signature:
            return group, batch, state, now
        group.append(batch)
        state = now
    return group, _END, state, None


def _signature(batch: Any) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(batch)
    return tree, [(np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves]


def _resumable(iterator: Any) -> bool:
    return callable(getattr(iterator, "get_state", None)) and callable(getattr(iterator, "set_state", None))


def encode_state(value: Any) -> Any:
    """An iterator state as JSON-able data: bytes decoded to str, NumPy scalars and arrays as Python values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (np.generic, np.ndarray)):  # hand-written iterators often count with NumPy ints
        return encode_state(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    return value


def decode_state(saved: Any, iterator: Any) -> Any:
    """A saved state as the iterator expects it: bytes again where its own state is bytes."""
    if isinstance(saved, str) and isinstance(iterator.get_state(), bytes):
        return saved.encode()
    return saved


# --- the prefetcher ---------------------------------------------------------------------------


class Prefetcher:
    """Reads the next call's batches and copies them to the device in a background thread.

    ``place(group)`` does the host work and starts the device copy; the queue
    holds one placed group ahead of the one being trained on, so reading and
    copying overlap the device's work. Errors are raised in the training thread.
    """

    def __init__(self, groups: Iterator[Any], place: Callable[[Any], Any], ahead: int = 1) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        # In the run's context, so that the run's own hooks (e.g. ``.data_parallel``'s placing) answer there too.
        work = functools.partial(contextvars.copy_context().run, self._work, groups, place)
        self._thread = threading.Thread(target=work, daemon=True, name="jaxpipe-fit-data")
        self._thread.start()

    def _work(self, groups: Iterator[Any], place: Callable[[Any], Any]) -> None:
        try:
            for group in groups:
                item = ("group", place(group))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the training thread
            self._put(("error", err))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
