"""Files a run writes whole or not at all, with the modes the user's umask asks for.

Every output is written under a temporary name (``NAME.tmp-<pid>``) and renamed into place when
complete, so an interrupted run leaves a whole file or folder, or none. Outputs follow the
user's umask (safetensors and torch create their files 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and all it holds) the modes the user's umask asks for."""
    umask = _umask()
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def remove_path(path: Path) -> None:
    """A file, a link or a folder tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic(path: Path):
    """Yield a temporary sibling of ``path``; write the file or folder there; it is renamed to
    ``path`` when the block completes, and removed when it fails."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        follow_umask(tmp)
        if tmp.is_dir() and path.exists():
            # rename() replaces only an empty folder: move the old one aside, then drop it
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)
