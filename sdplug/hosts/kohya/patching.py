"""``sdplug patch kohya DIR`` / ``sdplug unpatch kohya DIR``: the patch route for GUI users.

The patches (``patches/kohya/<version>/<script>.patch``, unified diffs) add a
``--sdplug_preset PATH`` option to sd-scripts' training scripts and, when it is given, call
``sdplug.hosts.kohya.runtime.activate`` right after the script reads its arguments.
``patches/kohya/manifest.json`` holds the SHA-256 of every touched file before and after;
how they are applied, checked and reversed byte for byte is ``sdplug.hosts.patch_files``.
"""

from __future__ import annotations

from pathlib import Path

from sdplug.hosts.kohya.version import KohyaVersionError, detect
from sdplug.hosts.patch_files import PatchError, PatchSet, apply_diff, parse_diff, sha256, tree_folder

__all__ = ["PatchError", "apply", "apply_diff", "parse_diff", "patches_dir", "revert", "sha256"]


def patches_dir() -> Path:
    from sdplug.resources import shipped_dir

    return shipped_dir("patches") / "kohya"


def _patches(directory: Path, command: str) -> tuple[Path, PatchSet]:
    root = tree_folder(
        directory,
        usage=f"sdplug {command} kohya DIR",
        what="the sd-scripts folder",
        required=("library/train_util.py",),
        error=KohyaVersionError,
    )
    version = detect(root)
    return root, PatchSet(f"sd-scripts {version.name}", patches_dir(), version.name)


def apply(directory: Path) -> list[str]:
    """Patch every script of the tree; returns what was done, one line per file."""
    root, patches = _patches(directory, "patch")
    return patches.apply(root) + [f"{patches.host} in {root}: scripts accept --sdplug_preset PATH"]


def revert(directory: Path) -> list[str]:
    """Undo ``apply``: every touched script back to the original bytes."""
    root, patches = _patches(directory, "unpatch")
    return patches.revert(root)
