"""The abstract interpretation of a jaxpr that follows every PRNG key element by element."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxpipe._prng.nodes import KeyNode, KeyReuse
from jaxpipe._prng.rules import CALLS, FOLDABLE, IDENTITY, MOVES, numpy_op, operand_roles
from jaxpipe._prng.source import api_name, file_label, flax_param, library_dirs
from jaxpipe._prng.uses import ADVICE, REUSE_KINDS, Use, Where, impl_name, index_text, iteration_note
from jaxpipe._prng.values import Abs, Context, Elem, key_elements

_MAX_CONCRETE = 4096  # elements: larger integer data is followed by identity, not value


# --- the analysis ------------------------------------------------------------------------


class Analysis:
    """An abstract interpreter of a jaxpr over :class:`Abs` values."""

    def __init__(self) -> None:
        self.roots: list[KeyNode] = []
        self.reuses: list[KeyReuse] = []
        self.reuse_places: list[tuple[str | None, int | None]] = []
        self._tokens: dict[Any, int] = {}
        self._fresh = itertools.count(-1, -1)  # tokens no computation can repeat
        self._conds = itertools.count()
        self._labels: dict[int, str] = {}  # token -> argument path
        self._data_labels: dict[bytes, str] = {}  # raw key data -> argument path
        self._memo: dict[Any, KeyNode] = {}  # roots and traced-index picks, by identity
        self._consts: dict[int, Abs] = {}
        self._reported: set[tuple[Any, ...]] = set()
        self._libraries = library_dirs()

    # tokens

    def token(self, key: Any) -> int:
        return self._tokens.setdefault(key, len(self._tokens))

    def fresh(self, keys: np.ndarray | None = None) -> Abs:
        return Abs(next(self._fresh), keys=keys)

    def value(self, array: Any) -> Abs:
        dtype, size = getattr(array, "dtype", None), getattr(array, "size", 1)
        if (dtype is not None and (_is_key_dtype(dtype) or np.dtype(dtype).kind not in "biu")) or size > _MAX_CONCRETE:
            return self.fresh()  # checked before np.asarray: never copy big (device) arrays to the host
        array = np.asarray(array)
        if array.dtype.kind not in "biu":
            return self.fresh()
        return Abs(self.token(("v", array.dtype.str, array.shape, array.tobytes())), value=array)

    def element_token(self, a: Abs, shape: tuple[int, ...], flat: int) -> int:
        if a.value is not None:
            return self.value(a.value.reshape(-1)[flat]).token
        if a.uniform is not None:
            return a.uniform
        return a.token if not shape else self.token(("element", a.token, flat))

    # inputs

    def argument(self, path: str, value: Any, aval: Any) -> Abs:
        if _is_key(aval):
            return Abs(self.token(("arg", path)), keys=self._key_roots(value, path, "argument"))
        a = self.value(value)
        if a.value is None:
            a = Abs(self.token(("arg", path)))
            self._labels[a.token] = path
        elif a.value.dtype == np.uint32 and a.value.ndim and a.value.shape[-1] == 2:
            rows = a.value.reshape(-1, 2)
            for i, row in enumerate(rows):
                index = np.unravel_index(i, a.value.shape[:-1]) if a.value.ndim > 1 else ()
                self._data_labels.setdefault(row.tobytes(), path + index_text(index))
        return a

    def const(self, value: Any) -> Abs:
        known = self._consts.get(id(value))
        if known is None:
            aval = jax.typeof(value) if isinstance(value, jax.Array) else None
            if aval is not None and _is_key(aval):
                known = Abs(self.token(("const", id(value))), keys=self._key_roots(value, "key", "closed over"))
            else:
                known = self.value(value)
                if known.value is None:
                    known = Abs(self.token(("const", id(value))))
            self._consts[id(value)] = known
        return known

    def _key_roots(self, keys: Any, path: str, detail: str) -> Any:
        data = np.asarray(jax.random.key_data(keys)).reshape(int(np.prod(keys.shape, dtype=int)), -1)
        impl = str(jax.random.key_impl(keys))
        out = np.empty(keys.shape, object)
        for i, row in enumerate(data):
            index = np.unravel_index(i, keys.shape) if keys.shape else ()
            node = self._root(("data", impl, row.tobytes()), path + index_text(index), detail)
            out[index] = Elem([(node, frozenset())])
        return out

    def _root(self, memo: Any, label: str, detail: str = "", where: Where | None = None, note: str = "") -> KeyNode:
        node = self._memo.get(memo)
        if node is None:
            node = KeyNode("root", label, detail, where.location if where else None, note)
            self._memo[memo] = node
            self.roots.append(node)
        return node

    # running jaxprs

    def call(self, closed: Any, args: list[Abs], ctx: Context) -> list[Abs]:
        consts = [self.const(c) for c in getattr(closed, "consts", ())]
        return self.run(getattr(closed, "jaxpr", closed), consts, args, ctx)

    def run(self, jaxpr: Any, consts: list[Abs], args: list[Abs], ctx: Context) -> list[Abs]:
        import jax.extend.core  # here, not at module top: it costs `import jaxpipe` about 20 ms

        env: dict[Any, Abs] = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))

        def read(var: Any) -> Abs:
            if isinstance(var, jax.extend.core.Literal):
                return self.value(np.asarray(var.val, dtype=getattr(var.aval, "dtype", None)))
            return env[var] if var in env else self.fresh()

        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars], ctx.enter(eqn))
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        name = eqn.primitive.name
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(self, eqn, ins, ctx)
        if name in CALLS:
            return self.call_like(eqn, ins, ctx)
        in_avals = [v.aval for v in eqn.invars]
        if name in IDENTITY or (name == "convert_element_type" and in_avals[0].dtype == eqn.outvars[0].aval.dtype):
            return list(ins)
        if name in MOVES and any(a.keys is not None for a in ins):
            return self.move(eqn, ins, ctx)
        if any(_is_key(aval) for aval in in_avals):
            if name not in ("eq", "ne"):  # comparing keys draws nothing
                self.consume_all(eqn, ins, ctx, f"{name} (not analysed)")
            return [self.fresh() for _ in eqn.outvars]
        return self.data(eqn, ins)

    def data(self, eqn: Any, ins: list[Abs]) -> list[Abs]:
        """Value numbering, and exact values for small integer computations."""
        import jax.extend.core

        name, outs = eqn.primitive.name, eqn.outvars
        if eqn.effects or any(True for _ in jax.extend.core.jaxprs_in_params(eqn.params)):
            return [self.fresh() for _ in outs]
        if name in FOLDABLE and all(a.value is not None for a in ins) and all(_small_int(v.aval) for v in outs):
            values = numpy_op(eqn, [a.value for a in ins])
            if values is not None and all(np.shape(x) == v.aval.shape for x, v in zip(values, outs, strict=True)):
                return [self.value(np.asarray(x, dtype=v.aval.dtype)) for x, v in zip(values, outs, strict=True)]
        try:
            params = tuple(sorted((k, v) for k, v in eqn.params.items()))
            hash(params)
        except TypeError:
            return [self.fresh() for _ in outs]
        computed = (name, params, tuple(a.token for a in ins))
        result = [Abs(self.token((*computed, i))) for i in range(len(outs))]
        if name == "broadcast_in_dim" and not eqn.invars[0].aval.shape:
            result[0].uniform = ins[0].token
        return result

    # keys: where they come from

    def seed(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        where, (seeds,) = self.where(ctx), ins
        impl = impl_name(eqn.params["impl"])
        shape = eqn.invars[0].aval.shape
        out = np.empty(shape, object)
        for flat, index in enumerate(np.ndindex(shape)):
            seed = seeds.value.reshape(-1)[flat] if seeds.value is not None else None
            label = f"{where.api or 'jax.random.key'}({'…' if seed is None else int(seed)})"
            memo = ("seed", impl, self.element_token(seeds, shape, flat))
            out[index] = Elem([(self._root(memo, label, "", where, ctx.note), frozenset())])
        return [Abs(next(self._fresh), keys=out)]

    def wrap(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        """``random_wrap``: raw key data (legacy keys) becomes a typed key."""
        (data,), shape = ins, eqn.outvars[0].aval.shape
        impl = impl_name(eqn.params["impl"])
        out = np.empty(shape, object)
        for flat, index in enumerate(np.ndindex(shape)):
            elem = data.keys[index] if data.keys is not None else None
            if elem is None:
                elem = Elem([(self._data_root(data, shape, index, flat, impl, ctx), frozenset())])
            out[index] = elem
        return [Abs(next(self._fresh), keys=out)]

    def _data_root(
        self, data: Abs, shape: tuple[int, ...], index: tuple[int, ...], flat: int, impl: str, ctx: Context
    ) -> KeyNode:
        if data.value is not None:
            raw = data.value.reshape(int(np.prod(shape, dtype=int)), -1)[flat].tobytes()
            label = self._data_labels.get(raw)
            if label is not None:
                return self._root(("data", impl, raw), label, "argument (legacy key data)")
            memo: Any = ("data", impl, raw)
        else:
            memo = ("data", impl, self.element_token(data, shape, flat))
            if data.token in self._labels:
                label = self._labels[data.token] + index_text(index)
                return self._root(memo, label, "argument (legacy key data)")
        where = self.where(ctx)
        return self._root(memo, "key data", f"wrapped by {where.api or 'random_wrap'}", where, ctx.note)

    def unwrap(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        return [Abs(next(self._fresh), keys=ins[0].keys)]

    def clone(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        """``jax.random.clone`` opts out of reuse checks: each clone is a new root."""
        where, keys = self.where(ctx), _keys(ins[0], eqn.invars[0].aval)  # typed keys, or raw data
        out = np.empty(keys.shape, object)
        for index in np.ndindex(keys.shape):
            elem = keys[index]
            path = elem.alts[0][0].path if elem is not None else "a key"
            out[index] = Elem([(self._root(object(), "jax.random.clone", f"of {path}", where, ctx.note), frozenset())])
        return [Abs(next(self._fresh), keys=out)]

    # keys: how they are used

    def split(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        where, shape = self.where(ctx), tuple(eqn.params["shape"])
        keys = _keys(ins[0], eqn.invars[0].aval)
        size = int(np.prod(shape, dtype=int))
        label = f"split({size if len(shape) == 1 else shape})"
        detail = "" if where.api in (None, "jax.random.split") else f"inside {where.api}"
        out = np.empty(keys.shape + shape, object)
        for index in np.ndindex(keys.shape):
            elem = keys[index]
            children = np.empty(shape, object)
            if elem is not None:
                parts = []
                for node, tag in elem.alts:
                    split = KeyNode("split", label, detail, where.location, ctx.note)
                    self.use(node, Use("split", where.api or "split", where, ctx.note, ctx.tag | tag), split)
                    for child in np.ndindex(shape):
                        split._add(KeyNode("index", index_text(child) or "[]", note=ctx.note))
                    parts.append((split, tag))
                for i, child in enumerate(np.ndindex(shape)):
                    children[child] = Elem([(split.children[i], tag) for split, tag in parts])
            out[index] = children
        return [Abs(next(self._fresh), keys=out)]

    def fold_in(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        where, (key_abs, data) = self.where(ctx), ins
        key_aval, data_aval = (v.aval for v in eqn.invars)
        shape = eqn.outvars[0].aval.shape
        keys: Any = np.broadcast_to(_keys(key_abs, key_aval), shape)
        positions = np.broadcast_to(np.arange(int(np.prod(data_aval.shape, dtype=int))).reshape(data_aval.shape), shape)
        detail = f"in {where.scope}" if where.scope else ""
        out = np.empty(shape, object)
        for index in np.ndindex(shape):
            elem, flat = keys[index], int(positions[index])
            if elem is None:
                continue
            value = data.value.reshape(-1)[flat] if data.value is not None else None
            label = f"fold_in({'…' if value is None else int(value)})"
            identity = self.element_token(data, data_aval.shape, flat)
            parts = []
            for node, tag in elem.alts:
                child = node._folds.get(identity)
                if child is None:
                    child = KeyNode("fold_in", label, detail, where.location, ctx.note)
                    node._folds[identity] = child
                self.use(node, Use("fold_in", where.api or "fold_in", where, ctx.note, ctx.tag | tag), child)
                parts.append((child, tag))
            out[index] = Elem(parts)
        return [Abs(next(self._fresh), keys=out)]

    def consume(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        self.consume_all(eqn, ins[:1], ctx, None)
        return [self.fresh() for _ in eqn.outvars]

    def consume_all(self, eqn: Any, ins: list[Abs], ctx: Context, label: str | None) -> None:
        where = self.where(ctx)
        label = label or where.api or eqn.primitive.name
        details = []
        if where.initializer:
            details.append(f"via {where.initializer}")
        if where.scope:
            details.append(f"in {where.scope}" + (f" ({where.param})" if where.param else ""))
        for a in ins:
            for elem in key_elements(a):
                for node, tag in elem.alts:
                    leaf = KeyNode("consume", label, " ".join(details), where.location, ctx.note)
                    self.use(node, Use("consume", label, where, ctx.note, ctx.tag | tag), leaf)

    def use(self, node: KeyNode, use: Use, child: KeyNode) -> None:
        """Records a use of ``node`` and reports it if it breaks the one-use rule."""
        for earlier in node._uses:
            kind = REUSE_KINDS.get((earlier.kind, use.kind))
            if kind is not None and not _exclusive(earlier.tag, use.tag):
                self._report(node, kind, earlier, use)
                break
        node._uses.append(use)
        if child.parent is None:
            node._add(child)

    def _report(self, node: KeyNode, kind: str, earlier: Use, later: Use) -> None:
        places = (earlier.place(), later.place())
        if places[0] == places[1]:  # tell them apart by their callers, else say "again"
            callers = (earlier.place(with_caller=True), later.place(with_caller=True))
            places = callers if callers[0] != callers[1] else (places[0], f"{places[1]} again")
        if kind not in node.reuse:
            node.reuse.append(kind)
        code = (kind, earlier.what, earlier.where.location, later.what, later.where.location)
        if code in self._reported:  # one finding per bug, not per key or loop iteration it repeats on
            return
        self._reported.add(code)
        message = f"`{node.path}` " + ADVICE[kind].format(*places)
        self.reuses.append(KeyReuse(kind, node.path, places, message, node))
        self.reuse_places.append((later.where.file, later.where.line))

    # keys: moved around

    def move(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        """Indexing, slicing, stacking, ...: done on element ids, exactly, when indices are known."""
        name, avals = eqn.primitive.name, [v.aval for v in eqn.invars]
        roles = operand_roles(name, len(ins))
        table: list[Elem | None] = []
        operands: list[Any] = []
        raw = not _is_key(next(aval for aval, is_array in zip(avals, roles, strict=True) if is_array))
        for a, aval, is_array in zip(ins, avals, roles, strict=True):
            if not is_array:
                operands.append(a.value)
                continue
            keys = _keys(a, aval)
            numbers = np.arange(len(table), len(table) + keys.size).reshape(keys.shape)
            numbers[np.array([e is None for e in keys.flat], bool).reshape(keys.shape)] = -1
            table.extend(keys.flat)
            pairs = np.where(numbers[..., None] < 0, -1, numbers[..., None] * 2 + np.arange(2))  # raw: 2 words a key
            operands.append(pairs if raw else numbers)
        out_avals = [v.aval for v in eqn.outvars]
        tokens = [a.token for a in self.data(eqn, ins)] if raw else [next(self._fresh) for _ in out_avals]
        if any(x is None for x in operands):
            return self._dynamic(eqn, ins, roles, table, tokens, raw, ctx)
        results = numpy_op(eqn, operands)
        if results is None:
            return [Abs(t) for t in tokens]
        outs = []
        for result, aval, token in zip(results, out_avals, tokens, strict=True):
            ids: Any = np.asarray(result)
            if raw:
                whole = ids.shape[-1:] == (2,) and ids.dtype.kind in "iu"  # each key's two words stayed together
                valid = whole and (ids[..., 0] >= 0) & (ids[..., 0] % 2 == 0) & (ids[..., 1] == ids[..., 0] + 1)
                ids = np.where(valid, ids[..., 0] // 2, -1) if whole else None
            if ids is None or ids.shape != (aval.shape[:-1] if raw else aval.shape):
                outs.append(Abs(token))
                continue
            keys = np.empty(ids.shape, object)
            for index in np.ndindex(ids.shape):
                keys[index] = table[ids[index]] if ids[index] >= 0 else None
            outs.append(Abs(token, keys=keys))
        return outs

    def _dynamic(
        self,
        eqn: Any,
        ins: list[Abs],
        roles: list[bool],
        table: list[Elem | None],
        tokens: list[int],
        raw: bool,
        ctx: Context,
    ) -> list[Abs]:
        """A traced index: a pick is the same key only as a pick with the same traced value."""
        name = eqn.primitive.name
        aval = eqn.outvars[0].aval
        if name == "select_n":
            return [self._select(ins, roles, aval, raw, tokens[0])]
        if name not in ("dynamic_slice", "gather"):
            return [Abs(t) for t in tokens]  # a traced update: the result is not followed
        source = [e for e in table if e is not None]
        parents = {id(n.parent): n.parent for e in source for n, _ in e.alts}
        parent = next(iter(parents.values())) if len(parents) == 1 else None
        picks = tuple(a.token for a, is_array in zip(ins, roles, strict=True) if not is_array)
        shape = aval.shape[:-1] if raw else aval.shape
        keys = np.empty(shape, object)
        for flat, index in enumerate(np.ndindex(shape)):
            memo = ("pick", tuple(e.identity() for e in source), picks, flat)
            node = self._memo.get(memo)
            if node is None:
                node = KeyNode("index", "[traced index]", note=ctx.note)
                self._memo[memo] = node
                if parent is not None:
                    parent._add(node)
                else:
                    where = self.where(ctx)
                    node.kind, node.detail, node.location = "root", "picked from a key array", where.location
                    self.roots.append(node)
            keys[index] = Elem([(node, frozenset())])
        return [Abs(tokens[0], keys=keys)]

    def _select(self, ins: list[Abs], roles: list[bool], aval: Any, raw: bool, token: int) -> Abs:
        cases = [a.keys for a, is_array in zip(ins, roles, strict=True) if is_array]
        shape = aval.shape[:-1] if raw else aval.shape
        keys = np.empty(shape, object)
        for index in np.ndindex(shape):
            elems = [None if case is None else np.broadcast_to(case, shape)[index] for case in cases]
            keys[index] = _merge_keys([Abs(0, keys=np.array(e, dtype=object)) for e in elems], next(self._conds))[()]
        return Abs(token, keys=keys)

    # control flow

    def call_like(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        name, params = eqn.primitive.name, eqn.params
        sub = params[CALLS[name]]
        jaxpr = getattr(sub, "jaxpr", sub)
        if name in ("remat2", "checkpoint") and params.get("differentiated"):
            return [self.fresh() for _ in eqn.outvars]  # a backward-pass recomputation of forward draws
        shapes_match = len(jaxpr.invars) == len(ins) and all(
            inner.aval.shape == outer.aval.shape for inner, outer in zip(jaxpr.invars, eqn.invars, strict=True)
        )
        if not shapes_match:  # e.g. shard_map over sharded keys: each device gets a part
            self.consume_all(eqn, ins, ctx, f"{name} (not analysed)")
            return [self.fresh() for _ in eqn.outvars]
        return self.call(sub, ins, ctx)

    def cond(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        branches, (_, *ops) = eqn.params["branches"], ins
        cond = next(self._conds)  # every branch is followed, even when the index is known for this call
        results = [self.call(branch, ops, ctx.branch(cond, b)) for b, branch in enumerate(branches)]
        merged = []
        for k in range(len(eqn.outvars)):
            options = [outs[k] for outs in results]
            first = options[0]
            same = all(o.token == first.token for o in options)
            out = Abs(first.token, first.value, uniform=first.uniform) if same else self.fresh()
            if any(o.keys is not None for o in options):
                out.keys = _merge_keys(options, cond)
            merged.append(out)
        return merged

    def scan(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        p = eqn.params
        consts_n, carry_n, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = ins[:consts_n], ins[consts_n : consts_n + carry_n], ins[consts_n + carry_n :]
        where = self.where(ctx)
        ys: dict[int, list[Abs]] = {}
        runs = min(length, 2)
        for t in range(runs):
            i = length - 1 - t if p["reverse"] else t
            sub = ctx if t == 0 else ctx.iteration(iteration_note(where, "jax.lax.scan"))
            outs = self.call(p["jaxpr"], [*consts, *carry, *(self._take(x, i) for x in xs)], sub)
            carry, ys[i] = outs[:carry_n], outs[carry_n:]
        if runs < length:
            carry = [Abs(next(self._fresh), keys=a.keys) for a in carry]
        stacked = []
        for k in range(len(eqn.outvars) - carry_n):
            parts = {i: outs[k].keys for i, outs in ys.items() if outs[k].keys is not None}
            keys = None
            if parts:
                keys = np.empty((length, *next(iter(parts.values())).shape), object)
                for i, part in parts.items():
                    keys[i, ...] = part
            stacked.append(self.fresh(keys))
        return [*carry, *stacked]

    def _take(self, a: Abs, i: int) -> Abs:
        value = a.value[i] if a.value is not None else None
        token = self.value(value).token if value is not None else self.token(("take", a.token, i))
        return Abs(token, value, a.keys[i, ...] if a.keys is not None else None, a.uniform)

    def while_loop(self, eqn: Any, ins: list[Abs], ctx: Context) -> list[Abs]:
        p = eqn.params
        cond_n, body_n = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, carry = ins[:cond_n], ins[cond_n : cond_n + body_n], ins[cond_n + body_n :]
        where = self.where(ctx)
        for t in range(2):
            sub = ctx if t == 0 else ctx.iteration(iteration_note(where, "jax.lax.while_loop"))
            self.call(p["cond_jaxpr"], [*cond_consts, *carry], sub)
            carry = self.call(p["body_jaxpr"], [*body_consts, *carry], sub)
        return [Abs(next(self._fresh), keys=a.keys) for a in carry]

    # places

    def where(self, ctx: Context) -> Where:
        frames = [f for si in ctx.sources if si.traceback is not None for f in reversed(si.traceback.frames)]
        user = [i for i, f in enumerate(frames) if not f.file_name.startswith(self._libraries)]
        inner = frames[user[-1]] if user else None
        outer = frames[user[0]] if user else None
        api = api_name(frames, self._random_dir, jax.random) or api_name(frames, self._lax_dir, jax.lax)
        initializer = next(
            (
                f"jax.nn.initializers.{f.function_name.split('.')[0]}"
                for f in frames
                if f.file_name.startswith(self._initializers) and "<locals>" in f.function_name
            ),
            None,
        )
        scopes = [
            str(getattr(scope, "name", scope))
            for si in ctx.sources
            for scope in getattr(si.name_stack, "stack", ())
            if type(scope).__name__ == "Scope"
        ]
        return Where(
            api=api,
            file=inner.file_name if inner else None,
            line=inner.line_num if inner else None,
            scope="/".join(scopes),
            initializer=initializer,
            param=flax_param(frames),
            location=f"{file_label(inner.file_name)}:{inner.line_num}" if inner else None,
            caller=f"{file_label(outer.file_name)}:{outer.line_num}" if outer else None,
        )

    @property
    def _random_dir(self) -> str:
        return os.path.join(os.path.dirname(jax.__file__), "_src", "random")

    @property
    def _lax_dir(self) -> str:
        return os.path.join(os.path.dirname(jax.__file__), "_src", "lax")

    @property
    def _initializers(self) -> str:
        return os.path.join(os.path.dirname(jax.__file__), "_src", "nn", "initializers")


_HANDLERS: dict[str, Callable[[Analysis, Any, list[Abs], Context], list[Abs]]] = {
    "random_seed": Analysis.seed,
    "random_wrap": Analysis.wrap,
    "random_unwrap": Analysis.unwrap,
    "random_clone": Analysis.clone,
    "random_split": Analysis.split,
    "random_fold_in": Analysis.fold_in,
    "random_bits": Analysis.consume,
    "random_gamma": Analysis.consume,
    "cond": Analysis.cond,
    "scan": Analysis.scan,
    "while": Analysis.while_loop,
}


def _keys(a: Abs, aval: Any) -> Any:
    """The key elements of a typed key array, or of raw key data (all its axes but the last)."""
    return a.keys if a.keys is not None else np.full(aval.shape if _is_key(aval) else aval.shape[:-1], None, object)


def _merge_keys(options: list[Abs], cond: int) -> Any:
    shape = next(o.keys.shape for o in options if o.keys is not None)
    out = np.empty(shape, object)
    for index in np.ndindex(shape):
        elems = [None if o.keys is None else o.keys[index] for o in options]
        if all(e is elems[0] or (e and elems[0] and e.identity() == elems[0].identity()) for e in elems):
            out[index] = elems[0]
            continue
        alts = [(node, tag | {(cond, b)}) for b, e in enumerate(elems) if e is not None for node, tag in e.alts]
        out[index] = Elem(alts) if alts else None
    return out


def _exclusive(a: frozenset[tuple[int, int]], b: frozenset[tuple[int, int]]) -> bool:
    """Uses in different branches of one cond never both happen."""
    taken = dict(a)
    return any(c in taken and taken[c] != branch for c, branch in b)


def _is_key(aval: Any) -> bool:
    return _is_key_dtype(getattr(aval, "dtype", None))


@functools.lru_cache
def _is_key_dtype(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _small_int(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return (
        dtype is not None
        and not _is_key(aval)
        and np.dtype(dtype).kind in "biu"
        and int(np.prod(aval.shape, dtype=int)) <= _MAX_CONCRETE
    )
