"""Stage name -> StageKind: the built-ins, then what plugins register."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import keyword
from collections.abc import Iterable
from typing import Any

from jaxpipe._core.stage import StageKind
from jaxpipe._plugins.manager import BLOCK_ENV, plugin_manager, warn_plugin
from jaxpipe._stages.builtins import BUILTIN_STAGES
from jaxpipe.errors import PluginError, UnknownStageError


@dataclasses.dataclass(frozen=True)
class Registry:
    """The stages a Pipeline can use, and the names two plugins both claim."""

    kinds: dict[str, StageKind]
    conflicts: dict[str, tuple[str, ...]]

    def lookup(self, name: str, **where: Any) -> StageKind:
        """The kind called ``name``; raises a helpful error if there is none.

        ``where`` (``stage``, ``stage_name``, ``pipeline``) places the error.
        """
        kind = self.kinds.get(name)
        if kind is not None:
            return kind
        if name in self.conflicts:
            first, *others = self.conflicts[name]
            owners = " and ".join(repr(p) for p in self.conflicts[name])
            raise PluginError(
                f"stage `{name}` is registered by {owners}, so jaxpipe cannot tell which to use.\n"
                f"Uninstall one, or block one with {BLOCK_ENV}={others[0] if others else first}.",
                plugins=self.conflicts[name],
                **where,
            )
        close = difflib.get_close_matches(name, self.kinds, n=3)
        hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        raise UnknownStageError(
            f"there is no stage called `{name}`.{hint}\n"
            f"Stages: {', '.join(sorted(self.kinds))}. A plugin stage needs its package installed "
            f"(`jaxpipe plugins` lists what is loaded).",
            **where,
        )


_reserved: set[str] = set()


def reserve(names: Iterable[str]) -> None:
    """Names no plugin stage may take: ``Pipeline``'s own methods (it reserves them when it is defined)."""
    _reserved.update(n for n in names if not n.startswith("_") and n not in BUILTIN_STAGES)
    registry.cache_clear()


def reset() -> None:
    """Forgets loaded plugins and stages, so the next lookup loads them again."""
    plugin_manager.cache_clear()
    registry.cache_clear()


@functools.cache
def registry() -> Registry:
    """Collects stage kinds from every registered plugin, once per process."""
    kinds = dict(BUILTIN_STAGES)
    owners: dict[str, list[str]] = {name: ["jaxpipe"] for name in kinds}
    for name in sorted(_reserved):  # Pipeline's own methods: build, explain, init, ...
        owners[name] = ["jaxpipe"]
    hook = plugin_manager().hook.jaxpipe_register_stages
    for impl in reversed(hook.get_hookimpls()):  # registration order
        plugin = impl.plugin_name
        try:
            returned: Any = impl.function()
            result = list(returned or [])
            bad = [k for k in result if not isinstance(k, StageKind)]
            if bad:
                raise TypeError(f"jaxpipe_register_stages returned {bad[0]!r}, not a jaxpipe.StageKind")
            invalid = [
                k.name
                for k in result
                if not k.name.isidentifier() or keyword.iskeyword(k.name) or k.name.startswith("_")
            ]
            if invalid:
                raise ValueError(f"stage name {invalid[0]!r} is not a public Python identifier")
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit too: one plugin must not end every stage lookup
            warn_plugin(plugin, "failed in jaxpipe_register_stages", err)
            continue
        for kind in result:
            if owners.get(kind.name, [None])[0] == "jaxpipe":
                clash = PluginError(f"`{kind.name}` is already a Pipeline method", plugins=(plugin,))
                warn_plugin(plugin, f"registers stage `{kind.name}`, a name jaxpipe itself uses,", clash)
                continue
            owners.setdefault(kind.name, []).append(plugin)
            kinds.setdefault(kind.name, dataclasses.replace(kind, plugin=plugin))
    conflicts = {name: tuple(who) for name, who in owners.items() if len(who) > 1}
    for name in conflicts:
        kinds.pop(name, None)
    return Registry(kinds, conflicts)
