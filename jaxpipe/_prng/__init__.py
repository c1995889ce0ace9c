"""PRNG key derivation trees, and the keys a program reuses, read from its jaxpr.

``key_tree(f, *args)`` traces ``f(*args)`` with ``jax.make_jaxpr`` (nothing runs)
and follows every PRNG key through the program: where it comes from (an argument,
a closed-over key, ``jax.random.key``, raw ``uint32[2]`` data from
``jax.random.PRNGKey``), each ``split`` and ``fold_in``, and the draw that consumes
it, named with the user's file and line. It backs ``%prng_tree`` and the
inspector's PRNG tab.

The rule: a key is used in exactly one way -- one draw, or one split, or any
number of ``fold_in`` with distinct data. Anything else correlates random numbers:
two draws from one key are identical, ``split(key, n)[i]`` equals
``fold_in(key, i)``, and ``bits(key)[i]`` is computed from that same value. Every
break of the rule is a :class:`KeyReuse` (all of them, unlike JAX's checker, which
stops at the first and knows no legacy keys) and a :class:`KeyReuseWarning`; a
bug that repeats (on every key of a vmapped array, every loop iteration) is
reported once.

What is exact and what is assumed:

- Keys are followed element by element through indexing, slicing, reshapes,
  stacking, gathers and ``random_wrap``/``random_unwrap`` (legacy keys), and
  through ``jit``, ``custom_jvp``/``custom_vjp``, ``checkpoint`` and ``vmap``
  (batched ops are just ops on key arrays).
- An index is exact when its value is known for this call: static, or computed
  from literals, constants and the call's small integer arguments. A traced
  index picks a key assumed distinct from every other pick, except a pick with
  the same traced value: ``keys[i]`` twice is a reuse; ``keys[i]`` and
  ``keys[j]`` (or ``keys[0]``) are not reported, as they may differ.
- ``fold_in`` data counts as equal when it is the same value: the same constant,
  or the same computation of the same inputs.
- ``scan`` and ``while_loop`` bodies are followed for their first two
  iterations, which exposes a key consumed again every iteration (a carried key
  that is not split, a closed-over key, ``fold_in`` with a constant); keys
  folded with the loop index are distinct.
- ``cond`` branches are alternatives: a key used once in each branch is fine.
  (Under ``vmap`` with a batched predicate JAX runs both branches; a key drawn
  from in both is then reported.)
- A backward-pass recomputation (``jax.checkpoint`` under ``grad``) repeats the
  forward draws on purpose and is skipped; other primitives that take keys
  (``pmap``, ``shard_map`` with sharded keys, callbacks) count as one draw.

>>> import jax
>>> def noise(key):
...     k1, k2 = jax.random.split(key)
...     return jax.random.normal(k1), jax.random.uniform(k2)
>>> tree = key_tree(noise, jax.random.key(0))
>>> tree.reuses
[]
>>> [node.label for node in tree.nodes() if node.kind == "consume"]
['jax.random.normal', 'jax.random.uniform']
"""

from jaxpipe._prng.tree import KeyNode as KeyNode
from jaxpipe._prng.tree import KeyReuse as KeyReuse
from jaxpipe._prng.tree import KeyReuseWarning as KeyReuseWarning
from jaxpipe._prng.tree import KeyTree as KeyTree
from jaxpipe._prng.tree import key_tree as key_tree
