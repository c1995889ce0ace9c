"""The PRNG key tree (``jaxpipe._prng``) and ``%prng_tree``.

Correct programs must give no warning and ``reuses == []``; each planted reuse
must be reported with its kind, the key's path and the two places (file:line,
found by the ``# marker`` comments below). JAX's own key-reuse checker
(typed keys only, stops at the first reuse) cross-checks the verdicts it can make.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from IPython.core.interactiveshell import InteractiveShell

from jaxpipe import Pipeline, PipelineError
from jaxpipe._prng import KeyReuseWarning, KeyTree, key_tree

KEY_MAKERS = pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "legacy"])


@functools.cache
def _lines() -> list[str]:
    with open(__file__) as f:
        return f.read().splitlines()


def at(marker: str) -> str:
    """``test_prng.py:N`` for the line ending in ``# marker``."""
    (number,) = [i for i, text in enumerate(_lines(), 1) if text.rstrip().endswith(f"# {marker}")]
    return f"test_prng.py:{number}"


def quiet_tree(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> KeyTree:
    """The tree of a correct program: no warning, no finding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeyReuseWarning)
        tree = key_tree(fn, *args, **kwargs)
    assert tree.reuses == []
    return tree


def flagged_tree(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> KeyTree:
    """The tree of a program with reuse: one warning per finding."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tree = key_tree(fn, *args, **kwargs)
    warned = [w for w in record if issubclass(w.category, KeyReuseWarning)]
    assert tree.reuses and len(warned) == len(tree.reuses)
    for warning, reuse in zip(warned, tree.reuses, strict=True):
        assert reuse.message in str(warning.message)
    return tree


def jax_checker_flags(fn: Callable[..., Any], *args: Any) -> bool:
    try:
        with jax.debug_key_reuse(True):
            jax.jit(fn).trace(*args)
    except jax.errors.KeyReuseError:
        return True
    return False


# --- correct programs --------------------------------------------------------------------


def split_halves(key):
    k1, k2 = jax.random.split(key)  # halves-split
    a = jax.random.normal(k1, (3,))  # halves-normal
    b = jax.random.uniform(k2, (3,))  # halves-uniform
    return a, b


def split_indexed(key):
    keys = jax.random.split(key, 4)
    return [jax.random.normal(keys[i]) for i in range(4)]


def fold_in_python_loop(key):
    return [jax.random.normal(jax.random.fold_in(key, i)) for i in range(3)]


def fold_in_fori(key):
    return jax.lax.fori_loop(0, 5, lambda i, acc: acc + jax.random.normal(jax.random.fold_in(key, i)), 0.0)


def fold_in_while(key, n):
    return jax.lax.fori_loop(0, n, lambda i, acc: acc + jax.random.normal(jax.random.fold_in(key, i)), 0.0)


def scan_split_carry(key):
    def step(k, _):
        k, sub = jax.random.split(k)
        return k, jax.random.normal(sub)

    return jax.lax.scan(step, key, None, length=8)


def scan_over_keys(key):
    return jax.lax.scan(lambda acc, k: (acc + jax.random.normal(k), None), 0.0, jax.random.split(key, 6))


def vmap_split(key):
    return jax.vmap(lambda k: jax.random.normal(k, (2,)))(jax.random.split(key, 8))


def vmap_fold_in(key):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i)))(jnp.arange(4))


def cond_branches(key, flag):
    return jax.lax.cond(flag, lambda k: jax.random.normal(k), lambda k: jax.random.uniform(k), key)


@jax.jit
def jitted_draw(key):
    return jax.random.normal(key, (2,))  # jitted-draw


def calls_jit(key):
    k1, k2 = jax.random.split(key)
    return jitted_draw(k1) + jitted_draw(k2)


def remat_under_grad(key, x):
    noisy = jax.checkpoint(lambda k, x: jnp.sum(x * jax.random.normal(k, x.shape)))
    return jax.grad(noisy, argnums=1)(key, x)


