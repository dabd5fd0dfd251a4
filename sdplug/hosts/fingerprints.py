"""Recognise a host's source tree by fingerprints, the same way for every host.

Hosts (sd-scripts, EveryDream2) carry no version string sdplug could trust, so each host module
lists its known versions, each with texts its files must contain (and, where the order matters,
texts that must follow one another after a start text). This module does the matching once:
it reads the files, lists what a version misses, returns the first version that misses nothing,
and otherwise refuses with one message that names every known version and what each lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from sdplug.errors import SdplugError


class Named(Protocol):
    @property
    def name(self) -> str: ...


V = TypeVar("V", bound=Named)


def read(root: Path, relative: str) -> str:
    """The text of ``root / relative``, or "" when there is no such file."""
    path = root / relative
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def missing_texts(root: Path, fingerprints: Sequence[tuple[str, str]]) -> list[str]:
    """Each (file, text) fingerprint whose text is not in its file, as ``file: 'text'``."""
    return [f"{file}: {text.strip()!r}" for file, text in fingerprints if text not in read(root, file)]


def missing_order(root: Path, file: str, start: str, texts: Sequence[str]) -> list[str]:
    """The first of ``texts`` not found after ``start`` and the texts before it, in that order
    (an empty list when all are)."""
    source = read(root, file)
    position = source.find(start)
    for text in texts:
        found = source.find(text, position) if position >= 0 else -1
        if found < 0:
            return [f"{file}: {text!r} after {start!r}"]
        position = found
    return []


def identify(
    root: Path,
    known: Sequence[V],
    missing: Callable[[V], list[str]],
    *,
    unknown: str,
    advice: str,
    error: type[SdplugError],
) -> V:
    """The first of ``known`` that ``missing`` finds nothing missing in; else raise ``error``:
    ``"{root}: {unknown}. Known: ... Checked: <name> (missing ...) / ... {advice}"``."""
    misses = []
    for version in known:
        absent = missing(version)
        if not absent:
            return version
        misses.append(f"{version.name} (missing {'; '.join(absent)})")
    names = ", ".join(v.name for v in known)
    raise error(f"{root}: {unknown}. Known: {names}. Checked: {' / '.join(misses)}. {advice}")


def lookup(modules: Mapping[str, object], module_name: str, attribute: str) -> object | None:
    """``modules[module_name]`` followed along a dotted ``attribute`` (``Class.method``); None
    where any part is absent."""
    target = modules.get(module_name)
    for part in attribute.split("."):
        target = getattr(target, part, None)
    return target
