"""Pipeline specs: parsing, building, errors, limits, writing back, never evaluating."""

import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jaxpipe
from jaxpipe import Pipeline, PipelineError, StageKind
from jaxpipe._plugins import manager as _plugins
from jaxpipe._plugins import registry as _registry
from jaxpipe._tools import spec as _spec
from jaxpipe._tools.spec import SpecError


def loss(w, x):
    return jnp.sum((w * x) ** 2)


def scaled(w, x, scale=2.0):
    return jnp.sum(scale * w * x)


def save_nothing(primitive, *args, **params):
    """A remat policy written by hand: save no intermediate."""
    del primitive, args, params  # unused
    return False


class Model:
    """An object whose method is the function, and a property that raises."""

    def apply(self, w, x):
        return jnp.tanh(w * x).sum()

    @property
    def broken(self):
        raise RuntimeError("a property that fails")

    _private = staticmethod(loss)


class Trap:
    """Records every call of its code: `__call__`, `__getattr__` for names text can write, a property."""

    calls: list[str] = []

    def __call__(self, *args, **kwargs):
        Trap.calls.append("__call__")

    def __getattr__(self, name):
        if not name.startswith("__"):  # Pipeline itself reads dunder names such as __name__ of any function
            Trap.calls.append(f"__getattr__({name})")
        raise AttributeError(name)

    @property
    def prop(self):
        Trap.calls.append("prop")
        return loss

    def method(self, w, x):  # binding a method runs none of the trap's code
        Trap.calls.append("method")
        return loss(w, x)


NAMESPACE = {
    "trap": Trap(),
    "loss": loss,
    "scaled": scaled,
    "model": Model(),
    "axes": (None, 0),
    "policy": save_nothing,
    "weights": jnp.ones(3),
    "not_callable": 3,
    "_hidden": loss,
    "jnp": jnp,
}


# --- audit: the parser never evaluates ----------------------------------------------

_AUDIT: list[tuple[str, object]] | None = None
_HARMLESS = {"builtins.id", "object.__getattr__"}  # id() and inspect reading a function's __code__


def _audit(event, args):
    if _AUDIT is not None and event not in _HARMLESS:
        _AUDIT.append((event, args[1] if event == "compile" and len(args) > 1 else None))


sys.addaudithook(_audit)  # hooks cannot be removed; this one records only while _AUDIT is a list


def audited_from_spec(text, namespace=NAMESPACE):
    """from_spec, asserting it compiled nothing but the spec text into a syntax tree."""
    global _AUDIT
    _registry.registry()  # loads the plugins (module imports run code) before auditing
    _AUDIT = []
    Trap.calls.clear()
    try:
        return Pipeline.from_spec(text, namespace)
    finally:
        events, _AUDIT = _AUDIT, None
        # ast.parse is compile(..., PyCF_ONLY_AST): allowed, and only for the spec itself; nothing else
        # (no exec, open, os.system, subprocess, import) may happen.
        assert all(event == "compile" and filename == "<jaxpipe spec>" for event, filename in events), events
        assert Trap.calls == [], Trap.calls


# --- building --------------------------------------------------------------------------


def test_spec_builds_the_same_program_as_hand_written_jax():
    pipe = audited_from_spec("loss | grad | vmap(in_axes=(None, 0)) | jit")
    assert pipe == Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()
    w, xs = jnp.arange(3.0), jnp.arange(12.0).reshape(4, 3)
    by_hand = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
    np.testing.assert_allclose(pipe(w, xs), by_hand(w, xs))
    assert pipe.hlo(w, xs) == by_hand.lower(w, xs).as_text()


def test_spec_spans_lines_with_comments_names_and_attributes():
    text = """
    model.apply        # a bound method
      | grad(argnums=0)
      | vmap(in_axes=axes)
      | jit
    """
    pipe = audited_from_spec(text)
    assert pipe.stages == Pipeline(NAMESPACE["model"].apply).grad().vmap(in_axes=(None, 0)).jit().stages
    assert pipe.name == "model.apply"
    assert pipe.to_spec() == "model.apply | grad | vmap(in_axes=(None, 0)) | jit"
    w, xs = jnp.ones(3), jnp.ones((2, 3))
    np.testing.assert_allclose(pipe(w, xs), jax.vmap(jax.grad(NAMESPACE["model"].apply), in_axes=(None, 0))(w, xs))