def state_step(state):
    key, dropout = jax.random.split(state["key"])
    return {"key": key, "w": state["w"] * jax.random.bernoulli(dropout, 0.5, state["w"].shape)}


def library_draws(key):
    k1, k2 = jax.random.split(key)
    return jax.random.permutation(k1, 5), jax.random.categorical(k2, jnp.zeros(3))


def traced_indexes(key, x):
    keys = jax.random.split(key, 4)
    i, j = jnp.argmax(x), jnp.argmin(x)  # different traced indexes are assumed to pick different keys
    return jax.random.normal(keys[i]) + jax.random.normal(keys[j])


def fori_over_keys(key, n):
    keys = jax.random.split(key, 8)
    return jax.lax.fori_loop(0, n, lambda i, acc: acc + jax.random.normal(keys[i]), 0.0)


def wrap_unwrap(key):
    data = jax.random.key_data(jax.random.split(key, 2))
    return jax.random.normal(jax.random.wrap_key_data(data[0])), jax.random.normal(jax.random.wrap_key_data(data[1]))


# (function, extra arguments, whether JAX's checker can judge it)
CORRECT = [
    (split_halves, (), True),
    (split_indexed, (), True),
    (fold_in_python_loop, (), True),
    (fold_in_fori, (), True),
    (fold_in_while, (jnp.int32(4),), True),
    (scan_split_carry, (), True),
    (scan_over_keys, (), True),
    (vmap_split, (), True),
    (vmap_fold_in, (), True),
    (cond_branches, (jnp.bool_(True),), True),
    (calls_jit, (), True),
    (remat_under_grad, (jnp.ones(3),), True),
    (library_draws, (), True),
    (traced_indexes, (jnp.arange(4.0),), False),  # JAX counts any dynamic index as using the whole array
    (fori_over_keys, (jnp.int32(8),), False),
    (wrap_unwrap, (), True),
]


@KEY_MAKERS
@pytest.mark.parametrize(("fn", "extra", "jax_judges"), CORRECT, ids=[c[0].__name__ for c in CORRECT])
def test_correct_programs_are_silent(make_key, fn, extra, jax_judges):
    del jax_judges  # for test_agrees_with_jax_key_reuse_checker
    tree = quiet_tree(fn, make_key(0), *extra)
    assert [root.label for root in tree.roots] == ["key"]
    assert any(node.kind == "consume" for node in tree.nodes())


def test_pytree_argument_is_named_by_its_path():
    tree = quiet_tree(state_step, {"key": jax.random.key(0), "w": jnp.ones(3)})
    assert [root.label for root in tree.roots] == ["state['key']"]
    (split,) = tree.roots[0].children
    assert [child.returned for child in split.children] == [True, False]
    assert split.children[1].children[0].label == "jax.random.bernoulli"


def test_text_tree_of_a_split():
    tree = quiet_tree(split_halves, jax.random.key(0))
    assert str(tree) == "\n".join(
        [
            "PRNG keys of split_halves: 1 root, 2 draws, no reuse",
            "key argument",
            f"└─ split(2) at {at('halves-split')}",
            f"   ├─ [0] → jax.random.normal at {at('halves-normal')}",
            f"   └─ [1] → jax.random.uniform at {at('halves-uniform')}",
        ]
    )
    root = tree.roots[0]
    assert [n.kind for n in tree.nodes()] == ["root", "split", "index", "consume", "index", "consume"]
    assert root.children[0].children[1].children[0].location == at("halves-uniform")
    assert root.children[0].children[1].path == "key → split(2)[1]"


def test_fold_in_loop_tree_names_the_iterations():
    tree = quiet_tree(fold_in_fori, jax.random.key(0))
    folds = [n for n in tree.nodes() if n.kind == "fold_in"]
    assert [n.label for n in folds] == ["fold_in(0)", "fold_in(1)"]
    assert folds[1].note.startswith("2nd iteration of jax.lax.fori_loop")


