"""Pipelines build to exactly the hand-written JAX composition: outputs and lowered program."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpipe
from jaxpipe import Pipeline, Stage

pytestmark = pytest.mark.usefixtures("example_plugin_only")


def loss(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(w * x) ** 2)


def vector(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.tanh(w * x) + w


def with_aux(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(jnp.cos(w * x)), w * x


def summed(w: jax.Array, x: jax.Array) -> jax.Array:
    return jax.lax.psum(jnp.sum(w * x), "batch")


def lowered_text(fn: Callable[..., Any], *args: Any) -> str:
    target = fn if hasattr(fn, "lower") else jax.jit(fn)
    return target.lower(*args).as_text()


def assert_same(pipe: Pipeline, hand: Callable[..., Any], *args: Any) -> None:
    """Same outputs (exactly) and the same lowered program as the hand-written composition."""
    ours, theirs = pipe(*args), hand(*args)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert pipe.hlo(*args) == lowered_text(hand, *args)
    assert lowered_text(pipe.build(), *args) == lowered_text(hand, *args)


W = jnp.array([0.5, -1.0, 2.0])
X = jnp.array([1.5, 0.25, -0.75])
XS = jnp.arange(12.0).reshape(4, 3) / 7


# --- every built-in stage, alone ---------------------------------------------------

STAGES = [
    ("jit", lambda p: p.jit(), lambda f: jax.jit(f), loss, (W, X)),
    ("grad", lambda p: p.grad(), lambda f: jax.grad(f), loss, (W, X)),
    ("grad argnums=1", lambda p: p.grad(argnums=1), lambda f: jax.grad(f, argnums=1), loss, (W, X)),
    ("grad argnums=(0, 1)", lambda p: p.grad(argnums=(0, 1)), lambda f: jax.grad(f, argnums=(0, 1)), loss, (W, X)),
    ("grad has_aux", lambda p: p.grad(has_aux=True), lambda f: jax.grad(f, has_aux=True), with_aux, (W, X)),
    ("value_and_grad", lambda p: p.value_and_grad(), lambda f: jax.value_and_grad(f), loss, (W, X)),
    (
        "value_and_grad has_aux",
        lambda p: p.value_and_grad(has_aux=True),
        lambda f: jax.value_and_grad(f, has_aux=True),
        with_aux,
        (W, X),
    ),
    ("hessian", lambda p: p.hessian(), lambda f: jax.hessian(f), loss, (W, X)),
    ("hessian argnums=1", lambda p: p.hessian(argnums=1), lambda f: jax.hessian(f, argnums=1), loss, (W, X)),
    ("jacfwd", lambda p: p.jacfwd(), lambda f: jax.jacfwd(f), vector, (W, X)),
    ("jacrev", lambda p: p.jacrev(argnums=1), lambda f: jax.jacrev(f, argnums=1), vector, (W, X)),
    ("vmap", lambda p: p.vmap(), lambda f: jax.vmap(f), vector, (XS, XS)),
    ("vmap in_axes", lambda p: p.vmap(in_axes=(None, 0)), lambda f: jax.vmap(f, in_axes=(None, 0)), loss, (W, XS)),
    ("vmap out_axes", lambda p: p.vmap(out_axes=1), lambda f: jax.vmap(f, out_axes=1), vector, (XS, XS)),
    (
        "vmap axis_name",
        lambda p: p.vmap(in_axes=(None, 0), axis_name="batch"),
        lambda f: jax.vmap(f, in_axes=(None, 0), axis_name="batch"),
        summed,
        (W, XS),
    ),
    ("remat", lambda p: p.remat(), lambda f: jax.checkpoint(f), loss, (W, X)),
    (
        "remat policy",
        lambda p: p.remat(policy=jax.checkpoint_policies.nothing_saveable),
        lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable),
        loss,
        (W, X),
    ),
]


@pytest.mark.parametrize(("add", "compose", "fn", "args"), [s[1:] for s in STAGES], ids=[s[0] for s in STAGES])
def test_each_stage_builds_the_jax_function(add: Any, compose: Any, fn: Any, args: Any) -> None:
    assert_same(add(Pipeline(fn)), compose(fn), *args)


def test_jit_static_and_donated_arguments() -> None:
    def scaled(x: jax.Array, n: int) -> jax.Array:
        return jnp.tile(x, n)

    assert_same(Pipeline(scaled).jit(static_argnums=1), jax.jit(scaled, static_argnums=1), W, 2)
    by_name = Pipeline(scaled).jit(static_argnames="n")
    hand = jax.jit(scaled, static_argnames="n")
    np.testing.assert_array_equal(by_name(W, n=3), hand(W, n=3))
    assert by_name.build().lower(W, n=3).as_text() == hand.lower(W, n=3).as_text()
    donated = Pipeline(vector).jit(donate_argnums=0)
    hand_donated = jax.jit(vector, donate_argnums=0)
    assert donated.hlo(W, X) == hand_donated.lower(W, X).as_text()
    assert "tf.aliasing_output" in donated.hlo(W, X)  # the donation reached the program


def test_remat_under_grad_is_jax_checkpoint() -> None:
    assert_same(Pipeline(loss).remat().grad().jit(), jax.jit(jax.grad(jax.checkpoint(loss))), W, X)


def test_scan_runs_steps_with_lax_scan() -> None:
    def step(state: jax.Array, batch: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        new = state - 0.1 * jnp.mean(batch) * state
        return new, {"norm": jnp.sum(new**2)}

    @functools.wraps(step)
    def scanned(state: jax.Array, batches: jax.Array) -> Any:
        return jax.lax.scan(step, state, batches)

    assert_same(Pipeline(step).scan(4).jit(), jax.jit(scanned), W, XS)


def stacked_step(state: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    new = state - 0.1 * jnp.mean(batch["x"]) * state
    return new, {"norm": jnp.sum(new**2)}


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_scan_called_on_one_unstacked_batch_names_the_stage_the_shapes_and_the_fix(jit: bool) -> None:
    pipe = Pipeline(stacked_step).scan(3)
    pipe = pipe.jit() if jit else pipe
    batches = [{"x": jnp.full((8, 2), float(i))} for i in range(3)]
    with pytest.raises(jaxpipe.PipelineError) as caught:
        pipe(W, batches[0])  # one batch of 8 examples: lax.scan alone would run 8 steps
    message = str(caught.value)
    assert message.startswith("stage 1 (scan) of Pipeline(stacked_step).scan(steps=3)")
    assert "batches['x'] of shape (8, 2)" in message and "it would run 8 steps, not 3" in message
    assert "jax.tree.map(lambda *xs: jnp.stack(xs), *batches)" in message
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)  # the fix: leading axis 3
    want = jax.lax.scan(stacked_step, W, stacked)
    jax.tree.map(np.testing.assert_array_equal, pipe(W, stacked), want)
    with pytest.raises(jaxpipe.PipelineError, match=r"shape \(2, 8, 2\)"):
        pipe(W, jax.tree.map(lambda *xs: jnp.stack(xs), *batches[:2]))  # stacked, but 2 batches for .scan(3)


def test_debug_runs_eagerly_so_print_sees_values(capsys: pytest.CaptureFixture[str]) -> None:
    def shout(x: jax.Array) -> jax.Array:
        print("x is", x)
        return x * 2

    Pipeline(shout).jit()(jnp.array([1.0, 2.0]))
    assert "Tracer" in capsys.readouterr().out  # under jit, print sees a tracer ...
    out = Pipeline(shout).jit().debug()(jnp.array([1.0, 2.0]))
    assert capsys.readouterr().out.strip() == "x is [1. 2.]"  # ... under .debug(), the values
    np.testing.assert_array_equal(out, jnp.array([2.0, 4.0]))

    def run_eagerly(*args: Any, **kwargs: Any) -> Any:  # what explain() writes
        with jax.disable_jit():
            return jax.jit(loss)(*args, **kwargs)

    debugged = Pipeline(loss).jit().debug()
    assert debugged.explain().endswith("return jax.jit(loss)(*args, **kwargs)\n\nrun_eagerly")
    np.testing.assert_array_equal(debugged(W, X), run_eagerly(W, X))


def test_pmap_on_eight_devices_is_jax_pmap() -> None:
    assert jax.device_count() == 8
    xs = jnp.arange(24.0).reshape(8, 3)

    def total(w: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.sum(w * x), "devices")

    pipe = Pipeline(total).pmap(axis_name="devices", in_axes=(None, 0))
    hand = jax.pmap(total, axis_name="devices", in_axes=(None, 0))
    assert_same(pipe, hand, W, xs)
    assert pipe(W, xs).sharding.device_set == set(jax.devices())


# --- compositions --------------------------------------------------------------

COMPOSITIONS = [
    (
        "per-example gradients",
        lambda p: p.grad().vmap(in_axes=(None, 0)).jit(),
        lambda f: jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0))),
        loss,
        (W, XS),
    ),
    ("value_and_grad jit", lambda p: p.value_and_grad().jit(), lambda f: jax.jit(jax.value_and_grad(f)), loss, (W, X)),
    ("grad of grad", lambda p: p.grad().jacfwd(), lambda f: jax.jacfwd(jax.grad(f)), loss, (W, X)),
    ("hessian jit", lambda p: p.hessian().jit(), lambda f: jax.jit(jax.hessian(f)), loss, (W, X)),
    ("jacrev vmap", lambda p: p.jacrev().vmap(), lambda f: jax.vmap(jax.jacrev(f)), vector, (XS, XS)),
    ("jacfwd jit", lambda p: p.jacfwd(argnums=1).jit(), lambda f: jax.jit(jax.jacfwd(f, argnums=1)), vector, (W, X)),
    (
        "nested vmap",
        lambda p: p.vmap(in_axes=(None, 0)).vmap(in_axes=(None, 0)).jit(),
        lambda f: jax.jit(jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(None, 0))),
        loss,
        (W, XS.reshape(2, 2, 3)),
    ),
    (
        "aux per example",
        lambda p: p.value_and_grad(has_aux=True).vmap(in_axes=(None, 0)).jit(),
        lambda f: jax.jit(jax.vmap(jax.value_and_grad(f, has_aux=True), in_axes=(None, 0))),
        with_aux,
        (W, XS),
    ),
    (
        "remat grad vmap",
        lambda p: p.remat().grad(argnums=1).vmap(in_axes=(None, 0)).jit(),
        lambda f: jax.jit(jax.vmap(jax.grad(jax.checkpoint(f), argnums=1), in_axes=(None, 0))),
        loss,
        (W, XS),
    ),
    (
        "jit inside vmap",
        lambda p: p.jit().vmap(in_axes=(None, 0)),
        lambda f: jax.vmap(jax.jit(f), in_axes=(None, 0)),
        loss,
        (W, XS),
    ),
    (
        "named axis under grad",
        lambda p: p.grad().vmap(in_axes=(None, 0), axis_name="batch").jit(),
        lambda f: jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0), axis_name="batch")),
        summed,
        (W, XS),
    ),
]


@pytest.mark.parametrize(
    ("add", "compose", "fn", "args"), [c[1:] for c in COMPOSITIONS], ids=[c[0] for c in COMPOSITIONS]
)
def test_compositions_build_the_hand_written_jax(add: Any, compose: Any, fn: Any, args: Any) -> None:
    assert_same(add(Pipeline(fn)), compose(fn), *args)


# --- random stage sequences (hypothesis) -----------------------------------------------


@st.composite
def stage_sequences(draw: st.DrawFn) -> tuple[list[tuple[str, dict[str, Any]]], tuple[int, ...], tuple[int, ...]]:
    """Valid sequences over (w, x) -> scalar, with the batch shapes the vmaps need.

    grad and value_and_grad need a scalar output; each vmap maps x (and maybe w)
    over a new leading axis of its own size. Derivatives stop at second order
    and the sequence ends in jit, to keep the programs (and the test) small.
    """
    stages: list[tuple[str, dict[str, Any]]] = []
    scalar, order, w_batch, x_batch = True, 0, (), ()
    for _ in range(draw(st.integers(1, 4))):
        choices = ["jit", "remat", "vmap"]
        choices += ["jacfwd", "jacrev"] * (order < 2) + ["hessian"] * (order == 0)
        choices += ["grad", "value_and_grad"] * (scalar and order < 2)
        name = draw(st.sampled_from(choices))
        options: dict[str, Any] = {}
        if name in ("grad", "value_and_grad", "jacfwd", "jacrev", "hessian"):
            options["argnums"] = draw(st.sampled_from([0, 1, (0, 1)]))
            scalar, order = False, order + (2 if name == "hessian" else 1)
        elif name == "vmap":
            size = 2 + len(x_batch)
            map_w = draw(st.booleans())
            options["in_axes"] = (0 if map_w else None, 0)
            w_batch, x_batch = ((size, *w_batch) if map_w else w_batch), (size, *x_batch)
            scalar = False
        stages.append((name, options))
    if stages[-1][0] != "jit":  # run as one compiled program: eager op-by-op runs are slow to test
        stages.append(("jit", {}))
    return stages, w_batch, x_batch


HAND = {
    "jit": jax.jit,
    "remat": jax.checkpoint,
    "vmap": jax.vmap,
    "grad": jax.grad,
    "value_and_grad": jax.value_and_grad,
    "jacfwd": jax.jacfwd,
    "jacrev": jax.jacrev,
    "hessian": jax.hessian,
}


@settings(max_examples=30, deadline=None)
@given(stage_sequences())
def test_random_stage_sequences_match_hand_composition(case: Any) -> None:
    stages, w_batch, x_batch = case
    pipe, hand = Pipeline(loss), loss
    for name, options in stages:
        pipe = pipe.then(name, **options)
        hand = HAND[name](hand, **options)
    w = jnp.linspace(0.1, 0.9, int(np.prod(w_batch, dtype=int)) * 2).reshape(*w_batch, 2)
    x = jnp.linspace(-1.0, 1.0, int(np.prod(x_batch, dtype=int)) * 2).reshape(*x_batch, 2)
    assert [s.name for s in pipe.stages] == [name for name, _ in stages]
    jax.tree.map(np.testing.assert_array_equal, pipe(w, x), hand(w, x))
    assert lowered_text(pipe.build(), w, x) == lowered_text(hand, w, x)


# --- building and calling --------------------------------------------------------------


def test_build_of_a_jit_ended_pipeline_is_the_jax_jit_object() -> None:
    pipe = Pipeline(loss).grad().jit()
    built = pipe.build()
    assert type(built) is type(jax.jit(loss))
    assert built is pipe.build()  # built once, cached
    assert hasattr(built, "lower") and hasattr(built, "trace")
    assert str(built.trace(W, X).jaxpr) == str(jax.jit(jax.grad(loss)).trace(W, X).jaxpr)
    assert built.__wrapped__ is not None  # jax.jit keeps functools.wraps' __wrapped__
    np.testing.assert_array_equal(pipe(W, X), built(W, X))


def test_pipeline_call_uses_the_built_function_and_its_cache() -> None:
    traces = []

    def counted(w: jax.Array, x: jax.Array) -> jax.Array:
        traces.append(1)
        return loss(w, x)

    pipe = Pipeline(counted).grad().jit()
    for _ in range(3):
        pipe(W, X)
    assert len(traces) == 1  # one trace: every call reaches the same jax.jit cache
    pipe.build()(W, X)
    assert len(traces) == 1


def test_pipeline_of_a_pipeline_keeps_its_stages() -> None:
    inner = Pipeline(loss, name="objective").grad()
    outer = Pipeline(inner).jit()
    assert outer == Pipeline(loss).grad().jit()
    assert repr(outer) == "Pipeline(objective).grad().jit()"


def test_then_adds_stages_by_name() -> None:
    assert Pipeline(loss).then("grad").then("vmap", in_axes=(None, 0)) == Pipeline(loss).grad().vmap(in_axes=(None, 0))
    assert Pipeline(loss).then("grad", 1) == Pipeline(loss).grad(argnums=1)
    assert Pipeline(loss).then(jaxpipe.StageKind("jit", jax.jit)).stages[0].name == "jit"


# --- the value: immutability, equality, repr, explain -------------------------------


def test_stage_methods_return_new_pipelines_and_never_change_the_original() -> None:
    base = Pipeline(loss)
    graded = base.grad()
    jitted = graded.jit()
    assert base.stages == () and len(graded.stages) == 1 and len(jitted.stages) == 2
    assert graded is not base and jitted is not graded
    with pytest.raises(AttributeError, match="immutable"):
        base._stages = ()  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        base.name = "other"  # type: ignore[misc]
    assert base.stages == ()


def test_equal_pipelines_hash_equal_and_defaults_do_not_matter() -> None:
    a = Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    b = Pipeline(loss).grad(argnums=0).vmap(in_axes=(None, 0), out_axes=0).jit(static_argnums=None)
    assert a == b and hash(a) == hash(b)
    assert {a: "cached"}[b] == "cached"
    assert a != Pipeline(loss).grad().vmap(in_axes=(0, 0)).jit()
    assert a != Pipeline(vector).grad().vmap(in_axes=(None, 0)).jit()
    assert a != Pipeline(loss).grad().jit().vmap(in_axes=(None, 0))  # order matters
    assert Pipeline(loss).vmap(in_axes=[None, 0]) != Pipeline(loss).vmap(in_axes=(None, 0))  # as JAX sees them
    assert a != "Pipeline(loss)"


def test_stages_are_values() -> None:
    (stage,) = Pipeline(loss).vmap(in_axes=(None, 0)).stages
    assert isinstance(stage, Stage)
    assert stage.name == "vmap" and dict(stage.options) == {"in_axes": (None, 0)}
    assert stage.kind.jax_name == "jax.vmap"
    assert stage == Pipeline(vector).vmap(in_axes=(None, 0)).stages[0]
    assert repr(stage) == "vmap(in_axes=(None, 0))"


def test_repr_reads_as_the_fluent_code() -> None:
    pipe = Pipeline(loss).grad(argnums=1).vmap(in_axes=(None, 0)).jit(static_argnames="x")
    assert repr(pipe) == "Pipeline(loss).grad(argnums=1).vmap(in_axes=(None, 0)).jit(static_argnames='x')"
    assert repr(Pipeline(lambda x: x, name="identity").jit()) == "Pipeline(identity).jit()"
    policy = jax.checkpoint_policies.dots_saveable  # JAX's own options read as JAX's names
    assert (
        repr(Pipeline(loss).remat(policy=policy))
        == "Pipeline(loss).remat(policy=jax.checkpoint_policies.dots_saveable)"
    )


@pytest.mark.parametrize(
    ("pipe", "expected"),
    [
        (Pipeline(loss), "loss"),
        (Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit(), "jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))"),
        (
            Pipeline(loss).value_and_grad(argnums=(0, 1), has_aux=True),
            "jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)",
        ),
        (
            Pipeline(loss).remat().hessian().jit(donate_argnums=0),
            "jax.jit(jax.hessian(jax.checkpoint(loss)), donate_argnums=0)",
        ),
        (Pipeline(loss).pmap(axis_name="i"), "jax.pmap(loss, axis_name='i')"),
        (Pipeline(loss).jacfwd().jacrev(argnums=1), "jax.jacrev(jax.jacfwd(loss), argnums=1)"),
    ],
)
def test_explain_writes_the_equivalent_jax(pipe: Pipeline, expected: str) -> None:
    assert pipe.explain() == expected


@pytest.mark.parametrize(
    ("pipe", "args"),
    [
        (Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit(), (W, XS)),
        (Pipeline(loss).value_and_grad(argnums=(0, 1)).jit(donate_argnums=1), (W, X)),
        (Pipeline(loss).remat(policy=jax.checkpoint_policies.dots_saveable).hessian(), (W, X)),
    ],
    ids=["per-example", "donated", "remat policy"],
)
def test_explain_evaluates_to_the_same_program(pipe: Pipeline, args: tuple[Any, ...]) -> None:
    hand = eval(pipe.explain(), {"jax": jax, "loss": loss})  # the explanation is runnable JAX
    assert pipe.hlo(*args) == lowered_text(hand, *args)


def test_explain_of_scan_defines_the_helper_and_runs() -> None:
    def step(state: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        return state + batch, state

    text = Pipeline(step).scan(3).jit().explain()
    assert text.endswith("\n\njax.jit(scanned)")
    namespace: dict[str, Any] = {"jax": jax, "step": step}
    exec(text.rsplit("\n\n", 1)[0], namespace)  # the definitions are real Python
    out = jax.jit(namespace["scanned"])(W, XS[:3])
    jax.tree.map(np.testing.assert_array_equal, out, Pipeline(step).scan(3).jit()(W, XS[:3]))


# --- plugin stages as methods ------------------------------------------------------


def test_plugin_stages_are_methods_in_dir_and_tab_completion() -> None:
    from IPython.core.completer import Completer

    pipe = Pipeline(loss).grad().jit()
    assert "check_finite" in dir(pipe)
    assert {"jit", "grad", "vmap", "explain", "build"} <= set(dir(pipe))
    method = pipe.check_finite
    assert method.__name__ == "check_finite" and "NaN" in (method.__doc__ or "")
    assert list(__import__("inspect").signature(method).parameters) == ["inf"]
    completer = Completer(namespace={"pipe": pipe})
    assert "pipe.check_finite" in completer.attr_matches("pipe.check_")
    assert "pipe.value_and_grad" in completer.attr_matches("pipe.val")
    assert not hasattr(pipe, "no_such_stage")  # missing stages are AttributeErrors, as hasattr expects
