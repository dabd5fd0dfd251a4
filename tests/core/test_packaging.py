"""A built wheel, installed as users install it (not editable), finds its shipped presets and patches.

The wheel is built from the checkout and unpacked (a wheel's contents are its installed
layout) into a folder that comes first on ``sys.path``; every command then runs from a folder
outside the checkout, as a user's would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.hosts.everydream_standin import make_standin as make_everydream_standin
from tests.hosts.kohya_standin import make_standin

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a clean copy: setuptools' build/ folder of the checkout may hold stale files
    for name in ("sdplug", "presets", "patches"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("sdplug-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_sdplug(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "sdplug", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow  # builds the wheel and a venv for it (about a minute); CI runs the slow suite
def test_the_wheel_holds_every_module_of_the_source(installed):
    """Every module of ``sdplug/`` is in the wheel: a package left out of pyproject's list would
    import from a checkout's editable install here, and fail only for users."""
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sdplug").rglob("*.py") if "__pycache__" not in p.parts}
    wheel = {p.relative_to(installed).as_posix() for p in (installed / "sdplug").rglob("*.py")}
    assert source - wheel == set()


@pytest.mark.slow  # builds the wheel and a venv for it (about a minute); CI runs the slow suite
def test_the_wheel_is_what_runs(installed, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import sdplug; print(sdplug.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(installed)


@pytest.mark.slow  # builds the wheel and a venv for it (about a minute); CI runs the slow suite
def test_every_shipped_preset_by_name_from_a_wheel(installed, tmp_path):
    names = sorted(p.stem for p in (ROOT / "presets").glob("*.toml"))
    assert names, "the checkout ships presets"
    for name in names:
        shown = run_sdplug(installed, tmp_path, "show", name)
        assert shown.returncode == 0, shown.stderr
        assert "[preset]" in shown.stdout
        validated = run_sdplug(installed, tmp_path, "validate", name)
        assert validated.returncode == 0, validated.stderr
        assert validated.stdout.startswith(f"ok: {name}")


@pytest.mark.slow  # builds the wheel and a venv for it (about a minute); CI runs the slow suite
def test_shipped_patches_are_found_from_a_wheel(installed, tmp_path):
    """The shipped manifest and every patch it lists are installed and read from the package; a
    stand-in tree (not sd-scripts' own files) is refused by that manifest and left untouched.
    The byte-for-byte round trip needs sd-scripts' real files: the real-checkout tests do it."""
    for host in ("kohya", "everydream"):
        manifest = json.loads((ROOT / "patches" / host / "manifest.json").read_text())
        for version, files in manifest.items():
            for relative in files:
                assert (installed / "sdplug" / "_patches" / host / version / f"{relative}.patch").is_file()
    tree = make_standin(tmp_path / "sd-scripts", "main")
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    done = run_sdplug(installed, tmp_path, "patch", "kohya", str(tree))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # the refusal comes from the shipped manifest, which lists files the stand-in lacks
    assert "nothing was changed" in done.stderr and "fine_tune.py" in done.stderr
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()} == before
    # EveryDream2: the stand-in's train.py is not EveryDream2 main's, so the shipped manifest refuses it
    ed2 = make_everydream_standin(tmp_path / "ed2")
    ed2_before = (ed2 / "train.py").read_bytes()
    done = run_sdplug(installed, tmp_path, "patch", "everydream", str(ed2))
    assert done.returncode == 1 and "Traceback" not in done.stderr and "local changes" in done.stderr
    assert (ed2 / "train.py").read_bytes() == ed2_before
