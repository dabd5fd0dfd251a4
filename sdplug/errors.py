"""The errors sdplug raises on purpose.

Every error a user can cause (a bad preset, an unknown strategy, a missing optional package)
is an ``SdplugError``, so hosts and the CLI can report it as one readable paragraph instead of
a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SdplugError(Exception):
    """Base class of every error sdplug raises for a user mistake or an unmet requirement."""


class UnknownStrategyError(SdplugError, LookupError):
    """A strategy name that no registry family knows."""

    def __init__(self, family: str, name: str, available: Iterable[str]):
        self.family = family
        self.name = name
        self.available = sorted(available)
        super().__init__(
            f"Can't find {name!r} in registry {family!r}. "
            f"Available names: {', '.join(self.available) or '(none)'}.{did_you_mean(name, self.available)}"
        )


class DuplicateStrategyError(SdplugError):
    """Two registrations of one name in one family (never resolved by silently overwriting)."""


class PluginError(SdplugError):
    """A third-party plugin that cannot be loaded or does not fit its family."""


class MissingDependencyError(SdplugError, ImportError):
    """An optional package a chosen strategy needs is not installed or cannot run here."""


class PresetError(SdplugError, ValueError):
    """A preset (or strategy parameters) that does not validate.

    ``path`` is the preset file (None for parameters passed in code), ``key`` the key path
    inside it such as ``noise[0].discount``.
    """

    def __init__(self, problem: str, *, path: str | None = None, key: str | None = None):
        self.problem = problem
        self.path = path
        self.key = key
        where = ": ".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix naming the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
