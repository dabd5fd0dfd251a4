"""Writing sdplug's EveryDream2 patch from an EveryDream2 checkout (maintainer tooling, not shipped).

    python tests/hosts/make_everydream_patches.py ED2_TREE VERSION patches/everydream

writes ``patches/everydream/<VERSION>/train.py.patch`` and that version's entry of
``manifest.json`` (SHA-256 of train.py before and after). The tests use ``make_patches`` to
build the patch for the stand-in tree.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's sdplug, like the tests
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdplug.hosts.everydream import patching  # noqa: E402
from sdplug.hosts.patch_files import PatchError, sha256  # noqa: E402

_PLUGINS_OPTION = re.compile(r"^    argparser\.add_argument\(['\"]--plugins['\"]")


def _insert(lines: list[str], anchor: str, new: str, *, before: bool) -> None:
    if lines.count(anchor) != 1:
        raise PatchError(f"the anchor {anchor.strip()!r} is not found exactly once")
    index = lines.index(anchor) + (0 if before else 1)
    lines[index:index] = new.splitlines(keepends=True)


def patched_text(text: str) -> str:
    """train.py with the plugin's loss picked up, the closure's loss routed, and the option."""
    lines = text.splitlines(keepends=True)
    _insert(lines, patching.LOAD_ANCHOR, patching.LOAD_LINES, before=True)
    _insert(lines, patching.LOSS_ANCHOR, patching.LOSS_LINES, before=True)
    options = [i for i, line in enumerate(lines) if _PLUGINS_OPTION.match(line)]
    if len(options) != 1:
        raise PatchError("the --plugins option of the argument parser is not found exactly once")
    lines[options[0] + 1 : options[0] + 1] = [patching.OPTION_LINE]
    return "".join(lines)


def make_patches(tree: Path, version_name: str, output: Path) -> dict:
    original = (Path(tree) / patching.PATCHED_FILE).read_text(encoding="utf-8")
    patched = patched_text(original)
    name = patching.PATCHED_FILE
    diff = difflib.unified_diff(
        original.splitlines(keepends=True), patched.splitlines(keepends=True), f"a/{name}", f"b/{name}", n=2
    )
    (output / version_name).mkdir(parents=True, exist_ok=True)
    (output / version_name / f"{name}.patch").write_text("".join(diff))
    return {name: {"original": sha256(original.encode("utf-8")), "patched": sha256(patched.encode("utf-8"))}}


if __name__ == "__main__":
    tree, version, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[version] = make_patches(tree, version, out)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out / version} and {manifest_path}")
