"""The errors sdplug raises on purpose.

Every error a user can cause (a bad preset, an unknown strategy, a missing optional package)
is an ``SdplugError``, so hosts and the CLI can report it as one readable paragraph instead of
a traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence


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
    inside it such as ``noise[0].discount``. The attributes keep the text as given; the message
    passes it through ``printable``, since file names and keys come from untrusted files.
    """

    def __init__(self, problem: str, *, path: str | None = None, key: str | None = None):
        self.problem = problem
        self.path = path
        self.key = key
        where = ": ".join(printable(str(part)) for part in (path, key) if part)
        super().__init__(f"{where}: {printable(problem)}" if where else printable(problem))

    @property
    def errors(self) -> tuple[PresetError, ...]:
        """Each problem as its own error: just this one (``PresetErrors`` holds several)."""
        return (self,)


class PresetErrors(PresetError):
    """Several problems found in one preset, reported together so that one run shows them all.

    ``errors`` holds each as a ``PresetError`` of its own; ``path``, ``key`` and ``problem`` are
    the first one's, so code that handles a single error still reads something true. The message
    is one paragraph (line) per problem.
    """

    def __init__(self, errors: Iterable[PresetError]):
        self._errors = tuple(single for error in errors for single in error.errors)
        first = self._errors[0]
        super().__init__(first.problem, path=first.path, key=first.key)
        self.args = ("\n".join(str(error) for error in self._errors),)

    @property
    def errors(self) -> tuple[PresetError, ...]:
        return self._errors

    def __reduce__(self) -> tuple[type[PresetErrors], tuple[tuple[PresetError, ...]]]:
        return (PresetErrors, (self._errors,))  # rebuilt from its errors, not from its message


def raise_together(errors: Sequence[PresetError]) -> None:
    """Raise nothing for no errors, a lone error as itself, several as one ``PresetErrors``."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise PresetErrors(errors)


# Characters a terminal acts on rather than shows: C0 controls, DEL, C1 controls (CSI, OSC, ...),
# the line/paragraph separators and the bidirectional overrides that reorder what follows them.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to echo on a terminal: control characters become visible escapes like ``\\x1b``.

    File names, key paths and values come from files a user may have downloaded; printed raw, an
    escape sequence in them could retitle the window, clear the screen or hide the rest of a message.
    Ordinary (non-control) unicode is kept as it is.
    """
    return _UNPRINTABLE.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def error_lines(exc: BaseException) -> list[str]:
    """An error as the lines a command prints: ``error: ...`` per problem (several problems of one
    preset each get their own), continuation lines indented, control characters escaped."""
    lines = []
    for error in getattr(exc, "errors", (exc,)):
        for index, line in enumerate(str(error).split("\n")):
            lines.append(("error: " if index == 0 else "  ") + printable(line))
    return lines


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix naming the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
