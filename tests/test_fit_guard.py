"""The non-finite guard paid per call: no program checks its steps; a snapshot and the calls since it are replayed."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from test_fit_loop import BATCH, DIVERGES_AT, Calls, N, host_order_fit, linear_loss, start

from jaxpipe import Pipeline, PipelineError
from jaxpipe._training import loop as fit_loop


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)}


@pytest.mark.parametrize("device_data", [True, False])
@pytest.mark.parametrize("snapshot_seconds", [1e9, 0.0])  # never after the start / after every call
@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_a_non_finite_step_leaves_the_state_from_before_it(
    data, device_data, snapshot_seconds, steps_per_call, monkeypatch
):
    monkeypatch.setattr(fit_loop, "_SNAPSHOT_SECONDS", snapshot_seconds)
    trainer = Pipeline(linear_loss).optimize(optax.sgd(30.0)).jit()
    calls = Calls()
    with pytest.raises(PipelineError, match=r"at step 12 \(epoch 2, batch 5 of 7\)") as caught:
        trainer.fit(
            start(trainer, data),
            data,
            epochs=3,
            batch_size=BATCH,
            progress=False,
            device_data=device_data,
            steps_per_call=steps_per_call,
            hooks=[calls],
        )
    kept = caught.value.state
    assert int(kept.step) == DIVERGES_AT - 1 and len(calls.run.history) == DIVERGES_AT - 1
    want = host_order_fit(trainer, start(trainer, data), data, DIVERGES_AT - 1)
    np.testing.assert_array_equal(kept.params["w"], want.params["w"])


def test_the_callers_state_is_left_alone_and_programs_do_not_depend_on_on_nonfinite(data):
    trainer = Pipeline(linear_loss).optimize(optax.sgd(0.05)).jit()
    state = start(trainer, data)
    before = np.asarray(state.params["w"]).copy()
    a = trainer.fit(state, data, epochs=2, batch_size=BATCH, progress=False, steps_per_call=3)
    b = trainer.fit(state, data, epochs=2, batch_size=BATCH, progress=False, steps_per_call=3, on_nonfinite="ignore")
    np.testing.assert_array_equal(np.asarray(state.params["w"]), before)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_on_nonfinite_ignore_trains_every_step_after_a_non_finite_full_call(data):
    """A NaN in a full call must not stop the remainder calls (the while loop ignores the `ok` flag unguarded)."""
    trainer = Pipeline(linear_loss).optimize(optax.sgd(30.0)).jit()
    final = trainer.fit(
        start(trainer, data), data, epochs=3, batch_size=BATCH, progress=False, steps_per_call=5, on_nonfinite="ignore"
    )
    assert int(final.step) == 21
    want = host_order_fit(trainer, start(trainer, data), data, 21)
    np.testing.assert_allclose(final.params["w"], want.params["w"], rtol=1e-5, equal_nan=True)
