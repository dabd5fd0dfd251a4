"""``sdplug patch`` / ``sdplug unpatch`` never write outside the tree and never leave it half patched.

For every host (sd-scripts, EveryDream2, diffusers' example scripts), on stand-in trees: a
symbolic link among the files to patch, a folder that leads out of the tree, a read-only file or
tree, a failure half-way through writing, a script that is not UTF-8 and a DIRECTORY that is not
a folder are each refused through the CLI (``error: ...``, exit 1, no traceback), with every
file in and around the tree left as it was, bytes and mode.

Tests may run as root, where a read-only mode does not stop a write: there, the permission check
is made to see the read-only files as the operating system would for a user (``os.access``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from sdplug.cli import main
from sdplug.hosts.everydream import patching as everydream_patching
from sdplug.hosts.kohya import patching as kohya_patching
from tests.hosts import everydream_standin, kohya_standin, make_everydream_patches, make_kohya_patches
from tests.hosts.diffusers_standin import make_dreambooth_standin, make_standin

HOSTS = ("kohya", "everydream", "diffusers-examples")


@dataclasses.dataclass
class Tree:
    host: str  # as the CLI spells it
    root: Path
    targets: list[str]  # the files `patch` rewrites, relative to root, in the order it writes them

    def cli(self, command: str, directory: Path | None = None) -> list[str]:
        return [command, self.host, str(self.root if directory is None else directory)]


def make_tree(host: str, tmp_path: Path, monkeypatch) -> Tree:
    if host == "kohya":
        root = kohya_standin.make_standin(tmp_path / "sd-scripts", "main")
        patches = tmp_path / "kohya-patches"
        patches.mkdir()
        (patches / "manifest.json").write_text(json.dumps({"main": make_kohya_patches.make_patches(root, "main", patches)}))
        monkeypatch.setattr(kohya_patching, "patches_dir", lambda: patches)
        return Tree(host, root, ["train_network.py", "sdxl_train_network.py", "train_db.py"])
    if host == "everydream":
        root = everydream_standin.make_standin(tmp_path / "ed2")
        patches = tmp_path / "everydream-patches"
        patches.mkdir()
        (patches / "manifest.json").write_text(json.dumps({"main": make_everydream_patches.make_patches(root, "main", patches)}))
        monkeypatch.setattr(everydream_patching, "patches_dir", lambda: patches)
        return Tree(host, root, ["train.py"])
    root = tmp_path / "diffusers"
    make_dreambooth_standin(root)
    make_standin(root)
    return Tree(
        host, root, ["examples/dreambooth/train_dreambooth_lora.py", "examples/text_to_image/train_text_to_image_lora.py"]
    )


@pytest.fixture(params=HOSTS)
def tree(request, tmp_path, monkeypatch) -> Tree:
    return make_tree(request.param, tmp_path, monkeypatch)


@pytest.fixture(params=[h for h in HOSTS if h != "everydream"])
def multi_file_tree(request, tmp_path, monkeypatch) -> Tree:
    """A host whose patch writes several files (EveryDream2's writes one)."""
    return make_tree(request.param, tmp_path, monkeypatch)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: links by target, folders by mode, files by bytes and mode."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_symlink():
                state[str(path.relative_to(folder))] = ("link", os.readlink(path))
            elif path.is_dir():
                state[str(path.relative_to(folder))] = ("folder", mode)
            else:
                state[str(path.relative_to(folder))] = ("file", path.read_bytes(), mode)
    return state


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *names: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for name in names:
        assert name in err, err


def make_read_only(monkeypatch, *paths: Path) -> None:
    """chmod ``paths`` read-only; where that does not stop writes (root), make the permission check
    see them as a user would."""
    for path in paths:
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if not any(os.access(path, os.W_OK) for path in paths):
        return
    denied = {os.path.abspath(path) for path in paths}
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) in denied:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def make_writable_again(folder: Path) -> None:
    """So pytest can remove the tree afterwards, as a user too."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def patched_first(tree: Tree, command: str, capsys) -> None:
    """``unpatch`` is tried on a patched tree."""
    if command == "unpatch":
        assert run_cli(tree.cli("patch"), capsys)[0] == 0


# --- symbolic links ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_target_linked_to_a_file_outside_the_tree_is_refused(tree, command, tmp_path, capsys):
    patched_first(tree, command, capsys)
    target = tree.root / tree.targets[-1]
    outside = tmp_path / "elsewhere" / target.name
    outside.parent.mkdir()
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    before = snapshot(tmp_path)

    code, err = run_cli(tree.cli(command), capsys)

    assert_refused(code, err, target.name, "symbolic link", "nothing was changed")
    assert snapshot(tmp_path) == before


def test_a_target_whose_folder_leads_out_of_the_tree_is_refused(tmp_path, monkeypatch, capsys):
    tree = make_tree("diffusers-examples", tmp_path, monkeypatch)
    folder = tree.root / "examples" / "dreambooth"
    outside = tmp_path / "elsewhere-dreambooth"
    folder.rename(outside)
    folder.symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path)

    code, err = run_cli(tree.cli("patch"), capsys)

    assert_refused(code, err, "train_dreambooth_lora.py", "outside")
    assert snapshot(tmp_path) == before


def test_a_dangling_link_for_one_script_is_refused_not_skipped(tmp_path, monkeypatch, capsys):
    tree = make_tree("diffusers-examples", tmp_path, monkeypatch)
    dangling = tree.root / "examples" / "dreambooth" / "train_dreambooth_lora.py"
    dangling.unlink()
    dangling.symlink_to(tmp_path / "gone.py")
    before = snapshot(tmp_path)

    code, err = run_cli(tree.cli("patch"), capsys)

    assert_refused(code, err, "train_dreambooth_lora.py", "symbolic link")
    assert snapshot(tmp_path) == before


def test_a_tree_reached_through_a_linked_folder_is_patched(tree, tmp_path, capsys):
    """Only links inside the tree are refused: the tree's own folder may be a link (~/sd-scripts)."""
    linked = tmp_path / "linked-tree"
    linked.symlink_to(tree.root, target_is_directory=True)
    originals = {relative: (tree.root / relative).read_bytes() for relative in tree.targets}

    assert run_cli(tree.cli("patch", linked), capsys)[0] == 0
    assert all((tree.root / r).read_bytes() != originals[r] for r in tree.targets)
    assert run_cli(tree.cli("unpatch", linked), capsys)[0] == 0
    assert {r: (tree.root / r).read_bytes() for r in tree.targets} == originals
    assert linked.is_symlink()


