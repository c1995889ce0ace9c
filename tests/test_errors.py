"""Each error a user can make, on purpose: the stage, what is wrong, how to fix it, the JAX error chained."""

from __future__ import annotations

import gc
import traceback
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpipe
from jaxpipe import Pipeline, PipelineError, UnknownStageError
from jaxpipe.errors import PipelineIndexError, PipelineTypeError

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


def test_vmap_axis_sizes_that_differ_name_keyword_arguments_too() -> None:
    """Found by running JAX's api_test through pipelines (test_vmap_mismatched_keyword)."""

    def f(x: jax.Array, y: jax.Array) -> jax.Array:
        return x + y

    err = raised(lambda: Pipeline(f).vmap()(jnp.ones(1), y=jnp.ones(2)))
    assert "* argument x: axis 0 has size 1 (float32[1])" in str(err)
    assert "* kwargs['y']: axis 0 has size 2 (float32[2])" in str(err)


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


# --- JAX's own error types: `except TypeError` written against JAX keeps working ----------


def _generator(w: jax.Array, x: jax.Array) -> Any:
    yield w * x


class _Holder:
    @staticmethod
    def method(w: jax.Array, x: jax.Array) -> jax.Array:
        return loss(w, x)


_STATIC = _Holder.__dict__["method"]  # the staticmethod object itself


def _head(x: jax.Array, n: int) -> jax.Array:
    return x[:n]


def _zero_first(x: jax.Array) -> jax.Array:
    x[0] = 0.0
    return x


def _relu_or_not(x: jax.Array, flag: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0) if flag else x


SAME_MISTAKE = {  # ours, then the same mistake written with JAX
    "not callable": (lambda: Pipeline(3), lambda: jax.jit(3)),
    "generator under jit": (lambda: Pipeline(_generator).jit(), lambda: jax.jit(_generator)),
    "generator under grad": (lambda: Pipeline(_generator).grad(), lambda: jax.grad(_generator)),
    "staticmethod under vmap": (lambda: Pipeline(_STATIC).vmap(), lambda: jax.vmap(_STATIC)),
    "staticmethod under hessian": (lambda: Pipeline(_STATIC).hessian(), lambda: jax.hessian(_STATIC)),
    "in_axes a str": (lambda: Pipeline(loss).vmap(in_axes="x"), lambda: jax.vmap(loss, in_axes="x")),
    "in_axes a dict": (lambda: Pipeline(loss).vmap(in_axes={"w": 0}), lambda: jax.vmap(loss, in_axes={"w": 0})),
    "in_axes entry": (lambda: Pipeline(loss).vmap(in_axes=(None, "b")), lambda: jax.vmap(loss, in_axes=(None, "b"))),
    "out_axes a bool": (lambda: Pipeline(loss).vmap(out_axes=True), lambda: jax.vmap(loss, out_axes=True)),
    "pmap in_axes entry": (
        lambda: Pipeline(loss).pmap(in_axes=(None, 1.5)),
        lambda: jax.pmap(loss, in_axes=(None, 1.5)),
    ),
    "in_axes too long": (
        lambda: Pipeline(loss).vmap(in_axes=(0, 0, 0))(X, X),
        lambda: jax.vmap(loss, in_axes=(0, 0, 0))(X, X),
    ),
    "grad argnums beyond": (lambda: Pipeline(loss).grad(argnums=5), lambda: jax.grad(loss, argnums=5)(W, X)),
    "value_and_grad argnums beyond": (
        lambda: Pipeline(loss).value_and_grad(argnums=5),
        lambda: jax.value_and_grad(loss, argnums=5)(W, X),
    ),
    "jacfwd argnums beyond": (lambda: Pipeline(loss).jacfwd(argnums=5), lambda: jax.jacfwd(loss, argnums=5)(W, X)),
    "grad argnums a str": (lambda: Pipeline(loss).grad(argnums="w"), lambda: jax.grad(loss, argnums="w")),
    "static_argnums beyond": (
        lambda: Pipeline(loss).jit(static_argnums=5),
        lambda: jax.jit(loss, static_argnums=5),
    ),
    "static_argnames not str": (
        lambda: Pipeline(loss).jit(static_argnames=(1,)),
        lambda: jax.jit(loss, static_argnames=(1,)),
    ),
    "static_argnames unknown": (
        lambda: Pipeline(loss).jit(static_argnames="steps"),
        lambda: jax.jit(loss, static_argnames="steps"),
    ),
    "unknown option": (lambda: Pipeline(loss).jit(statc_argnums=1), lambda: jax.jit(loss, statc_argnums=1)),
    "grad of a vector": (lambda: Pipeline(elementwise).grad()(W, X), lambda: jax.grad(elementwise)(W, X)),
    "if on a tracer": (
        lambda: Pipeline(_relu_or_not).jit()(X, True),
        lambda: jax.jit(_relu_or_not)(X, True),
    ),
    "traced slice bound": (lambda: Pipeline(_head).jit()(X, 2), lambda: jax.jit(_head)(X, 2)),
    "in-place assignment": (lambda: Pipeline(_zero_first).jit()(X), lambda: jax.jit(_zero_first)(X)),
    "vmap sizes differ": (
        lambda: Pipeline(loss).vmap()(jnp.ones((5, 3)), XS),
        lambda: jax.vmap(loss)(jnp.ones((5, 3)), XS),
    ),
}


