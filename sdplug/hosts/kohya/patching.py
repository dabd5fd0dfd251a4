"""``sdplug patch kohya DIR`` / ``sdplug unpatch kohya DIR``: the patch route for GUI users.

The patches (``patches/kohya/<version>/<script>.patch``, unified diffs) add a
``--sdplug_preset PATH`` option to sd-scripts' training scripts and, when it is given, call
``sdplug.hosts.kohya.runtime.activate`` right after the script reads its arguments.
``patches/kohya/manifest.json`` holds the SHA-256 of every touched file before and after, so:

- a tree whose version is not recognised, or whose touched files differ from the known
  originals (local changes, other line endings), is refused and left untouched;
- patching a patched tree does nothing (idempotent);
- unpatching reverses the diffs and checks the result is the original, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts.kohya.version import detect

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(SdplugError):
    """A tree the patches do not fit, or a patch that does not apply exactly."""


def patches_dir() -> Path:
    from sdplug.resources import shipped_dir

    return shipped_dir("patches") / "kohya"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class Hunk:
    old_start: int
    lines: list[str]  # each starts with " ", "-" or "+", newline kept


def parse_diff(text: str) -> list[Hunk]:
    hunks: list[Hunk] = []
    for line in text.splitlines(keepends=True):
        match = _HUNK.match(line)
        if match:
            hunks.append(Hunk(int(match.group(1)), []))
        elif hunks and line[:1] in (" ", "-", "+"):
            hunks[-1].lines.append(line)
    return hunks


def apply_diff(original: str, diff: str, *, reverse: bool = False) -> str:
    """Apply (or reverse) a unified diff exactly: every context and removed line must match."""
    source = original.splitlines(keepends=True)
    out: list[str] = []
    position = 0
    for hunk in parse_diff(diff):
        keep_old, keep_new = (" ", "+") if reverse else (" ", "-"), (" ", "-") if reverse else (" ", "+")
        old_lines = [line[1:] for line in hunk.lines if line[0] in keep_old]
        new_lines = [line[1:] for line in hunk.lines if line[0] in keep_new]
        start = _find(source, old_lines, hunk.old_start - 1, position, reverse, hunk)
        out += source[position:start]
        out += new_lines
        position = start + len(old_lines)
    out += source[position:]
    return "".join(out)


def _find(source: list[str], block: list[str], hint: int, position: int, reverse: bool, hunk: Hunk) -> int:
    candidates = [hint] if not reverse else []
    candidates += list(range(position, len(source) - len(block) + 1))
    for start in candidates:
        if start >= position and source[start : start + len(block)] == block:
            return start
    raise PatchError(f"a hunk at line {hunk.old_start} does not match the file")


def _manifest() -> dict:
    return json.loads((patches_dir() / "manifest.json").read_text())


def _plan(directory: Path):
    directory = Path(directory)
    version = detect(directory)
    manifest = _manifest().get(version.name)
    if manifest is None:
        raise PatchError(f"{directory}: sd-scripts {version.name} has no sdplug patches.")
    work = []
    for relative, hashes in manifest.items():
        path = directory / relative
        if not path.is_file():
            raise PatchError(f"{directory}: {relative} is missing; nothing was changed.")
        current = sha256(path.read_bytes())
        if current == hashes["original"]:
            state = "original"
        elif current == hashes["patched"]:
            state = "patched"
        else:
            raise PatchError(
                f"{path}: differs from sd-scripts {version.name}'s file (local changes, or other line endings); "
                "refusing to patch or unpatch it. Nothing was changed."
            )
        work.append((relative, path, hashes, state))
    return version, work


def apply(directory: Path) -> list[str]:
    """Patch every script of the tree; returns what was done, one line per file."""
    version, work = _plan(directory)
    results = []
    staged = []
    for relative, path, hashes, state in work:
        if state == "patched":
            results.append(f"already patched: {relative}")
            continue
        diff = (patches_dir() / version.name / f"{relative}.patch").read_text()
        patched = apply_diff(path.read_bytes().decode("utf-8"), diff)
        if sha256(patched.encode("utf-8")) != hashes["patched"]:
            raise PatchError(f"{path}: the patched result is not the expected file; nothing was changed.")
        staged.append((relative, path, patched))
    for relative, path, patched in staged:  # all verified first: never a half-patched tree
        path.write_bytes(patched.encode("utf-8"))
        results.append(f"patched: {relative}")
    return results + [f"sd-scripts {version.name} in {directory}: scripts accept --sdplug_preset PATH"]


def revert(directory: Path) -> list[str]:
    """Undo ``apply``: every touched file back to the original bytes."""
    version, work = _plan(directory)
    results, staged = [], []
    for relative, path, hashes, state in work:
        if state == "original":
            results.append(f"not patched: {relative}")
            continue
        diff = (patches_dir() / version.name / f"{relative}.patch").read_text()
        original = apply_diff(path.read_bytes().decode("utf-8"), diff, reverse=True)
        if sha256(original.encode("utf-8")) != hashes["original"]:
            raise PatchError(f"{path}: reversing the patch does not give the original file back; nothing was changed.")
        staged.append((relative, path, original))
    for relative, path, original in staged:
        path.write_bytes(original.encode("utf-8"))
        results.append(f"restored: {relative}")
    return results
