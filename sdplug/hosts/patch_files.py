"""Shipped source patches, applied and reversed byte for byte: the patch route of every host.

A host's patches live in ``patches/<host>/<version>/<file>.patch`` (unified diffs) with
``patches/<host>/manifest.json`` holding the SHA-256 of every touched file before and after, so:

- a tree whose version is not recognised, or whose touched files differ from the known
  originals (local changes, other line endings), is refused and left untouched;
- patching a patched tree does nothing (idempotent);
- every file is patched (or restored) in memory and checked against the manifest before the
  first one is written: never a half-patched tree;
- unpatching reverses the diffs and checks the result is the original, byte for byte.

Writing is shared by every host's ``patch`` / ``unpatch`` (``replace_files``): only the tree's own
regular files are rewritten (never through a symbolic link, never a file whose real path leaves
the tree), every one must be writable before the first is touched, each new content is staged
next to its file with the file's mode and renamed over it, and a failure half-way puts back
every file already renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from sdplug.errors import SdplugError

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(SdplugError):
    """A tree the patches do not fit, or a patch that does not apply exactly."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_folder(
    directory: Path,
    *,
    usage: str,
    what: str,
    required: Sequence[str] = (),
    error: type[SdplugError] = PatchError,
) -> Path:
    """``directory`` checked as the tree ``usage`` (``sdplug patch kohya DIR``) takes: an existing
    folder holding every ``required`` file; else ``error`` naming it and saying what DIR is."""
    directory = Path(directory)
    advice = f"nothing was changed. `{usage}` takes {what}."
    if not directory.exists():
        raise error(f"{directory}: no such folder; {advice}")
    if not directory.is_dir():
        raise error(f"{directory}: not a folder; {advice}")
    absent = [relative for relative in required if not (directory / relative).is_file()]
    if absent:
        raise error(f"{directory}: not {what} (no {', '.join(absent)}); {advice}")
    return directory


def check_targets(root: Path, paths: Iterable[Path]) -> None:
    """Refuse, naming every one, files to rewrite that are symbolic links (dangling or not), missing,
    not regular files, or whose real path leaves ``root`` (through a linked folder)."""
    real_root = Path(root).resolve()
    problems, linked = [], False
    for path in paths:
        if path.is_symlink():
            problems.append(f"{path} is a symbolic link (to {os.readlink(path)})")
            linked = True
        elif not path.exists():
            problems.append(f"{path} is missing")
        elif not path.is_file():
            problems.append(f"{path} is not a regular file")
        elif not path.resolve().is_relative_to(real_root):
            problems.append(f"{path} is really {path.resolve()}, outside {root} (a folder on the way is a link)")
            linked = True
    if problems:
        advice = (
            " sdplug rewrites only the tree's own files, never through a link: replace a link with a copy of its "
            "file to patch that copy."
            if linked
            else ""
        )
        raise PatchError(f"{'; '.join(problems)}; nothing was changed.{advice}")


def read_target(path: Path) -> bytes:
    """The bytes of a file to patch, or a ``PatchError`` naming it (an unreadable file)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PatchError(f"{path}: cannot be read ({exc.strerror or exc}); nothing was changed.") from exc


def decode_target(path: Path, data: bytes) -> str:
    """``data`` (read from ``path``) as UTF-8 text, or a ``PatchError`` naming the file and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchError(
            f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start : exc.start + 1]!r}); the patch fits the file "
            "as its project ships it (UTF-8); nothing was changed."
        ) from exc


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One file's content before (as read and checked) and after."""

    path: Path
    before: bytes
    after: bytes


