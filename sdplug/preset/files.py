"""Preset files read safely: a reference resolved to a shipped preset or a path, only regular
UTF-8 files read (never a directory, a device or a FIFO), TOML parsed with a nesting limit, and
``extends`` allowed to open only a shipped preset or a regular ``.toml`` file.

A preset may come from a download (a LoRA's or model folder's saved preset) and may name any
path in ``extends``; what this module refuses is what could block, never end, or print another
file's contents (``sdplug.preset`` validates what is read).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sdplug.errors import PresetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MAX_NESTING = 32  # levels of arrays / tables; a preset needs 4


def shipped_presets_dir() -> Path:
    """Where the presets shipped with sdplug live (inside the installed package, or the source tree)."""
    from sdplug.resources import shipped_dir

    return shipped_dir("presets")


def shipped_preset_names() -> list[str]:
    return sorted(p.stem for p in shipped_presets_dir().glob("*.toml"))


def resolve_preset_path(reference: str, relative_to: Path | None = None) -> Path:
    """A preset reference (a shipped preset's name, or a path) as a path that exists.

    What exists there is not checked: ``read_toml`` refuses what is not a regular file, and
    ``extends`` more (see ``extended_path``), each saying what it found.
    """
    candidate = Path(reference)
    looks_like_path = candidate.suffix == ".toml" or len(candidate.parts) > 1
    if looks_like_path:
        if relative_to is not None and not candidate.is_absolute():
            candidate = relative_to / candidate
        if _exists(candidate):
            return candidate
        raise FileNotFoundError(str(candidate))
    if relative_to is not None and _exists(relative_to / f"{reference}.toml"):
        return relative_to / f"{reference}.toml"
    shipped = shipped_presets_dir() / f"{reference}.toml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(reference)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is reported when it is read


def read_toml(path: Path) -> dict[str, Any]:
    return parse_toml(read_regular_file(path), str(path))


def read_regular_file(path: Path) -> str:
    """The file's text; anything but a regular file is refused, never read (a device or a FIFO could
    block or never end)."""
    try:
        kind = kind_of(os.stat(path).st_mode)
        if kind is None:
            # O_NONBLOCK: should the file be swapped for a FIFO after the stat, opening it must not block
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as file:
                kind = kind_of(os.fstat(file.fileno()).st_mode)
                data = file.read() if kind is None else b""
    except OSError as exc:
        raise PresetError(f"cannot read the file: {exc}", path=str(path)) from None
    if kind is not None:
        raise PresetError(
            f"it is {kind}, {'not a preset file' if kind == 'a directory' else 'so it is not read'}. "
            "Allowed: a TOML preset file, or a shipped preset's name "
            f"({', '.join(shipped_preset_names())}).",
            path=str(path),
        )
    try:
        return data.decode("utf-8-sig")  # -sig: accept (and drop) a leading BOM
    except UnicodeDecodeError as exc:
        raise PresetError(
            f"cannot read the file: it is not UTF-8 text ({exc.reason} at byte {exc.start}). Allowed: a UTF-8 TOML file.",
            path=str(path),
        ) from None


def kind_of(mode: int) -> str | None:
    """None for a regular file; otherwise what it is, in words."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return f"not a regular file ({name})"
    return "not a regular file (a socket or another special file)"


def parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"not valid TOML: {exc}", path=path) from None
    except RecursionError:  # tomllib recurses once per level of nesting, without a limit of its own
        raise PresetError(_too_deep(), path=path) from None
    if not data:
        raise PresetError(
            "the file is empty (no keys, only whitespace or comments), so it would train with no strategy at all. "
            "Allowed: at least one section such as [preset], [[noise]] or [timesteps]; see `sdplug show tiny-default`.",
            path=path,
        )
    return data


def _too_deep() -> str:
    return (
        f"arrays or inline tables are nested more than {MAX_NESTING} levels deep. "
        f"Allowed: at most {MAX_NESTING} levels (a preset needs 4: section, table, key, list)."
    )


def check_nesting(data: Mapping[str, Any], path: str) -> None:
    """Refuse data nested deeper than any preset is, before anything recurses into it."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, key, depth = stack.pop()
        if depth > MAX_NESTING:
            raise PresetError(_too_deep(), path=path, key=key or None)
        if isinstance(value, Mapping):
            children: Iterable[tuple[str, Any]] = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            children = ((f"{key}[{i}]", v) for i, v in enumerate(value))
        else:
            continue
        # the key path names where the deep value starts, not every level of it
        stack.extend((v, k if depth < 4 else key, depth + 1) for k, v in children if isinstance(v, (Mapping, list, tuple)))


def extended_path(reference: str, path: str) -> Path:
    """Where ``extends = reference`` points: a shipped preset, or a regular ``.toml`` file.

    Nothing else is opened -- not a directory, a device, a FIFO, nor any file not named
    ``.toml`` (``/etc/passwd``, ``/proc/self/environ``), even through a link named ``.toml``.
    """
    here = Path(path).parent if path != "<preset>" else None
    names = shipped_preset_names()
    allowed = f"Allowed: a path to a .toml file or one of: {', '.join(names)}."

    def refuse(what: str) -> PresetError:
        return PresetError(f"'extends' names {reference!r}, {what}. {allowed}", path=path, key="preset.extends")

    try:
        candidate = resolve_preset_path(reference, relative_to=here)
    except FileNotFoundError:
        raise refuse("which is neither a preset file nor a shipped preset") from None
    real = candidate.resolve()
    if real.suffix != ".toml" or candidate.suffix != ".toml":
        shown = candidate if real == candidate.absolute() else f"{candidate} (which leads to {real})"
        raise refuse(f"which is not a .toml file: {shown}")
    try:
        kind = kind_of(os.stat(real).st_mode)
    except OSError as exc:
        raise refuse(f"which cannot be read ({exc.strerror})") from None
    if kind is not None:
        raise refuse(f"which is {kind}")
    return candidate