def test_draws_inside_jit_name_the_helper_line():
    tree = quiet_tree(calls_jit, jax.random.key(0))
    draws = [n for n in tree.nodes() if n.kind == "consume"]
    assert [(n.label, n.location) for n in draws] == [("jax.random.normal", at("jitted-draw"))] * 2


def test_vmapped_draws_are_grouped_in_the_text():
    tree = quiet_tree(vmap_split, jax.random.key(0))
    assert "[0] … [7] (8 keys) → jax.random.normal" in str(tree)
    assert sum(n.kind == "consume" for n in tree.nodes()) == 8


# --- planted reuse -----------------------------------------------------------------------


def draw_twice(key):
    a = jax.random.normal(key)  # twice-1
    b = jax.random.uniform(key)  # twice-2
    return a + b


def subkey_twice(key):
    keys = jax.random.split(key, 3)
    a = jax.random.normal(keys[1])  # subkey-1
    b = jax.random.normal(keys[1])  # subkey-2
    return a + b + jax.random.normal(keys[0]) + jax.random.normal(keys[2])


def used_after_split(key):
    k1, k2 = jax.random.split(key)  # after-split-1
    a = jax.random.normal(k1) + jax.random.normal(k2)
    return a + jax.random.normal(key)  # after-split-2


def split_after_use(key):
    a = jax.random.normal(key)  # split-after-1
    k1, k2 = jax.random.split(key)  # split-after-2
    return a + jax.random.normal(k1) + jax.random.normal(k2)


def split_twice(key):
    k1, _ = jax.random.split(key)  # split-twice-1
    _, k2 = jax.random.split(key)  # split-twice-2
    return jax.random.normal(k1) + jax.random.normal(k2)


def same_fold_in(key):
    a = jax.random.normal(jax.random.fold_in(key, 7))  # fold-1
    b = jax.random.normal(jax.random.fold_in(key, 7))  # fold-2
    return a + b


def fold_in_after_split(key):
    k1, k2 = jax.random.split(key)  # mixed-1
    k3 = jax.random.fold_in(key, 1)  # equals k2 # mixed-2
    return jax.random.normal(k1) + jax.random.normal(k2) + jax.random.normal(k3)


def carried_key_not_split(key):
    def step(k, _):
        return k, jax.random.normal(k)  # carried

    return jax.lax.scan(step, key, None, length=4)  # carried-scan


def closed_over_in_fori(key):
    return jax.lax.fori_loop(0, 3, lambda i, acc: acc + jax.random.normal(key), 0.0)  # closed-over


def constant_fold_in_loop(key):
    return jax.lax.fori_loop(0, 3, lambda i, acc: acc + jax.random.normal(jax.random.fold_in(key, 3)), 0.0)  # const


def cond_then_outside(key, flag):
    a = jax.lax.cond(flag, lambda k: jax.random.normal(k), lambda k: 0.0, key)  # cond-1
    return a + jax.random.uniform(key)  # cond-2


def jit_then_outside(key):
    return jitted_draw(key) + jax.random.normal(key)  # jit-outside


def stacked_copies(key):
    return jax.vmap(jax.random.normal)(jnp.stack([key, key]))  # stacked


def traced_index_twice(key, x):
    keys = jax.random.split(key, 4)
    i = jnp.argmax(x)
    return jax.random.normal(keys[i]) + jax.random.uniform(keys[i])  # traced-twice


def normal(where: str) -> str:
    return f"jax.random.normal at {at(where)}"