@pytest.mark.parametrize("mistake", list(SAME_MISTAKE))
def test_pipeline_errors_are_of_the_builtin_type_jax_raises(mistake: str) -> None:
    ours, theirs = SAME_MISTAKE[mistake]
    with pytest.raises(Exception) as jax_raised:
        theirs()
    err = raised(ours)
    for builtin in (TypeError, ValueError, IndexError):
        if isinstance(jax_raised.value, builtin):
            assert isinstance(err, builtin), (builtin, type(err).__mro__, jax_raised.value)
    if isinstance(jax_raised.value, TypeError):  # caught as JAX's own would be
        with pytest.raises(TypeError):
            ours()


def test_the_error_types_keep_their_class_when_placed() -> None:
    err = PipelineTypeError("bad", stage_name="vmap")
    pipe = Pipeline(loss).grad().vmap()
    located = err.within(pipe)
    assert type(located) is PipelineTypeError and (located.stage, located.stage_name) == (2, "vmap")
    assert type(err.at(1, "grad", pipe)) is PipelineTypeError
    assert issubclass(PipelineTypeError, TypeError) and issubclass(PipelineTypeError, PipelineError)
    assert issubclass(PipelineIndexError, IndexError) and issubclass(PipelineIndexError, PipelineError)
    added = raised(lambda: Pipeline(loss).grad().vmap(in_axes="x"))
    assert type(added) is PipelineTypeError and (added.stage, added.stage_name) == (2, "vmap")
    assert "`in_axes` must be an int, None, or a tuple" in str(added)
    assert "`jax.jit` needs a function that returns arrays, but `_generator` is a generator" in str(
        raised(lambda: Pipeline(_generator).jit())
    )


# --- add-time checks accept whatever JAX accepts -----------------------------------------


@jax.tree_util.register_pytree_node_class
class Pair:
    """A pytree node of two leaves (an in_axes prefix for an argument of this type)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def tree_flatten(self) -> tuple[tuple[Any, Any], None]:
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Any) -> Pair:
        del aux  # no static part
        return cls(*children)


def pair_loss(w: jax.Array, pair: Any) -> jax.Array:
    if isinstance(pair, dict):
        return jnp.sum(w * pair["a"] + pair["b"])
    return jnp.sum(w * pair.a + pair.b)


@pytest.mark.parametrize(
    "in_axes, pair",
    [
        ((None, Pair(0, 1)), Pair(jnp.ones((4, 3)), jnp.ones((3, 4)))),
        ((None, Pair(-2, -1)), Pair(jnp.ones((4, 3)), jnp.ones((3, 4)))),
        ([None, {"a": 0, "b": None}], {"a": jnp.ones((4, 3)), "b": jnp.ones(3)}),
        ((None, {"a": -2, "b": 1}), {"a": jnp.ones((4, 3)), "b": jnp.ones((3, 4))}),
    ],
)
def test_in_axes_that_jax_accepts_are_accepted(in_axes: Any, pair: Any) -> None:
    ours = Pipeline(pair_loss).grad().vmap(in_axes=in_axes, out_axes=-1)(W, pair)
    theirs = jax.vmap(jax.grad(pair_loss), in_axes=in_axes, out_axes=-1)(W, pair)
    np.testing.assert_array_equal(ours, theirs)


def test_options_jax_accepts_but_checks_used_to_refuse() -> None:
    # keyword arguments are mapped over axis 0: a shorter in_axes is fine for jax.vmap
    np.testing.assert_array_equal(
        Pipeline(loss).vmap(in_axes=(None,))(W, x=XS), jax.vmap(loss, in_axes=(None,))(W, x=XS)
    )
    # argument numbers as JAX reads them (operator.index, any iterable), names from any iterable
    for argnums in (np.int64(1), range(2), [0, 1]):
        np.testing.assert_array_equal(
            jax.tree.leaves(Pipeline(loss).grad(argnums=argnums)(W, X)),
            jax.tree.leaves(jax.grad(loss, argnums=argnums)(W, X)),
        )
    assert Pipeline(loss).jit(static_argnames={"x"}).stages[0].options["static_argnames"] == {"x"}


# --- a pipeline holds its function no more strongly than jax.jit ------------------------------


def _dies_after_use(make: Any) -> bool:
    def fresh(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum((w * x) ** 2)

    ref = weakref.ref(fresh)
    built = make(fresh)
    built(W, X)
    del fresh, built
    gc.collect()
    return ref() is None


@pytest.mark.parametrize(
    "make",
    [
        lambda f: Pipeline(f).jit(),
        lambda f: Pipeline(f).grad().jit(),
        lambda f: Pipeline(f).grad(argnums=(0, 1)).jit(static_argnums=()),
        lambda f: Pipeline(f).value_and_grad().remat(),
    ],
)
def test_a_pipeline_lets_its_function_go_as_jax_jit_does(make: Any) -> None:
    assert _dies_after_use(jax.jit)  # JAX's own behaviour, the reference
    assert _dies_after_use(make)


def test_a_bound_method_cycle_is_collected() -> None:
    class Model:
        def __init__(self) -> None:
            self.step = Pipeline(self.loss).grad().jit()  # model -> pipeline -> bound method -> model

        def loss(self, w: jax.Array, x: jax.Array) -> jax.Array:
            return jnp.sum((w * x) ** 2)

    model = Model()
    model.step(W, X)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_equal_pipelines_share_a_build_while_one_lives_and_clear_caches_forgets_it() -> None:
    first = Pipeline(loss).grad().jit()
    assert Pipeline(loss).grad().jit().build() is first.build()
    jaxpipe.clear_caches()
    assert Pipeline(loss).grad().jit().build() is not first.build()
    np.testing.assert_array_equal(first(W, X), jax.jit(jax.grad(loss))(W, X))
