"""Drawing a key tree as text (``├─ └─``) and as HTML nested lists."""

from __future__ import annotations

import html
from typing import Any

from jaxpipe._prng.nodes import KEY_KINDS, KeyNode

_MAX_LINES = 400


_UL_STYLE = "list-style:none;margin:0 0 0 0.4em;padding-left:1em;border-left:1px solid #ccc"


def _signature(node: KeyNode, depth: int = 0) -> tuple[Any, ...]:
    """What a line shows, and its subtree, but not its own label."""
    if depth > 6:  # deep chains (a Python loop of splits) are not grouped: keeps this shallow
        return (id(node),)
    return (
        node.kind,
        node.label if depth or node.kind == "consume" else None,
        node.detail,
        node.location,
        node.note,
        node.returned,
        tuple(node.reuse),
        tuple(_signature(c, depth + 1) for c in node.children),
    )


def _groups(nodes: list[KeyNode]) -> list[tuple[KeyNode, KeyNode, int]]:
    """Runs of siblings that differ only in their label, drawn as one line."""
    groups: list[tuple[KeyNode, KeyNode, int]] = []
    last_signature = None
    for node in nodes:
        signature = _signature(node) if node.kind in KEY_KINDS else None
        if groups and signature is not None and signature == last_signature:
            first, _, count = groups[-1]
            groups[-1] = (first, node, count + 1)
        else:
            groups.append((node, node, 1))
        last_signature = signature
    return groups


def _inline_child(node: KeyNode) -> KeyNode | None:
    """A key drawn from once is drawn on one line: ``[0] → jax.random.normal at f.py:3``."""
    if node.kind in KEY_KINDS and len(node.children) == 1:
        child = node.children[0]
        if child.kind == "consume" and not node.reuse:
            return child
    return None


def _line_text(node: KeyNode, label: str) -> str:
    note = node.note if node.parent is None or node.note != node.parent.note else ""
    parts = [label, node.detail, f"at {node.location}" if node.location else "", f"[{note}]" if note else ""]
    if node.kind in KEY_KINDS and not node.children:
        parts.append("(returned)" if node.returned else "(unused)")
    elif node.returned:
        parts.append("(returned)")
    if node.reuse:
        parts.append("⚠ " + ", ".join(node.reuse))
    return " ".join(p for p in parts if p)


def _text(first: KeyNode, last: KeyNode, count: int) -> str:
    label = first.label if count == 1 else f"{first.label} … {last.label} ({count} keys)"
    text = _line_text(first, label)
    child = _inline_child(first)
    return text if child is None else f"{text} → {_line_text(child, child.label)}"


def text_rows(roots: list[KeyNode]) -> list[tuple[int, str, str, bool]]:
    """The lines of the tree, depth first: (depth, ``├─`` prefix, text, has reuse)."""
    rows: list[tuple[int, str, str, bool]] = []
    stack = [(*group, 0, "", "") for group in reversed(_groups(roots))]
    while stack and len(rows) < _MAX_LINES:  # a loop, not recursion: a Python loop of splits nests deep
        first, last, count, depth, prefix, connector = stack.pop()
        rows.append((depth, prefix + connector, _text(first, last, count), bool(first.reuse)))
        if _inline_child(first) is None:
            groups = _groups(first.children)
            inner = prefix + {"": "", "└─ ": "   "}.get(connector, "│  ")
            for i in reversed(range(len(groups))):
                stack.append((*groups[i], depth + 1, inner, "└─ " if i == len(groups) - 1 else "├─ "))
    if stack:
        rows.append((0, "", f"… (cut at {_MAX_LINES} lines)", False))
    return rows


def html_list(rows: list[tuple[int, str, str, bool]]) -> str:
    out, depth = [f'<ul style="{_UL_STYLE}">'], 0
    for i, (row_depth, _, text, reuse) in enumerate(rows):
        if i and row_depth > depth:  # one level deeper: a list inside the open item
            out.append(f'<ul style="{_UL_STYLE}">')
        elif i:
            out.append("</li>" + "</ul></li>" * (depth - row_depth))
        shown = html.escape(text)
        out.append(f'<li><span style="color:#b00020">{shown}</span>' if reuse else f"<li>{shown}")
        depth = row_depth
    if rows:
        out.append("</li>" + "</ul></li>" * depth)
    out.append("</ul>")
    return "".join(out)