def test_stage_arguments_are_literals_and_names():
    pipe = audited_from_spec("loss | remat(policy=policy) | grad(argnums=(0, 1), has_aux=False) | scan(3)")
    expected = Pipeline(loss).remat(policy=save_nothing).grad(argnums=(0, 1)).scan(3)
    assert pipe == expected
    assert audited_from_spec("loss | vmap(in_axes=[None, -0]) | jit(static_argnames='x')").stages == (
        Pipeline(loss).vmap(in_axes=[None, 0]).jit(static_argnames="x").stages
    )


def test_dotted_names_read_module_variables_and_methods_without_running_code():
    assert audited_from_spec("jnp.tanh | grad | jit") == Pipeline(jnp.tanh).grad().jit()
    pipe = audited_from_spec("trap.method | grad | jit")  # a bound method: binding runs nothing
    assert pipe.fn == NAMESPACE["trap"].method and Trap.calls == []
    assert _spec.static_attribute(Model, "apply") is Model.apply
    assert _spec.static_attribute(NAMESPACE["model"], "apply") == NAMESPACE["model"].apply
    obj = type("Plain", (), {})()
    obj.fn = loss  # an instance's own __dict__ entry
    assert _spec.static_attribute(obj, "fn") is loss
    with pytest.raises(AttributeError, match="customises attribute lookup"):
        _spec.static_attribute(type("Odd", (), {"__getattribute__": lambda self, name: loss})(), "fn")


def test_a_pipeline_in_the_namespace_continues_in_the_text():
    namespace = {**NAMESPACE, "per_example": Pipeline(loss).grad().vmap(in_axes=(None, 0))}
    assert audited_from_spec("per_example | jit", namespace) == Pipeline(loss).grad().vmap(in_axes=(None, 0)).jit()


def scale_output(fn, factor=2.0):
    """Multiplies the output: a throwaway plugin stage."""

    def scaled_fn(*args, **kwargs):
        return fn(*args, **kwargs) * factor

    return scaled_fn


class ScalePlugin:
    @jaxpipe.hookimpl
    def jaxpipe_register_stages(self):
        return [StageKind("scale_output", scale_output, jax_name="scale_output", keeps_signature=True)]


@pytest.fixture
def scale_plugin():
    manager = _plugins.plugin_manager()
    manager.register(ScalePlugin(), name="test-spec-scale")
    _registry.registry.cache_clear()
    yield
    manager.unregister(name="test-spec-scale")
    _registry.registry.cache_clear()