# (function, extra args, kind, path, places, whether JAX's checker can judge it)
PLANTED = [
    (draw_twice, (), "consumed twice", "key", (normal("twice-1"), f"jax.random.uniform at {at('twice-2')}"), True),
    (subkey_twice, (), "consumed twice", "key → split(3)[1]", (normal("subkey-1"), normal("subkey-2")), True),
    (
        used_after_split,
        (),
        "consumed after split",
        "key",
        (f"jax.random.split at {at('after-split-1')}", normal("after-split-2")),
        True,
    ),
    (
        split_after_use,
        (),
        "split after use",
        "key",
        (normal("split-after-1"), f"jax.random.split at {at('split-after-2')}"),
        True,
    ),
    (
        split_twice,
        (),
        "split twice",
        "key",
        (f"jax.random.split at {at('split-twice-1')}", f"jax.random.split at {at('split-twice-2')}"),
        True,
    ),
    (same_fold_in, (), "consumed twice", "key → fold_in(7)", (normal("fold-1"), normal("fold-2")), False),
    (
        fold_in_after_split,
        (),
        "folded after use",
        "key",
        (f"jax.random.split at {at('mixed-1')}", f"jax.random.fold_in at {at('mixed-2')}"),
        False,
    ),
    (
        carried_key_not_split,
        (),
        "consumed twice",
        "key",
        (normal("carried"), f"{normal('carried')} (2nd iteration of jax.lax.scan at {at('carried-scan')})"),
        True,
    ),
    (
        closed_over_in_fori,
        (),
        "consumed twice",
        "key",
        (normal("closed-over"), f"{normal('closed-over')} (2nd iteration of jax.lax.fori_loop at {at('closed-over')})"),
        True,
    ),
    (
        constant_fold_in_loop,
        (),
        "consumed twice",
        "key → fold_in(3)",
        (normal("const"), f"{normal('const')} (2nd iteration of jax.lax.fori_loop at {at('const')})"),
        False,
    ),
    (
        cond_then_outside,
        (jnp.bool_(True),),
        "consumed twice",
        "key",
        (normal("cond-1"), f"jax.random.uniform at {at('cond-2')}"),
        True,
    ),
    (jit_then_outside, (), "consumed twice", "key", (f"{normal('jitted-draw')}", normal("jit-outside")), True),
    (stacked_copies, (), "consumed twice", "key", (normal("stacked"), f"{normal('stacked')} again"), False),
    (
        traced_index_twice,
        (jnp.arange(4.0),),
        "consumed twice",
        "key → split(4)[traced index]",
        (normal("traced-twice"), f"jax.random.uniform at {at('traced-twice')}"),
        True,
    ),
]


@KEY_MAKERS
@pytest.mark.parametrize(
    ("fn", "extra", "kind", "path", "places", "jax_judges"), PLANTED, ids=[p[0].__name__ for p in PLANTED]
)
def test_planted_reuse_is_flagged_at_its_place(make_key, fn, extra, kind, path, places, jax_judges):
    del jax_judges  # for test_agrees_with_jax_key_reuse_checker
    tree = flagged_tree(fn, make_key(0), *extra)
    assert [(r.kind, r.path, r.places) for r in tree.reuses] == [(kind, path, places)]
    assert "⚠" in str(tree) and kind in str(tree)


def test_warning_points_at_the_second_use():
    with pytest.warns(KeyReuseWarning, match=r"`key → split\(3\)\[1\]` is drawn from twice") as record:
        key_tree(subkey_twice, jax.random.key(0))
    (warning,) = [w for w in record if w.category is KeyReuseWarning]
    assert (warning.filename, f"test_prng.py:{warning.lineno}") == (__file__, at("subkey-2"))


def test_every_reuse_is_reported_not_just_the_first():
    def three_reuses(key):
        a = jax.random.normal(key) + jax.random.normal(key)
        keys = jax.random.split(key, 2)
        return a + jax.random.normal(keys[0]) + jax.random.normal(keys[0])

    tree = flagged_tree(three_reuses, jax.random.key(0))
    assert [r.kind for r in tree.reuses] == ["consumed twice", "split after use", "consumed twice"]
    assert [r.path for r in tree.reuses] == ["key", "key", "key → split(2)[0]"]