def test_a_hard_linked_target_is_replaced_not_written_through(tree, tmp_path, capsys):
    target = tree.root / tree.targets[0]
    backup = tmp_path / "backup-copy.py"
    os.link(target, backup)  # e.g. a `cp -al` backup of the tree
    original = backup.read_bytes()

    assert run_cli(tree.cli("patch"), capsys)[0] == 0

    assert target.read_bytes() != original and backup.read_bytes() == original


# --- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_read_only_target_is_refused_before_anything_is_written(tree, command, tmp_path, monkeypatch, capsys):
    patched_first(tree, command, capsys)
    read_only = tree.root / tree.targets[-1]  # the last one written: the others would be first
    make_read_only(monkeypatch, read_only)
    before = snapshot(tmp_path)
    try:
        code, err = run_cli(tree.cli(command), capsys)
        assert_refused(code, err, read_only.name, "not writable", "nothing was changed")
        assert snapshot(tmp_path) == before
    finally:
        make_writable_again(tree.root)


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_wholly_read_only_tree_gets_one_clear_error(tree, command, tmp_path, monkeypatch, capsys):
    patched_first(tree, command, capsys)
    everything = [Path(d) / n for d, dirs, files in os.walk(tree.root) for n in [*dirs, *files]]
    make_read_only(monkeypatch, tree.root, *everything)
    before = snapshot(tmp_path)
    try:
        code, err = run_cli(tree.cli(command), capsys)
        assert_refused(code, err, "not writable", *(Path(t).name for t in tree.targets))
        assert snapshot(tmp_path) == before
    finally:
        make_writable_again(tree.root)


def test_a_patched_read_only_tree_patches_as_a_no_op(tree, tmp_path, monkeypatch, capsys):
    """Nothing to write, so nothing to refuse: `patch` on a patched tree only reports."""
    assert run_cli(tree.cli("patch"), capsys)[0] == 0
    everything = [Path(d) / n for d, dirs, files in os.walk(tree.root) for n in [*dirs, *files]]
    make_read_only(monkeypatch, tree.root, *everything)
    try:
        assert main(tree.cli("patch")) == 0
        assert "already patched" in capsys.readouterr().out
    finally:
        make_writable_again(tree.root)


