"""Each error a user can make, on purpose: the stage, what is wrong, how to fix it, the JAX error chained."""

from __future__ import annotations

import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import Pipeline, PipelineError, UnknownStageError

pytestmark = pytest.mark.usefixtures("example_plugin_only")


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum((w * x) ** 2)


def elementwise(w: jax.Array, x: jax.Array) -> jax.Array:
    return (w * x) ** 2


W, X, XS = jnp.ones(3), jnp.ones(3), jnp.ones((4, 3))


def raised(call: Any) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        call()
    return info.value


def assert_jax_traceback_kept(err: PipelineError, jax_error: type[BaseException], in_user_code: bool = True) -> None:
    """The JAX error is the cause, still carrying JAX's own traceback filtering."""
    cause = err.__cause__
    assert isinstance(cause, jax_error)
    assert any("JAX has removed its internal frames" in note for note in getattr(cause, "__notes__", []))
    files = [frame.filename for frame in traceback.extract_tb(cause.__traceback__)]
    assert files and not any("/jax/_src/" in f for f in files)
    assert any(f == __file__ for f in files) == in_user_code  # the user's line that raised is still there


# --- definition time ------------------------------------------------------------------


@pytest.mark.parametrize("in_axes", [{"w": 0}, "0", 1.5])
def test_in_axes_of_the_wrong_type(in_axes: Any) -> None:
    err = raised(lambda: Pipeline(loss).grad().vmap(in_axes=in_axes))
    assert (err.stage, err.stage_name) == (2, "vmap")
    assert str(err).startswith(f"stage 2 (vmap) of Pipeline(loss).grad().vmap(in_axes={in_axes!r}):\n")
    assert "`in_axes` must be an int, None, or a tuple" in str(err)
    assert "in_axes=(None, 0) maps only the second" in str(err)
    assert isinstance(err.__cause__, TypeError)


def test_in_axes_entry_that_is_not_an_axis() -> None:
    err = raised(lambda: Pipeline(loss).vmap(in_axes=(None, "batch")))
    assert (err.stage, err.stage_name) == (1, "vmap")
    assert "entries must be ints or None, got 'batch'" in str(err)


def test_in_axes_length_must_match_the_arguments() -> None:
    err = raised(lambda: Pipeline(loss).grad().vmap(in_axes=(None, 0, 0)))
    assert str(err) == (
        "stage 2 (vmap) of Pipeline(loss).grad().vmap(in_axes=(None, 0, 0)):\n"
        "in_axes has 3 entries but `loss` takes 2 positional arguments.\n"
        "Give one entry per positional argument, e.g. in_axes=(None, 0)."
    )
    assert isinstance(err.__cause__, ValueError)
    short = raised(lambda: Pipeline(loss).pmap(in_axes=(0,)))
    assert (short.stage_name, short.stage) == ("pmap", 1) and "e.g. in_axes=(0, 0)" in str(short)


@pytest.mark.parametrize("stage", ["grad", "value_and_grad", "hessian", "jacfwd", "jacrev"])
def test_argnums_beyond_the_arguments(stage: str) -> None:
    err = raised(lambda: Pipeline(loss).then(stage, argnums=(0, 2)))
    assert (err.stage, err.stage_name) == (1, stage)
    assert "`argnums=(0, 2)` refers to argument 2, but `loss` takes 2 positional arguments ('w', 'x')" in str(err)
    assert "Use a number from 0 to 1." in str(err)
    assert isinstance(err.__cause__, ValueError)


def test_argnums_of_the_wrong_type() -> None:
    err = raised(lambda: Pipeline(loss).grad(argnums="w"))
    assert "`argnums` must be an int or a tuple of ints, got 'w'" in str(err) and "e.g. argnums=0" in str(err)


def test_static_argnames_that_are_not_parameters() -> None:
    err = raised(lambda: Pipeline(loss).jit(static_argnames=("x", "steps")))
    assert (err.stage, err.stage_name) == (1, "jit")
    assert "`static_argnames` names 'steps', which is not a parameter of `loss(w, x)`" in str(err)
    assert "Use one of ('w', 'x')." in str(err)