def test_plugin_stages_work_in_the_text_as_in_python(scale_plugin):
    pipe = audited_from_spec("loss | scale_output(factor=3.0) | jit")
    assert pipe == Pipeline(loss).scale_output(factor=3.0).jit()
    w = jnp.arange(3.0)
    assert float(pipe(w, w)) == pytest.approx(3.0 * float(loss(w, w)))
    assert pipe.to_spec() == "loss | scale_output(factor=3.0) | jit"


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, column, expected",
    [
        ("loss | grda | jit", 1, 8, "no stage called `grda`. Did you mean `grad`?"),
        ("los | jit", 1, 1, "name `los` is not defined. Did you mean `loss`?"),
        ("loss | grad(", 1, 13, "`(` is never closed; expected `)`"),
        ("loss |", 1, 7, "expected a stage after `|`"),
        ("loss | vmap(in_axes=(None 0))", 1, 22, "forgot a comma"),
        ("loss | vmap(in_axes=(None, 0, 0))", 1, 8, "in_axes has 3 entries but `loss` takes 2"),
        ("loss\n  | grad(f(1))", 2, 10, "only stages may be called"),
        ("loss | jax.jit", 1, 8, "a stage is a bare name"),
        ("loss | grad(*axes)", 1, 13, "`*` unpacking is not allowed"),
        ("loss | grad(**axes)", 1, 13, "`**` unpacking is not allowed"),
        ("loss | grad(argnums=x[0])", 1, 21, "indexing"),
        ("loss | grad(argnums=lambda: 0)", 1, 21, "lambda"),
        ("loss, jit", 1, 7, "expected one pipeline, found a comma"),
        ("model.broken | jit", 1, 1, "`broken` is a property of Model; reading it runs code"),
        ("exec | debug", 1, 1, "name `exec` is not defined. Python's builtins are not looked up"),
        ("loss | remat(policy=eval)", 1, 21, "name `eval` is not defined"),
        ("__builtins__.eval | jit", 1, 1, "name `__builtins__` is private"),
        ("_hidden | jit", 1, 1, "name `_hidden` is private"),
        ("trap.prop | jit", 1, 1, "`prop` is a property of Trap; reading it runs code"),
        ("trap.missing | jit", 1, 1, "has no attribute `missing` (no `__getattr__` is called)"),
        ("jnp.nonexistent_name | jit", 1, 1, "module 'jax.numpy' has no variable `nonexistent_name`"),
        ("model._private | jit", 1, 1, "private attribute `_private`"),
        ("not_callable | jit", 1, 1, "`not_callable` is not a function"),
        ("1 | jit", 1, 1, "expected the function to transform"),
        ("loss | explain", 1, 8, "no stage called `explain`"),
        ("loss | 1x", 1, 8, "invalid decimal literal"),
        ("loss | grad)", 1, 12, "`)` does not match the bracket it closes"),
        ("  # only a comment", 1, 1, "the spec is empty"),
        ("loss | vmap(in_axes={[0]: 1})", 1, 21, "dict key [0] is not hashable"),
    ],
)
def test_errors_point_at_line_and_column_and_say_what_was_expected(text, line, column, expected):
    with pytest.raises(SpecError) as caught:
        audited_from_spec(text)
    error = caught.value
    assert isinstance(error, PipelineError)
    assert (error.line, error.column) == (line, column), str(error)
    assert expected in str(error)
    assert str(error).startswith(f"line {line}, column {column}: ")
    source_line = text.split("\n")[line - 1]
    assert f"    {source_line.rstrip()}\n    {' ' * (column - 1)}^" in str(error)


def test_stage_errors_keep_the_stage_and_the_original_error():
    with pytest.raises(SpecError) as caught:
        audited_from_spec("loss | grad | vmap(in_axes=(None, 0, 0))")
    assert (caught.value.stage, caught.value.stage_name) == (2, "vmap")
    assert isinstance(caught.value.__cause__, PipelineError)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the spec is empty"),
        ("x" * (_spec.MAX_CHARS + 1), "at most 10,000 are read"),
        ("loss | vmap(in_axes=" + "(" * 25 + "0" + ",)" * 25 + ")", "at most 20 levels deep"),
        ("loss | grad(" + "(" * 300 + ")" * 300 + ")", "too many nested parentheses"),
        ("loss | grad(argnums=" + "-" * 3000 + "1)", "nested too deeply"),
        ("loss | grad(argnums=1" + "0" * 5000 + ")", "integer string conversion"),
        ("loss\x00 | jit", "null bytes"),
    ],
)
def test_size_and_nesting_are_bounded(text, expected):
    with pytest.raises(SpecError) as caught:
        audited_from_spec(text)
    assert expected in str(caught.value)


def test_a_spec_must_be_text():
    with pytest.raises(SpecError, match="a spec is a str"):
        Pipeline.from_spec(loss, NAMESPACE)  # type: ignore[arg-type]


# --- fuzzing ---------------------------------------------------------------------------------

_TOKENS = [
    "trap",
    "prop",
    "method",
    "missing",
    "exec",
    "eval",
    "open",
    "print",
    "__builtins__",
    "debug",
    "jaxpipe",
    "Pipeline",
    "loss",
    "model",
    ".",
    "apply",
    "broken",
    "_private",
    "axes",
    "not_callable",
    "weights",
    "|",
    "grad",
    "vmap",
    "jit",
    "scan",
    "remat",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    "in_axes",
    "argnums",
    "None",
    "0",
    "-1",
    "1.5",
    "'s'",
    "*",
    "**",
    "lambda",
    ":",
    "\n",
    "#",
    " ",
    "x",
    "[0]",
    "__class__",
    "\\",
    "'",
    '"',
    "1j",
    "...",
    "@",
]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join), st.text(max_size=60)))
def test_fuzzed_text_gives_a_pipeline_or_a_pipeline_error(text):
    try:
        pipe = audited_from_spec(text)
    except SpecError as error:
        if error.line is not None:  # the place shown is in the text
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            assert 1 <= error.line <= len(lines) and 1 <= error.column <= len(lines[error.line - 1]) + 1, error
        return
    except PipelineError:
        return
    assert isinstance(pipe, Pipeline)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=8).map("".join))