# --- all or nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_failure_half_way_through_restores_every_file(multi_file_tree, command, tmp_path, monkeypatch, capsys):
    tree = multi_file_tree
    patched_first(tree, command, capsys)
    before = snapshot(tmp_path)
    real_replace, calls = os.replace, []

    def replace_failing_the_second(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_the_second)

    code, err = run_cli(tree.cli(command), capsys)

    assert len(calls) > 2  # the first file was written, then put back
    assert_refused(code, err, Path(tree.targets[1]).name, "No space left on device", "nothing was changed")
    assert snapshot(tmp_path) == before  # bytes and modes, and no staged copies left behind


def test_a_failure_while_staging_leaves_nothing_behind(multi_file_tree, tmp_path, monkeypatch, capsys):
    tree = multi_file_tree
    before = snapshot(tmp_path)
    real_mkstemp, calls = tempfile.mkstemp, []

    def mkstemp_failing_the_second(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_failing_the_second)

    code, err = run_cli(tree.cli("patch"), capsys)

    assert_refused(code, err, Path(tree.targets[1]).name, "Disk quota exceeded", "nothing was changed")
    assert snapshot(tmp_path) == before


def test_file_modes_survive_patch_and_unpatch(tree, capsys):
    modes = {}
    for index, relative in enumerate(tree.targets):
        path = tree.root / relative
        path.chmod((0o755, 0o640, 0o604)[index % 3])
        modes[relative] = stat.S_IMODE(path.stat().st_mode)
    originals = {relative: (tree.root / relative).read_bytes() for relative in tree.targets}

    assert run_cli(tree.cli("patch"), capsys)[0] == 0
    assert {r: stat.S_IMODE((tree.root / r).stat().st_mode) for r in tree.targets} == modes
    assert all((tree.root / r).read_bytes() != originals[r] for r in tree.targets)
    assert run_cli(tree.cli("unpatch"), capsys)[0] == 0
    assert {r: stat.S_IMODE((tree.root / r).stat().st_mode) for r in tree.targets} == modes
    assert {r: (tree.root / r).read_bytes() for r in tree.targets} == originals


# --- what the tree is ---------------------------------------------------------------------------


def test_a_script_that_is_not_utf8_is_refused(tmp_path, monkeypatch, capsys):
    tree = make_tree("diffusers-examples", tmp_path, monkeypatch)
    script = tree.root / tree.targets[1]
    script.write_bytes(script.read_bytes().replace(b"import os\n", b"import os  # \xe9t\xe9\n", 1))
    before = snapshot(tmp_path)

    code, err = run_cli(tree.cli("patch"), capsys)

    assert_refused(code, err, script.name, "UTF-8")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_directory_that_does_not_exist_is_named(tree, command, tmp_path, capsys):
    missing = tmp_path / "no-such-tree"
    code, err = run_cli(tree.cli(command, missing), capsys)
    assert_refused(code, err, str(missing), "no such folder", f"sdplug {command} {tree.host} DIR")


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_directory_that_is_a_file_is_named(tree, command, capsys):
    a_file = tree.root / tree.targets[0]
    before = a_file.read_bytes()
    code, err = run_cli(tree.cli(command, a_file), capsys)
    assert_refused(code, err, str(a_file), "not a folder", f"sdplug {command} {tree.host} DIR")
    assert a_file.read_bytes() == before


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_a_folder_that_is_not_sd_scripts_suggests_the_patch_command(command, tmp_path, capsys):
    empty = tmp_path / "not-sd-scripts"
    empty.mkdir()
    code, err = run_cli([command, "kohya", str(empty)], capsys)
    assert_refused(code, err, str(empty), "library/train_util.py", f"sdplug {command} kohya DIR")
    assert "--sd-scripts" not in err


@pytest.mark.parametrize("command", ["patch", "unpatch"])
def test_an_unreadable_file_of_the_tree_is_named(command, tmp_path, monkeypatch, capsys):
    tree = make_tree("kohya", tmp_path, monkeypatch)
    unreadable = tree.root / "library" / "train_util.py"  # read to recognise the version
    unreadable.chmod(0)
    try:
        if os.access(unreadable, os.R_OK):  # root reads it anyway: refuse it as the system would a user
            real_read_text = Path.read_text

            def read_text(self, *args, **kwargs):
                if self == unreadable:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_read_text(self, *args, **kwargs)

            monkeypatch.setattr(Path, "read_text", read_text)
        before = snapshot(tmp_path)
        code, err = run_cli(tree.cli(command), capsys)
        assert_refused(code, err, str(unreadable), "Permission denied", "nothing was changed")
        assert snapshot(tmp_path) == before
    finally:
        unreadable.chmod(0o644)