def test_static_argnums_beyond_the_arguments() -> None:
    err = raised(lambda: Pipeline(loss).grad().jit(static_argnums=2))
    assert (err.stage, err.stage_name) == (2, "jit")
    assert "`static_argnums=2` refers to argument 2" in str(err)


def test_unknown_stage_name_suggests_the_close_one() -> None:
    with pytest.raises(UnknownStageError) as info:
        Pipeline(loss).grad().vmapp(in_axes=0)
    err = info.value
    assert isinstance(err, AttributeError) and isinstance(err, PipelineError)
    assert (err.stage, err.stage_name) == (2, "vmapp")
    assert "there is no stage called `vmapp`. Did you mean `vmap`" in str(err)
    assert "jaxpipe plugins" in str(err)  # where to look for plugin stages
    with pytest.raises(UnknownStageError, match="Did you mean `value_and_grad`"):
        Pipeline(loss).then("value_and_grads")


def test_unknown_option_suggests_the_close_one_and_lists_the_options() -> None:
    err = raised(lambda: Pipeline(loss).jit(statc_argnums=1))
    assert (err.stage, err.stage_name) == (1, "jit")
    assert "`.jit()` has no option `statc_argnums`. Did you mean `static_argnums`?" in str(err)
    assert "static_argnames=None" in str(err) and "donate_argnums=None" in str(err)
    assert ":" not in str(err).split("Its options are")[1]  # options read as code, without annotations
    assert isinstance(err.__cause__, TypeError)
    missing = raised(lambda: Pipeline(loss).then("scan"))
    assert "missing a required argument: 'steps'" in str(missing)


def test_stage_options_checked_when_added() -> None:
    assert "`steps` must be a positive int" in str(raised(lambda: Pipeline(loss).scan(0)))
    assert "`policy` must be a callable" in str(raised(lambda: Pipeline(loss).remat(policy="dots")))
    err = raised(lambda: Pipeline(loss).debug().jit())
    assert (err.stage, err.stage_name) == (2, "jit") and "Move `.debug()` to the end." in str(err)


def test_pipeline_of_something_not_callable() -> None:
    with pytest.raises(
        PipelineError, match=r"got ArrayImpl Array\(.*\nPass the function itself, e.g. Pipeline\(loss\)"
    ):
        Pipeline(loss(W, X))  # type: ignore[arg-type]


# --- call time: JAX's errors, explained -------------------------------------------------


def test_grad_of_a_non_scalar_output() -> None:
    pipe = Pipeline(elementwise).remat().grad().jit()
    err = raised(lambda: pipe(W, XS))
    assert (err.stage, err.stage_name) == (2, "grad")
    assert err.pipeline == "Pipeline(elementwise).remat().grad().jit()"
    assert "`jax.grad` needs `elementwise` to return a scalar, but it returned an array of shape (4, 3)." in str(err)
    for fix in ("jnp.sum(...)", ".jacrev()", ".value_and_grad(has_aux=True)", "put .vmap() after .grad()"):
        assert fix in str(err)
    assert_jax_traceback_kept(err, TypeError, in_user_code=False)
    value_and_grad = raised(lambda: Pipeline(elementwise).value_and_grad()(W, X))
    assert value_and_grad.stage_name == "value_and_grad" and "shape (3,)" in str(value_and_grad)


def test_vmap_axis_sizes_that_differ_name_the_arguments() -> None:
    pipe = Pipeline(loss).grad().vmap().jit()
    err = raised(lambda: pipe(jnp.ones((5, 3)), XS))
    assert (err.stage, err.stage_name) == (2, "vmap")
    assert "* argument w: axis 0 has size 5 (float32[5,3])" in str(err)
    assert "* argument x: axis 0 has size 4 (float32[4,3])" in str(err)
    assert "mark an argument that is shared by the whole batch with None in in_axes (now in_axes=0" in str(err)
    assert_jax_traceback_kept(err, ValueError, in_user_code=False)