def replace_files(root: Path, rewrites: Sequence[Rewrite]) -> None:
    """Write every rewrite or none: all targets checked (the tree's own regular files, writable,
    in writable folders), all new contents staged, then each renamed over its file; on a failure
    the files already renamed get their old content back (mode kept throughout)."""
    if not rewrites:
        return
    check_targets(root, [rewrite.path for rewrite in rewrites])
    files = [str(rewrite.path) for rewrite in rewrites if not os.access(rewrite.path, os.W_OK)]
    # the new content is written next to its file, then renamed over it: the folder must allow both
    folders = {str(r.path.parent): None for r in rewrites if not os.access(r.path.parent, os.W_OK | os.X_OK)}
    if files or folders:
        named = [", ".join(files)] if files else []
        named += (
            [f"the folder{'s' if len(folders) > 1 else ''} {', '.join(folders)} (sdplug writes next to each file, then renames)"]
            if folders
            else []
        )
        raise PatchError(
            f"not writable: {'; '.join(named)}; nothing was changed. Make them writable (chmod u+w) "
            "or patch a writable copy of the tree."
        )
    modes = {rewrite.path: stat.S_IMODE(rewrite.path.stat().st_mode) for rewrite in rewrites}
    staged: list[Path] = []
    try:
        for rewrite in rewrites:
            staged.append(_stage(rewrite.path, rewrite.after, modes[rewrite.path]))
    except BaseException as exc:
        _discard(staged)
        if isinstance(exc, OSError):
            failed = rewrites[len(staged)].path
            raise PatchError(
                f"{failed}: could not write its new content next to it ({exc.strerror or exc}); nothing was changed."
            ) from exc
        raise
    renamed: list[Rewrite] = []
    try:
        for rewrite, staged_file in zip(rewrites, staged, strict=True):
            os.replace(staged_file, rewrite.path)
            renamed.append(rewrite)
    except BaseException as exc:  # an interrupt too: never leave the tree half written
        _discard(staged[len(renamed) :])
        left = _put_back(renamed, modes)
        if not isinstance(exc, OSError):
            raise
        failed = rewrites[len(renamed)].path
        if left:
            raise PatchError(
                f"{failed}: could not be replaced ({exc.strerror or exc}), and putting back the files already "
                f"written failed for {'; '.join(left)}: those hold their new content, every other file its old one."
            ) from exc
        raise PatchError(
            f"{failed}: could not be replaced ({exc.strerror or exc}); the {len(renamed)} file(s) already written "
            "were put back, so nothing was changed."
        ) from exc


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file next to ``path``, with ``mode`` (flushed to disk before any rename)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".sdplug-staged")
    staged = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        _keep_owner(staged, path)
        os.chmod(staged, mode)  # after chown, which may clear set-id bits
    except BaseException:
        _discard([staged])
        raise
    return staged


def _keep_owner(staged: Path, path: Path) -> None:
    """Give the staged file ``path``'s owner where allowed (root patching a user's tree). A user
    rewriting a group-writable file owned by someone else cannot, and ends up owning the new file,
    as with any editor that saves by renaming."""
    current, wanted = staged.stat(), path.stat()
    if (current.st_uid, current.st_gid) != (wanted.st_uid, wanted.st_gid):
        try:
            os.chown(staged, wanted.st_uid, wanted.st_gid)
        except PermissionError:
            pass


def _discard(staged_files: Iterable[Path]) -> None:
    for staged in staged_files:
        try:
            staged.unlink()
        except FileNotFoundError:
            pass


def _put_back(renamed: Sequence[Rewrite], modes: dict[Path, int]) -> list[str]:
    """Each renamed file's old content restored the same way; the ones that failed, with why."""
    failed = []
    for rewrite in reversed(renamed):
        try:
            os.replace(_stage(rewrite.path, rewrite.before, modes[rewrite.path]), rewrite.path)
        except OSError as exc:
            failed.append(f"{rewrite.path} ({exc.strerror or exc})")
    return failed


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

    def _work(self, directory: Path) -> list[tuple[str, Path, dict[str, str], str, bytes]]:
        manifest = json.loads((self.folder / "manifest.json").read_text()).get(self.version)
        if manifest is None:
            raise PatchError(f"{directory}: {self.host} has no sdplug patches.")
        check_targets(Path(directory), [Path(directory) / relative for relative in manifest])
        work = []
        for relative, hashes in manifest.items():
            path = Path(directory) / relative
            data = read_target(path)
            current = sha256(data)
            if current == hashes["original"]:
                state = "original"
            elif current == hashes["patched"]:
                state = "patched"
            else:
                raise PatchError(
                    f"{path}: differs from {self.host}'s file (local changes, or other line endings); "
                    "refusing to patch or unpatch it. Nothing was changed."
                )
            work.append((relative, path, hashes, state, data))
        return work

    def _rewrite(self, directory: Path, *, reverse: bool) -> list[str]:
        skip, want = ("original", "original") if reverse else ("patched", "patched")
        results, rewrites, written = [], [], []
        for relative, path, hashes, state, data in self._work(directory):
            if state == skip:
                results.append(f"{'not patched' if reverse else 'already patched'}: {relative}")
                continue
            diff = (self.folder / self.version / f"{relative}.patch").read_text()
            new = apply_diff(decode_target(path, data), diff, reverse=reverse).encode("utf-8")
            if sha256(new) != hashes[want]:
                result = (
                    "reversing the patch does not give the original file back"
                    if reverse
                    else "the patched result is not the expected file"
                )
                raise PatchError(f"{path}: {result}; nothing was changed.")
            rewrites.append(Rewrite(path, data, new))
            written.append(f"{'restored' if reverse else 'patched'}: {relative}")
        replace_files(Path(directory), rewrites)  # all verified first, then all or nothing
        return results + written

    def apply(self, directory: Path) -> list[str]:
        """Patch every file of the tree; returns what was done, one line per file."""
        return self._rewrite(directory, reverse=False)

    def revert(self, directory: Path) -> list[str]:
        """Undo ``apply``: every touched file back to the original bytes."""
        return self._rewrite(directory, reverse=True)
