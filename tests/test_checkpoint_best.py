"""``.checkpoint(..., best="eval_loss")``: the step with the best evaluation is kept beside the newest ``keep`` and
restored bit for bit by ``init(..., which="best")``.

The run: linear regression trained towards ``w = 2`` and evaluated against ``w = 1``, so the eval loss goes
down until ``w`` passes 1 (about step 12), then up.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpipe import Pipeline, PipelineError, hookimpl

SIZE, BATCH = 64, 16  # 4 steps per epoch: an evaluation at each epoch's end


def loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


RNG = np.random.default_rng(0)
X = RNG.normal(size=(SIZE, 3)).astype(np.float32)
TRAIN = {"x": X, "y": X @ np.full(3, 2.0, np.float32)}
EVAL = {"x": X, "y": X @ np.full(3, 1.0, np.float32)}
SAMPLE = {k: v[:BATCH] for k, v in TRAIN.items()}


def trainer(directory, **options):
    return Pipeline(loss).optimize(optax.sgd(0.026)).jit().checkpoint(directory, **options)


def init(pipe, **options):
    return pipe.init(jax.random.key(0), SAMPLE, params={"w": jnp.zeros(3)}, **options)


class Evaluated:
    """Copies of the state at each evaluation (fit donates it to the next call), and the eval rows."""

    def __init__(self) -> None:
        self.states, self.rows = {}, []

    @hookimpl
    def jaxpipe_fit_evaluated(self, run, state, metrics):
        self.states[run.step] = jax.tree.map(jnp.copy, state)
        self.rows.append((run.step, metrics["eval_loss"]))


def fit(pipe, state, epochs, **options):
    seen = Evaluated()
    state = pipe.fit(
        state, TRAIN, epochs=epochs, batch_size=BATCH, eval_data=EVAL, progress=False, hooks=[seen], **options
    )
    return state, seen


def steps_on_disk(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def meta(directory, step):
    return json.loads((directory / str(step) / "meta" / "metadata").read_text())


def assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_best_step_survives_retention_and_restarts_and_init_restores_it(tmp_path, capsys):
    directory = tmp_path / "ckpt"
    pipe = trainer(directory, every=3, keep=2, best="eval_loss")  # saves at 3, 6, ...; evaluations at 4, 8, ...
    assert "keeps its newest 2 steps and the step with the lowest eval_loss" in pipe.explain()
    _, first = fit(pipe, init(pipe), epochs=6)
    losses = dict(first.rows)
    best = min(losses, key=losses.get)
    assert best == 12 and list(losses) == [4, 8, 12, 16, 20, 24]  # down, then up: the best is neither end
    assert all(losses[a] > losses[b] for a, b in [(4, 8), (8, 12)]) and losses[16] > losses[12]
    # saved by `every` at 12 and marked afterwards (4 and 8 were saved for being best, then rotated away)
    assert steps_on_disk(directory) == [12, 21, 24]
    assert meta(directory, 12)["best"] == {"metric": "eval_loss", "mode": "min", "value": losses[12]}
    assert "best" not in meta(directory, 24)

    # a restart: the resumed run compares with the mark on disk, so its worse evaluations keep step 12
    resumed, second = fit(trainer(directory, every=3, keep=2, best="eval_loss"), init(pipe), epochs=8)
    assert [step for step, _ in second.rows] == [28, 32] and all(v > losses[12] for _, v in second.rows)
    assert steps_on_disk(directory) == [12, 30, 32]

    capsys.readouterr()
    restored = init(pipe, which="best")
    assert f"restoring step 12 of {directory}, the best by eval_loss" in capsys.readouterr().out
    assert_same_bits(restored, first.states[12])
    assert_same_bits(init(pipe), resumed)  # the default stays the newest
    assert_same_bits(pipe.restore(init(pipe, resume=False), which="best"), first.states[12])


def test_a_better_evaluation_replaces_the_best_step(tmp_path):
    directory = tmp_path / "ckpt"
    pipe = trainer(directory, every=100, keep=1, best="eval_loss")  # only the best saves before the end
    _, seen = fit(pipe, init(pipe), epochs=2)
    assert seen.rows[1][1] < seen.rows[0][1]
    assert steps_on_disk(directory) == [8]  # step 4 was best, then 8: 4 went; 8 is also the newest
    pipe = trainer(directory, every=100, keep=1, best="eval_loss", mode="max")  # now the highest is kept
    fit(pipe, init(pipe, resume=False), epochs=2, resume=False)  # starts over: the earlier run moved aside
    assert steps_on_disk(directory) == [4, 8]
    assert meta(directory, 4)["best"]["mode"] == "max"


def test_bad_best_options_are_refused_when_the_stage_is_added(tmp_path):
    with pytest.raises(PipelineError, match=r"`mode` must be 'min' .* or 'max' .*, got 'lowest'"):
        trainer(tmp_path / "a", best="eval_loss", mode="lowest")
    with pytest.raises(PipelineError, match=r"`best` must be the name of an eval metric .* got 3"):
        trainer(tmp_path / "a", best=3)
    assert os.listdir(tmp_path) == []


def test_best_needs_eval_data_and_a_metric_the_evaluation_reports(tmp_path):
    pipe = trainer(tmp_path / "a", every=2, best="eval_loss")
    with pytest.raises(PipelineError, match=r"best='eval_loss' .* but this `fit` has no `eval_data`"):
        pipe.fit(init(pipe), TRAIN, epochs=1, batch_size=BATCH, progress=False)
    assert not os.path.exists(tmp_path / "a")  # refused before anything trained or was written
    pipe = trainer(tmp_path / "b", every=2, best="eval_accuracy")
    with pytest.raises(PipelineError, match=r"best='eval_accuracy' names a metric .* it reports 'eval_loss'"):
        fit(pipe, init(pipe), epochs=1)


def test_which_must_be_newest_or_best_and_best_needs_a_marked_step(tmp_path):
    pipe = trainer(tmp_path / "ckpt", every=2)
    assert int(init(pipe, which="best").step) == 0  # nothing saved yet: the fresh state, as for the newest
    pipe.fit(init(pipe), TRAIN, epochs=1, batch_size=BATCH, progress=False)
    with pytest.raises(PipelineError, match=r"no checkpoint in .* is marked best \(steps 2, 4\)"):
        init(pipe, which="best")
    with pytest.raises(PipelineError, match=r"`which` must be 'newest' .* or 'best' .* got 'oldest'"):
        init(pipe, which="oldest")