def test_vmap_in_axes_that_do_not_fit_the_call() -> None:
    def total(*xs: jax.Array) -> jax.Array:  # no fixed arity: caught at call time
        return sum(jnp.sum(x) for x in xs)  # type: ignore[return-value]

    err = raised(lambda: Pipeline(total).vmap(in_axes=(0, None, 0))(XS, XS))
    assert (err.stage, err.stage_name) == (1, "vmap")
    assert "in_axes=(0, None, 0) has 3 entries, but the call passed 2 positional arguments" in str(err)


def test_python_if_on_a_traced_argument_under_jit() -> None:
    def relu_or_not(x: jax.Array, flag: jax.Array) -> jax.Array:
        if flag:
            return jnp.maximum(x, 0)
        return x

    err = raised(lambda: Pipeline(relu_or_not).jit()(X, True))
    assert (err.stage, err.stage_name) == (1, "jit")
    assert "`relu_or_not` needs the value of argument `flag`" in str(err)
    for fix in (
        "jnp.where(cond, a, b)",
        "jax.lax.cond",
        ".jit(static_argnames=('flag',))",
        ".jit(static_argnums=(1,))",
    ):
        assert fix in str(err)
    assert_jax_traceback_kept(err, jax.errors.TracerBoolConversionError)
    fixed = Pipeline(relu_or_not).jit(static_argnames="flag")
    np.testing.assert_array_equal(fixed(-X, flag=True), jnp.zeros(3))


def test_concrete_value_needed_for_a_shape_under_jit() -> None:
    def zeros_like_n(x: jax.Array, n: int) -> jax.Array:
        return jnp.zeros(n) + jnp.sum(x)

    err = raised(lambda: Pipeline(zeros_like_n).jit()(X, 3))
    assert (err.stage, err.stage_name) == (1, "jit")
    assert "needs the value of argument `n`" in str(err) and ".jit(static_argnums=(1,))" in str(err)

    def to_int(x: jax.Array) -> int:
        return int(x)

    err = raised(lambda: Pipeline(to_int).jit()(jnp.ones(())))
    assert "needs the value of argument `x`" in str(err)
    assert_jax_traceback_kept(err, jax.errors.ConcretizationTypeError)


def test_traced_slice_bound_under_jit() -> None:
    def head(x: jax.Array, n: int) -> jax.Array:
        return x[:n]

    err = raised(lambda: Pipeline(head).jit()(X, 2))
    assert (err.stage, err.stage_name) == (1, "jit") and "a slice bound" in str(err)
    assert isinstance(err.__cause__, IndexError)


def test_python_if_under_vmap_suggests_in_axes_none() -> None:
    def absolute(x: jax.Array) -> jax.Array:
        return x if x > 0 else -x

    err = raised(lambda: Pipeline(absolute).vmap()(X))
    assert (err.stage, err.stage_name) == (1, "vmap")
    assert "jnp.where(cond, a, b)" in str(err) and "in_axes=None" in str(err)


def test_in_place_assignment_suggests_at_set() -> None:
    def zero_first(x: jax.Array) -> jax.Array:
        x[0] = 0.0
        return x

    for pipe, where in ((Pipeline(zero_first).jit(), "stage 1 (jit) of"), (Pipeline(zero_first), "in Pipeline")):
        err = raised(lambda pipe=pipe: pipe(X))
        assert str(err).startswith(where)
        assert "JAX arrays are immutable" in str(err) and "x = x.at[i].set(v)" in str(err)
        assert isinstance(err.__cause__, TypeError)


def test_errors_from_inspection_are_explained_too() -> None:
    err = raised(lambda: Pipeline(elementwise).grad().hlo(W, X))
    assert (err.stage, err.stage_name) == (1, "grad") and "return a scalar" in str(err)


def test_other_errors_pass_through_unchanged() -> None:
    def broken(x: jax.Array) -> jax.Array:
        raise KeyError("params")

    with pytest.raises(KeyError, match="params"):
        Pipeline(broken).jit()(X)


def test_a_failed_call_leaves_the_pipeline_working() -> None:
    pipe = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    with pytest.raises(TypeError, match="incompatible shapes"):  # nothing to add: JAX's error as is
        pipe(jnp.ones(4), XS)
    np.testing.assert_array_equal(pipe(W, XS), jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(W, XS))
