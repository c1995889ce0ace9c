"""Per-primitive rules: which primitives call a body, move keys, or compute integers NumPy can redo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# call-like primitives -> the parameter holding the body
CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "shard_map": "jaxpr",
}
IDENTITY = frozenset(
    {
        "copy",
        "copy_p",
        "device_put",
        "optimization_barrier",
        "sharding_constraint",
        "reshard",
        "pvary",
        "mesh_cast",
        "layout_constraint",
        "stop_gradient",
    }
)
MOVES = frozenset(
    {
        "slice",
        "squeeze",
        "reshape",
        "broadcast_in_dim",
        "transpose",
        "rev",
        "concatenate",
        "stack",
        "unstack",
        "split",
        "tile",
        "select_n",
        "dynamic_slice",
        "dynamic_update_slice",
        "gather",
        "scatter",
    }
)
_ARITHMETIC: dict[str, Callable[..., Any]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "neg": np.negative,
    "max": np.maximum,
    "min": np.minimum,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
    "not": np.invert,
    "abs": np.abs,
    "sign": np.sign,
    "rem": np.fmod,
    "clamp": lambda lo, x, hi: np.clip(x, lo, hi),
}
FOLDABLE = frozenset({*_ARITHMETIC, *(MOVES - {"gather", "scatter"}), "iota", "convert_element_type"})


def operand_roles(name: str, count: int) -> list[bool]:
    """Which operands are arrays being moved (True) rather than indices (False)."""
    if name == "select_n":
        return [False] + [True] * (count - 1)
    if name == "dynamic_slice":
        return [True] + [False] * (count - 1)
    if name == "dynamic_update_slice":
        return [True, True] + [False] * (count - 2)
    if name == "gather":
        return [True, False]
    if name == "scatter":
        return [True, False, True]
    return [True] * count


def numpy_op(eqn: Any, args: list[Any]) -> list[Any] | None:
    """The equation done in NumPy (gathers and scatters through JAX), or None."""
    name, p = eqn.primitive.name, eqn.params
    try:
        with np.errstate(all="raise"):
            if name in _ARITHMETIC:
                return [_ARITHMETIC[name](*args)]
            a: Any = args[0] if args else None
            if name == "convert_element_type":
                return [np.asarray(a).astype(p["new_dtype"])]
            if name == "iota":
                shape, dim = p["shape"], p["dimension"]
                ramp = np.arange(shape[dim]).reshape([-1 if i == dim else 1 for i in range(len(shape))])
                return [np.broadcast_to(ramp, shape)]
            if name == "slice":
                strides = p["strides"] or (1,) * len(p["start_indices"])
                return [a[tuple(map(slice, p["start_indices"], p["limit_indices"], strides))]]
            if name == "squeeze":
                return [np.squeeze(a, axis=tuple(p["dimensions"]))]
            if name == "reshape":
                dims = p.get("dimensions")
                return [(a if dims is None else np.transpose(a, dims)).reshape(p["new_sizes"])]
            if name == "broadcast_in_dim":
                shape = list(p["shape"])
                spread = [1] * len(shape)
                for i, d in enumerate(p["broadcast_dimensions"]):
                    spread[d] = a.shape[i]
                return [np.broadcast_to(a.reshape(spread), shape)]
            if name == "transpose":
                return [np.transpose(a, p["permutation"])]
            if name == "rev":
                return [np.flip(a, p["dimensions"])]
            if name == "concatenate":
                return [np.concatenate(args, axis=p["dimension"])]
            if name == "stack":
                return [np.stack(args, axis=p["axis"])]
            if name == "unstack":
                return [np.take(a, i, axis=p["axis"]) for i in range(a.shape[p["axis"]])]
            if name == "split":
                return np.split(a, np.cumsum(p["sizes"])[:-1], axis=p["axis"])
            if name == "tile":
                return [np.tile(a, p["reps"])]
            if name == "select_n":
                return [np.choose(np.asarray(args[0]).astype(np.intp), np.broadcast_arrays(*args[1:]))]
            if name in ("dynamic_slice", "dynamic_update_slice"):
                block = p["slice_sizes"] if name == "dynamic_slice" else args[1].shape
                starts = [
                    int(np.clip(int(i), 0, d - s)) for i, d, s in zip(args[-len(block) :], a.shape, block, strict=True)
                ]
                where = tuple(slice(s, s + n) for s, n in zip(starts, block, strict=True))
                if name == "dynamic_slice":
                    return [a[where]]
                out = np.array(a)
                out[where] = args[1]
                return [out]
            if name in ("gather", "scatter"):
                cast = [np.asarray(x, np.int32) for x in args]
                return [np.asarray(eqn.primitive.bind(*cast, **p))]
    except (ValueError, TypeError, IndexError, FloatingPointError, ArithmeticError):
        return None
    return None
