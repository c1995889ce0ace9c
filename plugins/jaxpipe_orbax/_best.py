"""The best step by an eval metric: ``.checkpoint(..., best="eval_loss", mode="min")``.

jaxpipe's retention keeps, beside the newest ``keep`` steps, the step whose
evaluation was best. The mark lives in the step's own metadata (``meta/``, as
``"best": {"metric", "mode", "value"}``, under its checksum), so it survives
restarts and travels with a copied directory: the best step of a directory is
the marked step with the best value for the metric and mode. A step evaluated
after it was saved (a save and an evaluation at the same step) is marked by
rewriting its metadata in place, atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from jaxpipe_orbax import _directory

MODES = ("min", "max")
TEMPORARY = "metadata.jaxpipe-tmp"  # the metadata being rewritten; renamed over it


def check(best: Any, mode: Any) -> None:
    """Refuses bad ``best`` / ``mode`` options (the stage's check)."""
    if best is not None and (not isinstance(best, str) or not best):
        raise ValueError(
            f"`best` must be the name of an eval metric (str) or None, got {best!r}; e.g. best='eval_loss'."
        )
    if mode not in MODES:
        raise ValueError(
            f"`mode` must be 'min' (lower is better, e.g. a loss) or 'max' (higher is better, e.g. an accuracy), "
            f"got {mode!r}; e.g. best='eval_accuracy', mode='max'."
        )


class Best:
    """Which evaluation is better, and the record a step's metadata keeps of it."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode

    def __repr__(self) -> str:
        return f"the {'lowest' if self.mode == 'min' else 'highest'} {self.metric}"

    def value(self, metrics: dict[str, Any]) -> float | None:
        """This evaluation's value, None when it is not finite; KeyError when the metric is not reported."""
        value = float(metrics[self.metric])
        return value if math.isfinite(value) else None

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value < than if self.mode == "min" else value > than

    def record(self, value: float) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": value}

    def matches(self, record: Any) -> bool:
        return isinstance(record, dict) and (record.get("metric"), record.get("mode")) == (self.metric, self.mode)


def best_step(found: _directory.Survey, best: Best | None, layout: dict[str, str] | None) -> tuple[int, float] | None:
    """The marked step with the best value among ``found``'s steps of ``layout`` (any layout when None).

    ``best`` None: whatever metric the marks name, provided they all name the same one and mode.
    """
    marked = {
        step: meta["best"]
        for step, meta in found.steps.items()
        if meta and isinstance(meta.get("best"), dict) and (layout is None or meta.get("layout") == layout)
    }
    if best is None:
        kinds = {(r.get("metric"), r.get("mode")) for r in marked.values()}
        if len(kinds) != 1:
            return None
        best = Best(*next(iter(kinds)))
    chosen: tuple[int, float] | None = None
    for step in sorted(marked):
        record = marked[step]
        if best.matches(record) and isinstance(record.get("value"), (int, float)):
            if chosen is None or best.better(float(record["value"]), chosen[1]):
                chosen = (step, float(record["value"]))
    return chosen


def mark(directory: str, step: int, record: dict[str, Any]) -> bool:
    """Adds ``record`` as ``"best"`` to the metadata of the complete step ``step``; False if it is not there."""
    folder = os.path.join(directory, str(step), "meta")
    try:
        with open(os.path.join(folder, "metadata"), encoding="utf-8") as file:
            meta = json.load(file)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("checksum") != _directory.checksum(meta):
        return False  # damaged: left as it is, for the next run to set aside
    meta["best"] = record
    meta["checksum"] = _directory.checksum(meta)
    temporary = os.path.join(folder, TEMPORARY)
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(meta, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, os.path.join(folder, "metadata"))  # a reader sees the old metadata or the new
    return True