def test_fuzzed_run_arguments_give_a_value_or_a_spec_error_and_run_nothing(text):
    """`%%jaxpipe --run` reads its arguments with `_spec.value`: the same names, the same audit."""
    global _AUDIT
    _AUDIT = []
    Trap.calls.clear()
    try:
        _spec.value(text, NAMESPACE)
    except SpecError:
        pass
    finally:
        events, _AUDIT = _AUDIT, None
        assert all(event == "compile" and filename == "<jaxpipe spec>" for event, filename in events), events
        assert Trap.calls == [], Trap.calls


# --- writing back ----------------------------------------------------------------------------------

_STAGES = st.sampled_from(
    [
        ("grad", {}),
        ("grad", {"argnums": 1}),
        ("value_and_grad", {"has_aux": False}),
        ("vmap", {"in_axes": (None, 0)}),
        ("vmap", {"in_axes": [0, None], "out_axes": 0}),
        ("jit", {}),
        ("jit", {"static_argnames": "x", "donate_argnums": (0,)}),
        ("remat", {"policy": save_nothing}),
        ("remat", {"prevent_cse": False}),
        ("jacrev", {"argnums": -1}),
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["loss", "scaled", "model.apply"]), st.lists(_STAGES, max_size=4))
def test_to_spec_and_from_spec_round_trip(source, stages):
    pipe = Pipeline.from_spec(source, NAMESPACE)
    for name, options in stages:
        pipe = pipe.then(name, **options)
    text = pipe.to_spec(NAMESPACE)
    again = audited_from_spec(text)
    assert again == pipe
    assert again.to_spec(NAMESPACE) == text


def test_to_spec_names_values_from_the_namespace():
    policy = jax.checkpoint_policies.dots_saveable
    pipe = Pipeline(lambda w, x: loss(w, x)).remat(policy=policy).jit()
    namespace = {"my_loss": pipe.fn, "my_policy": policy}
    text = pipe.to_spec(namespace)
    assert text == "my_loss | remat(policy=my_policy) | jit"
    assert Pipeline.from_spec(text, namespace) == pipe


def test_to_spec_refuses_a_value_it_cannot_name():
    with pytest.raises(PipelineError, match="cannot write the pipeline's function, function"):
        Pipeline(lambda w: w).grad().to_spec()
    with pytest.raises(PipelineError, match="cannot write option `policy` of stage `remat`"):
        Pipeline(loss).remat(policy=jax.checkpoint_policies.dots_saveable).to_spec()


# --- reading names statically: no __class__ property, no metaclass __getattribute__ ---------


class Recording(type):
    """A metaclass whose `__getattribute__` records each read of a class attribute."""

    calls: list[str] = []

    def __getattribute__(cls, name):
        Recording.calls.append(f"metaclass __getattribute__({name})")
        return super().__getattribute__(name)


class Disguised(metaclass=Recording):
    """Its `__class__` is a property (read by `isinstance` when the real type does not match)."""

    @property
    def __class__(self):
        Recording.calls.append("__class__")
        return Model

    def __call__(self, w, x):
        return loss(w, x)

    def method(self, w, x):
        return loss(w, x)

    helper = staticmethod(loss)


DISGUISED = {"disguised": Disguised(), "Disguised": Disguised, "loss": loss}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("disguised.method", lambda: DISGUISED["disguised"].method),
        ("disguised.helper", lambda: loss),
        ("disguised", lambda: DISGUISED["disguised"]),
    ],
)
def test_resolving_a_name_reads_no_class_property_and_no_metaclass_lookup(text, expected):
    Recording.calls.clear()
    assert _spec.value(text, DISGUISED) == expected()
    pipe = Pipeline.from_spec(text, DISGUISED)
    assert pipe.fn == expected() and pipe.stages == ()
    assert Recording.calls == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("disguised.missing", "has no attribute `missing` (no `__getattr__` is called)"),
        ("Disguised.helper", "Recording customises attribute lookup"),
    ],
)
def test_names_behind_a_disguise_are_refused_without_running_it(text, expected):
    Recording.calls.clear()
    with pytest.raises(SpecError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Pipeline.from_spec(text, DISGUISED)
    assert Recording.calls == []
