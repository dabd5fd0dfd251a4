"""Shipped source patches, applied and reversed byte for byte: the patch route of every host.

A host's patches live in ``patches/<host>/<version>/<file>.patch`` (unified diffs) with
``patches/<host>/manifest.json`` holding the SHA-256 of every touched file before and after, so:

- a tree whose version is not recognised, or whose touched files differ from the known
  originals (local changes, other line endings), is refused and left untouched;
- patching a patched tree does nothing (idempotent);
- every file is patched (or restored) in memory and checked against the manifest before the
  first one is written: never a half-patched tree;
- unpatching reverses the diffs and checks the result is the original, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from sdplug.errors import SdplugError

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(SdplugError):
    """A tree the patches do not fit, or a patch that does not apply exactly."""


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


@dataclasses.dataclass(frozen=True)
class PatchSet:
    """One host version's patches: ``host`` names it in messages ("sd-scripts main")."""

    host: str
    folder: Path  # patches/<host>: manifest.json and one folder per version
    version: str

    def _work(self, directory: Path) -> list[tuple[str, Path, dict[str, str], str]]:
        manifest = json.loads((self.folder / "manifest.json").read_text()).get(self.version)
        if manifest is None:
            raise PatchError(f"{directory}: {self.host} has no sdplug patches.")
        work = []
        for relative, hashes in manifest.items():
            path = Path(directory) / relative
            if not path.is_file():
                raise PatchError(f"{directory}: {relative} is missing; nothing was changed.")
            current = sha256(path.read_bytes())
            if current == hashes["original"]:
                state = "original"
            elif current == hashes["patched"]:
                state = "patched"
            else:
                raise PatchError(
                    f"{path}: differs from {self.host}'s file (local changes, or other line endings); "
                    "refusing to patch or unpatch it. Nothing was changed."
                )
            work.append((relative, path, hashes, state))
        return work

    def _rewrite(self, directory: Path, *, reverse: bool) -> list[str]:
        skip, want = ("original", "original") if reverse else ("patched", "patched")
        results, staged = [], []
        for relative, path, hashes, state in self._work(directory):
            if state == skip:
                results.append(f"{'not patched' if reverse else 'already patched'}: {relative}")
                continue
            diff = (self.folder / self.version / f"{relative}.patch").read_text()
            text = apply_diff(path.read_bytes().decode("utf-8"), diff, reverse=reverse)
            if sha256(text.encode("utf-8")) != hashes[want]:
                result = "reversing the patch does not give the original file back" if reverse else (
                    "the patched result is not the expected file"
                )
                raise PatchError(f"{path}: {result}; nothing was changed.")
            staged.append((relative, path, text))
        for relative, path, text in staged:  # all verified first
            path.write_bytes(text.encode("utf-8"))
            results.append(f"{'restored' if reverse else 'patched'}: {relative}")
        return results

    def apply(self, directory: Path) -> list[str]:
        """Patch every file of the tree; returns what was done, one line per file."""
        return self._rewrite(directory, reverse=False)

    def revert(self, directory: Path) -> list[str]:
        """Undo ``apply``: every touched file back to the original bytes."""
        return self._rewrite(directory, reverse=True)
