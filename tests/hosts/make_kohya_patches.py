"""Writing sdplug's kohya patches from an sd-scripts checkout (maintainer tooling, not shipped).

    python tests/hosts/make_kohya_patches.py SD_SCRIPTS VERSION patches/kohya

writes ``patches/kohya/<VERSION>/<script>.patch`` and that version's entry of
``manifest.json`` (SHA-256 of every touched file before and after). The tests use
``make_patches`` to build patches for the stand-in trees.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's sdplug, like the tests
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdplug.hosts.kohya.patching import PatchError, sha256  # noqa: E402

OPTION_LINE = '    parser.add_argument("--sdplug_preset", type=str, default=None, help="sdplug preset (TOML): its tricks replace this script\'s own")\n'
ACTIVATE_LINES = (
    '    if getattr(args, "sdplug_preset", None):\n'
    "        import sdplug.hosts.kohya.runtime as sdplug_kohya\n"
    "\n"
    "        sdplug_kohya.activate(args, parser, globals())\n"
)


def patched_text(text: str, *, add_option: bool) -> str:
    """The script with the option and the activation inserted (anchors: setup_parser's return,
    and the read_config_from_file line of ``__main__``)."""
    lines = text.splitlines(keepends=True)
    anchor = "    args = train_util.read_config_from_file(args, parser)\n"
    if lines.count(anchor) != 1:
        raise PatchError("the __main__ anchor (read_config_from_file) is not found exactly once")
    index = lines.index(anchor) + 1
    lines[index:index] = ACTIVATE_LINES.splitlines(keepends=True)
    if add_option:
        start = next(i for i, line in enumerate(lines) if line.startswith("def setup_parser("))
        end = next(i for i in range(start, len(lines)) if lines[i] == "    return parser\n")
        lines[end:end] = [OPTION_LINE]
    return "".join(lines)


def make_patches(sd_scripts: Path, version_name: str, output: Path) -> dict:
    import difflib

    from sdplug.hosts.kohya.version import FLOW_ROUTES, SCRIPTS

    manifest = {}
    (output / version_name).mkdir(parents=True, exist_ok=True)
    # the flow scripts the adapter runs exist on main only; their parsers are train_network's
    for script in (*SCRIPTS, *(FLOW_ROUTES if version_name == "main" else ())):
        if not (Path(sd_scripts) / script).is_file():
            continue
        original = (Path(sd_scripts) / script).read_text(encoding="utf-8")
        # sdxl_train_network's parser is train_network's: the option comes from there
        patched = patched_text(original, add_option=script in SCRIPTS and script != "sdxl_train_network.py")
        diff = difflib.unified_diff(
            original.splitlines(keepends=True), patched.splitlines(keepends=True), f"a/{script}", f"b/{script}", n=2
        )
        (output / version_name / f"{script}.patch").write_text("".join(diff))
        manifest[script] = {"original": sha256(original.encode()), "patched": sha256(patched.encode())}
    return manifest


if __name__ == "__main__":
    root, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    made = make_patches(root, name, out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = made
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