@KEY_MAKERS
def test_the_same_key_passed_twice_is_one_root(make_key):
    tree = flagged_tree(lambda a, b: jax.random.normal(a) + jax.random.normal(b), make_key(1), make_key(1))
    assert [root.label for root in tree.roots] == ["a"]
    assert tree.reuses[0].kind == "consumed twice"


def test_the_same_seed_inside_is_one_key():
    tree = flagged_tree(lambda: jax.random.normal(jax.random.key(0)) + jax.random.uniform(jax.random.key(0)))
    assert [root.label for root in tree.roots] == ["jax.random.key(0)"]


def test_a_closed_over_key_is_a_root():
    outer = jax.random.key(5)
    tree = flagged_tree(lambda x: x + jax.random.normal(outer) + jax.random.uniform(outer), jnp.float32(1.0))
    assert [(root.label, root.detail) for root in tree.roots] == [("key", "closed over")]


def test_pipeline_is_traced_through_its_stages():
    pipe = Pipeline(lambda k, x: x * jax.random.normal(k, x.shape)).vmap(in_axes=(0, None)).jit()
    tree = quiet_tree(pipe, jax.random.split(jax.random.key(0), 3), jnp.ones(2))
    assert [root.label for root in tree.roots] == ["k[0]", "k[1]", "k[2]"]
    assert tree.name == repr(pipe)
    tree = flagged_tree(Pipeline(draw_twice).jit(), jax.random.key(0))
    assert [(r.kind, r.places[1]) for r in tree.reuses] == [
        ("consumed twice", f"jax.random.uniform at {at('twice-2')}")
    ]


def test_agrees_with_jax_key_reuse_checker():
    judged = [(fn, extra) for fn, extra, jax_judges in CORRECT if jax_judges]
    judged += [(fn, extra) for fn, extra, *_, jax_judges in PLANTED if jax_judges]
    for fn, extra in judged:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeyReuseWarning)
            ours = bool(key_tree(fn, jax.random.key(0), *extra).reuses)
        assert ours == jax_checker_flags(fn, jax.random.key(0), *extra), fn.__name__


def test_not_a_function():
    with pytest.raises(PipelineError, match=r"`key_tree` needs a function"):
        key_tree(jax.random.key(0))  # type: ignore[arg-type]


def test_the_rule_is_grounded_in_how_jax_derives_keys():
    # why a key may be split once or folded, not both: split(key, n)[i] is fold_in(key, i),
    # and a draw's bits are made from those same values
    @jax.jit
    def derived(key):
        folded = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4)))
        return jax.random.key_data(jax.random.split(key, 4)), folded, jax.random.bits(key, (4,))

    split, folded, bits = derived(jax.random.key(42))
    assert (split == folded).all()
    assert (bits == folded[:, 0] ^ folded[:, 1]).all()


def test_a_long_python_loop_of_splits_is_drawn_and_cut():
    def chain(key):
        total = 0.0
        for _ in range(400):
            key, sub = jax.random.split(key)
            total += jax.random.normal(sub)
        return total

    tree = quiet_tree(chain, jax.random.key(0))
    lines = str(tree).splitlines()
    assert len(lines) == 402 and lines[-1] == "… (cut at 400 lines)"
    assert lines[399].index("─") > 300  # nested, not flattened
    page = tree._repr_html_()
    assert page.count("<ul") == page.count("</ul>") and page.count("<li") == page.count("</li>")


def test_html_escapes_user_strings():
    def draw(**rngs):
        return jax.random.normal(rngs["<b>x</b>"])

    draw.__name__ = "<script>alert(1)</script>"
    page = quiet_tree(draw, **{"<b>x</b>": jax.random.key(0)})._repr_html_()
    assert "<script>" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert page.count("<li") == page.count("</li>") == 1 and "jax.random.normal" in page


# --- Flax --------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(8)(x))  # mlp-dense
        x = nn.Dropout(0.5, deterministic=not train)(x)  # mlp-dropout
        x = nn.Dense(8, kernel_init=nn.initializers.normal(0.1))(x)
        return nn.Dense(2, name="head")(x)


