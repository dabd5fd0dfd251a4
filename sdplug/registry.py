"""One ``Registry`` class, one instance per strategy family.

Built-in strategies register at import; third-party ones come from the entry-point group
``sdplug.<family>`` and are discovered on first use, imported only when their name is asked
for, and recorded with the distribution that provides them. A name is registered once:
a second registration, or a plugin reusing a built-in's name, is an error, never an overwrite.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

from sdplug.errors import DuplicateStrategyError, PluginError, UnknownStrategyError
from sdplug.params import validate_params

BUILTIN_ORIGIN = "sdplug"

_C = TypeVar("_C", bound=type)


@dataclass(frozen=True)
class Entry:
    """A registered strategy: its class, one-line description and providing distribution."""

    family: str
    name: str
    cls: type
    origin: str

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


EntryPointSource = Callable[[str], Iterable[Any]]


class DeclaresCapabilities(Protocol):
    """A family's base class (``sdplug.strategies.base.Strategy``): it can tell what a
    strategy declares wrongly of the capabilities it defines."""

    @classmethod
    def declaration_problems(cls) -> list[str]: ...


def _installed_entry_points(group: str) -> Iterable[Any]:
    return importlib.metadata.entry_points(group=group)


class Registry:
    """The strategies of one family, by name.

    ``base`` is the class every strategy of the family must subclass; every strategy is checked
    against it when it registers (a plugin when it loads): a misfit, or a capability declared
    wrongly (a hook that is not callable, a flag that is not a bool), is reported with the
    plugin's name at once. ``entry_points`` is injectable so tests can fake installed plugins.
    """

    def __init__(
        self, family: str, base: type[DeclaresCapabilities], *, entry_points: EntryPointSource = _installed_entry_points
    ) -> None:
        self.family = family
        self.base = base
        self.group = f"sdplug.{family}"
        self._entries: dict[str, Entry] = {}
        self._pending_plugins: dict[str, Any] | None = None  # name -> EntryPoint, until loaded
        self._entry_points = entry_points

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {len(self._entries)} loaded)"

    @overload
    def register(self, name: str, cls: None = None, *, origin: str = BUILTIN_ORIGIN) -> Callable[[_C], _C]: ...
    @overload
    def register(self, name: str, cls: _C, *, origin: str = BUILTIN_ORIGIN) -> _C: ...
    def register(self, name: str, cls: type | None = None, *, origin: str = BUILTIN_ORIGIN) -> type | Callable[[_C], _C]:
        """Register ``cls`` under ``name``; usable as ``@registry.register("name")``."""

        def add(target: _C) -> _C:
            self._check_fits(name, target, origin)
            if name in self._entries:
                known = self._entries[name]
                raise DuplicateStrategyError(
                    f"{self.family} strategy {name!r} is already registered by {known.origin} "
                    f"({known.cls.__module__}.{known.cls.__qualname__}); {origin} tried to register "
                    f"{target.__module__}.{target.__qualname__} under the same name. Names are unique per family."
                )
            self._entries[name] = Entry(self.family, name, target, origin)
            return target

        return add(cls) if cls is not None else add

    def _check_fits(self, name: str, target: Any, origin: str) -> None:
        if not (inspect.isclass(target) and issubclass(target, self.base)):
            raise PluginError(
                f"{origin}'s {self.family} strategy {name!r} is {target!r}, which is not a subclass of "
                f"{self.base.__module__}.{self.base.__qualname__}; every {self.family} strategy must be."
            )
        problems = target.declaration_problems()  # a subclass of the family base, checked above
        if problems:
            raise PluginError(
                f"{origin}'s {self.family} strategy {name!r} ({target.__module__}.{target.__qualname__}) declares its "
                f"capabilities wrongly: {'; '.join(problems)}. Allowed: what the base class "
                f"{self.base.__module__}.{self.base.__qualname__} documents for each."
            )

    def _discover(self) -> dict[str, Any]:
        if self._pending_plugins is None:
            pending: dict[str, Any] = {}
            for ep in self._entry_points(self.group):
                origin = _distribution_name(ep)
                if ep.name in self._entries or ep.name in pending:
                    other = self._entries[ep.name].origin if ep.name in self._entries else _distribution_name(pending[ep.name])
                    raise DuplicateStrategyError(
                        f"plugin package {origin} registers {self.family} strategy {ep.name!r} "
                        f"(entry point group {self.group!r}), but {other} already provides that name. "
                        f"A plugin never replaces a strategy; rename it in {origin}'s entry points."
                    )
                pending[ep.name] = ep
            self._pending_plugins = pending
        return self._pending_plugins

    def _load_plugin(self, name: str) -> Entry:
        ep = self._discover().pop(name)
        origin = _distribution_name(ep)
        try:
            target = ep.load()
        except Exception as exc:  # a broken plugin must name itself, whatever it raised
            raise PluginError(
                f"plugin package {origin} failed to load {self.family} strategy {name!r} "
                f"from {ep.value!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.register(name, target, origin=origin)
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, built-in and plugin, sorted."""
        return sorted({*self._entries, *self._discover()})

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._discover()

    def get(self, name: str) -> Entry:
        """The entry for ``name``, loading a plugin on first request."""
        if name in self._entries:
            return self._entries[name]
        if name in self._discover():
            return self._load_plugin(name)
        raise UnknownStrategyError(self.family, name, self.names())

    def entries(self) -> list[Entry]:
        """All entries, loading every plugin (used by listings)."""
        return [self.get(name) for name in self.names()]

    def create(self, name: str, *, _path: str | None = None, _key: str = "", **params: Any) -> Any:
        """A validated strategy instance; bad parameters raise ``PresetError``."""
        entry = self.get(name)
        return validate_params(entry.cls, params, what=f"{self.family} {name!r}", path=_path, key=_key)


def _distribution_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "an unknown distribution"
