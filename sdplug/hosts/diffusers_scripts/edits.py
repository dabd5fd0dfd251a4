"""The source patch of each supported diffusers training script, and its exact reversal.

A script is recognised by its fingerprint: every anchor line of its edits must occur exactly
once. The patch only inserts lines, each ending in ``MARK``; the first names the SHA-256 of the
original file, so ``unpatch`` removes the marked lines and checks that the result is the
original byte for byte (a patched file changed since is refused, as is a file with CRLF line
endings or an anchor missing or doubled). The inserted lines do nothing unless the script is
given ``--sdplug_preset`` (``sdplug diffusers`` passes it): each returns the script's own value.
A tree's scripts are written all or nothing, never through a link (``sdplug.hosts.patch_files``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts.diffusers_scripts.edit import MARK, Edit
from sdplug.hosts.diffusers_scripts.flow_edits import FLOW_EDITS
from sdplug.hosts.diffusers_scripts.sd_edits import SD_EDITS
from sdplug.hosts.patch_files import Rewrite, check_targets, decode_target, read_target, replace_files, tree_folder

VERSION = "main-2026-08"  # the diffusers examples these edits fit (the audit's host version)

_HEADER = re.compile(r"^# sdplug patch: original sha256 ([0-9a-f]{64})" + re.escape(MARK) + r"\n$")
EDITS: dict[str, list[Edit]] = {**SD_EDITS, **FLOW_EDITS}
SCRIPTS = tuple(EDITS)
FOLDERS = {"train_text_to_image_lora.py": "text_to_image", "train_text_to_image_lora_sdxl.py": "text_to_image"}


class DiffusersScriptError(SdplugError):
    """A script (or tree) the diffusers host does not know, or a patch that does not fit."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line_index(lines: list[str], edit: Edit, script: str) -> int:
    hits = [i for i, line in enumerate(lines) if line.startswith(edit.anchor)]
    if len(hits) != 1:
        raise DiffusersScriptError(
            f"{script}: the line starting {edit.anchor.strip()!r} occurs {len(hits)} times (expected once): a version of "
            "the script sdplug does not know, or a changed copy. Nothing was changed; supported: diffusers' examples "
            "at main (2026-08)."
        )
    index = hits[0]
    if edit.until is not None:
        ends = [i for i in range(index, len(lines)) if lines[i] == edit.until + "\n"]
        if not ends:
            raise DiffusersScriptError(f"{script}: no line {edit.until!r} after {edit.anchor.strip()!r}; nothing was changed.")
        return ends[0] + 1
    return index if edit.before else index + 1


def edits_for(script: str) -> list[Edit]:
    if script not in EDITS:
        raise DiffusersScriptError(f"{script}: the sdplug diffusers host supports {', '.join(sorted(EDITS))}.")
    return EDITS[script]


def _header(lines: list[str]) -> re.Match[str] | None:
    """The header line: first, or second after a ``#!`` line (which must stay first)."""
    for line in lines[:2]:
        match = _HEADER.match(line)
        if match:
            return match
    return None


def is_patched(text: str) -> bool:
    return _header(text.splitlines(keepends=True)) is not None


def fingerprint(text: str, script: str) -> str:
    """The version name of a known original script (raises naming the anchor that does not fit)."""
    if "\r\n" in text:
        raise DiffusersScriptError(f"{script}: CRLF line endings; the patch fits the script as diffusers ships it (LF).")
    lines = text.splitlines(keepends=True)
    for edit in edits_for(script):
        _line_index(lines, edit, script)
    return VERSION


def patch_source(text: str, script: str) -> str:
    """The patched script (``text`` must be a known original)."""
    if is_patched(text):
        raise DiffusersScriptError(f"{script}: already patched by sdplug.")
    fingerprint(text, script)
    lines = text.splitlines(keepends=True)
    inserts = sorted(((_line_index(lines, e, script), e) for e in edits_for(script)), key=lambda pair: pair[0])
    position = 1 if lines and lines[0].startswith("#!") else 0
    out = [*lines[:position], f"# sdplug patch: original sha256 {sha256(text.encode('utf-8'))}{MARK}\n"]
    for index, edit in inserts:
        out += lines[position:index]
        out += [line + MARK + "\n" for line in edit.text.split("\n")]
        position = index
    return "".join(out + lines[position:])


def unpatch_source(text: str, script: str) -> str:
    """The original script back from ``patch_source``'s output, checked byte for byte."""
    lines = text.splitlines(keepends=True)
    match = _header(lines)
    if match is None:
        raise DiffusersScriptError(f"{script}: not patched by sdplug (no header line).")
    original = "".join(line for line in lines if not line.endswith(MARK + "\n"))
    if sha256(original.encode("utf-8")) != match.group(1):
        raise DiffusersScriptError(
            f"{script}: changed since sdplug patched it; removing the patch would not give the original back. Nothing was changed."
        )
    return original


def find_scripts(directory: Path) -> list[tuple[str, Path]]:
    """The supported scripts in a diffusers checkout (``examples/...``), an ``examples`` folder,
    or a folder holding the scripts themselves."""
    directory = Path(directory)
    found = []
    for script in sorted(EDITS):
        folder = FOLDERS.get(script, "dreambooth")
        for candidate in (directory / script, directory / folder / script, directory / "examples" / folder / script):
            # a link (even dangling) or a folder by the script's name is found, so that patching
            # refuses it by name instead of skipping it
            if candidate.is_symlink() or candidate.exists():
                found.append((script, candidate))
                break
    if not found:
        raise DiffusersScriptError(
            f"{directory}: none of {', '.join(sorted(EDITS))} found (checked DIR, DIR/<folder>, DIR/examples/<folder>)."
        )
    return found


def _tree(directory: Path, command: str) -> tuple[Path, list[tuple[str, Path]]]:
    """The folder and its supported scripts, each one the tree's own regular file (else refused)."""
    root = tree_folder(
        directory,
        usage=f"sdplug {command} diffusers-examples DIR",
        what="a diffusers checkout, its examples folder or a folder holding the scripts",
        error=DiffusersScriptError,
    )
    scripts = find_scripts(root)
    check_targets(root, [path for _, path in scripts])
    return root, scripts


def apply(directory: Path) -> list[str]:
    """``sdplug patch diffusers-examples DIR``: every found script patched, all checked first,
    then written all or nothing."""
    root, scripts = _tree(directory, "patch")
    rewrites, results = [], []
    for script, path in scripts:
        data = read_target(path)
        text = decode_target(path, data)
        if is_patched(text):
            unpatch_source(text, script)  # refuse a patched file changed since
            results.append(f"already patched: {path}")
            continue
        rewrites.append(Rewrite(path, data, patch_source(text, script).encode("utf-8")))
    replace_files(root, rewrites)
    results += [f"patched: {rewrite.path} (accepts --sdplug_preset PATH)" for rewrite in rewrites]
    return results


def revert(directory: Path) -> list[str]:
    """``sdplug unpatch diffusers-examples DIR``: every patched script back to its original bytes,
    all or nothing."""
    root, scripts = _tree(directory, "unpatch")
    rewrites, results = [], []
    for script, path in scripts:
        data = read_target(path)
        text = decode_target(path, data)
        if not is_patched(text):
            results.append(f"not patched: {path}")
            continue
        rewrites.append(Rewrite(path, data, unpatch_source(text, script).encode("utf-8")))
    replace_files(root, rewrites)
    return results + [f"restored: {rewrite.path}" for rewrite in rewrites]