class Noisy(nn.Module):
    @nn.compact
    def __call__(self, x):
        rng = self.make_rng("noise")
        return x + jax.random.normal(rng, x.shape) + jax.random.normal(rng, x.shape)  # noisy


def test_flax_init_is_silent_and_names_initializers():
    tree = quiet_tree(MLP().init, jax.random.key(0), jnp.ones((2, 3)))
    draws = [(n.label, n.detail, n.location) for n in tree.nodes() if n.kind == "consume"]
    assert draws[0] == (
        "jax.random.truncated_normal",
        "via jax.nn.initializers.variance_scaling in MLP/Dense_0 (kernel)",
        at("mlp-dense"),
    )
    assert [d[:2] for d in draws[1:]] == [
        ("jax.random.normal", "via jax.nn.initializers.normal in MLP/Dense_1 (kernel)"),
        ("jax.random.truncated_normal", "via jax.nn.initializers.variance_scaling in MLP/head (kernel)"),
    ]


def test_flax_dropout_in_apply_and_per_example_grads():
    model = MLP()
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((2, 3)))  # one compile, not one per op

    def loss(params, key, x):
        return jnp.sum(model.apply(params, x, train=True, rngs={"dropout": key}))

    tree = quiet_tree(
        lambda p, k, x: model.apply(p, x, train=True, rngs={"dropout": k}), params, jax.random.key(1), jnp.ones((2, 3))
    )
    (draw,) = [n for n in tree.nodes() if n.kind == "consume"]
    assert (draw.label, draw.detail, draw.location) == ("jax.random.bernoulli", "in MLP/Dropout_0", at("mlp-dropout"))
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
    tree = quiet_tree(per_example, params, jax.random.split(jax.random.key(2), 4), jnp.ones((4, 2, 3)))
    assert sum(n.kind == "consume" for n in tree.nodes()) == 4


def test_flax_module_drawing_twice_from_one_rng_is_flagged():
    tree = flagged_tree(lambda k, x: Noisy().apply({}, x, rngs={"noise": k}), jax.random.key(0), jnp.ones(3))
    (reuse,) = tree.reuses
    assert reuse.kind == "consumed twice" and reuse.path.startswith("k → fold_in(")
    assert reuse.places[0].startswith(f"jax.random.normal at {at('noisy')}")


# --- %prng_tree --------------------------------------------------------------------------


@pytest.fixture
def shell():
    shell = InteractiveShell.instance()
    assert shell.run_cell("%load_ext jaxpipe").success
    yield shell
    shell.run_cell("%unload_ext jaxpipe")


def test_magic_returns_the_tree_and_shows_each_reuse_once(shell, capsys):
    assert shell.run_cell(
        "import jax\n"
        "def twice(key):\n"
        "    return jax.random.normal(key) + jax.random.uniform(key)\n"
        "key = jax.random.key(0)\n"
    ).success
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = shell.run_cell("tree = %prng_tree -o twice(key)")
    assert result.success, result.error_in_exec
    tree = shell.user_ns["tree"]
    assert isinstance(tree, KeyTree) and [r.kind for r in tree.reuses] == ["consumed twice"]
    cell = tree.reuses[0].places[0].rsplit(" at ", 1)[1]
    assert cell.endswith(":3") and tree.reuses[0].places[1].endswith(":3")
    assert [w for w in record if w.category is KeyReuseWarning] == []  # the tree shown lists it: said once
    out = capsys.readouterr().out
    assert str(tree) in out and out.count(tree.reuses[0].message) == 1


def test_magic_on_a_correct_call_is_silent(shell, capsys):
    shell.user_ns.update(split_halves=split_halves, key=jax.random.PRNGKey(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeyReuseWarning)
        result = shell.run_cell("%prng_tree split_halves(key)")
    assert result.success and result.result is None
    assert "PRNG keys of split_halves: 1 root, 2 draws, no reuse" in capsys.readouterr().out
