"""The output folder a training run owns: checked before anything loads, held by one run at a
time, cleaned of a killed run's leftovers, and never robbed of another run's record.

- ``check_output`` runs with the option checks, before torch and diffusers load: ``--output``
  that is a file, or a folder (or the parent it would be made in) sdplug cannot write to, is
  refused before anything is created.
- ``RunFolder.open`` creates the folder (remembering whether it did), takes its lock
  (``.sdplug-run.lock``: pid, host, start time; a lock whose process is gone is stale and taken
  over, with a message) and removes what a killed write left (``*.tmp-<pid>``, ``*.old-<pid>``,
  ``audit.json.partial``, ``checkpoint-N.partial/``): with the lock held, no other run is
  writing them.
- A run that fails writes its audit where it does not destroy another run's record
  (``failure_audit_name``), and clean-up after a failure never removes a folder this run did
  not create.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from sdplug.errors import SdplugError
from sdplug.log import logger
from sdplug.trainer.files import remove_path

LOCK = ".sdplug-run.lock"
LEFTOVER_MARKS = (".tmp-", ".old-")
# what a failed run's rerun writes again: removed when nothing else of the run is kept
REGENERABLE = ("embedded-data", "samples-before.png")


class OutputFolderError(SdplugError):
    """--output cannot hold this run: a file, not writable, or in use by another run."""


def check_output(output: Path) -> None:
    """Refuse an ``--output`` this run could not write, before anything is created or loaded."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output {output}: is a file, not a folder. Give a folder (it is created if missing).")
    existing = output
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputFolderError(f"--output {output}: {existing} is a file, so the folder cannot be made there.")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        where = "the folder" if existing == output else f"its parent {existing}"
        raise OutputFolderError(f"--output {output}: {where} is not writable. Give a folder you can write to.")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


FRESH_LOCK_SECONDS = 10.0


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class RunFolder:
    """``--output`` for one run. Rank 0 creates, locks and cleans it; the other ranks only use it."""

    def __init__(self, output: Path, *, rank: int | None = None):
        self.path = Path(output)
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.created = False
        self.was_empty = True
        self.previous_audit: dict[str, Any] | None = None  # another run's audit.json, when the folder held one
        self.locked = False

    # -- opening -----------------------------------------------------------------------------------
    def open(self) -> RunFolder:
        check_output(self.path)
        self.created = not self.path.exists()
        self.was_empty = self.created or not any(p.name != LOCK for p in self.path.iterdir())
        self.previous_audit = self._read_previous_audit()
        if self.rank != 0:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        except PermissionError as exc:
            raise OutputFolderError(
                f"--output {self.path}: cannot write there ({exc.strerror}). Give a folder you can write to."
            ) from None
        self._remove_leftovers()
        return self

    def _read_previous_audit(self) -> dict[str, Any] | None:
        path = self.path / "audit.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"unreadable": True}
        return data if isinstance(data, dict) else {"unreadable": True}

    def _lock(self) -> None:
        path = self.path / LOCK
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _utc_stamp()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder(path)
                if holder is not None:
                    raise OutputFolderError(
                        f"--output {self.path} is in use by another sdplug run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}); two runs in one folder would mix "
                        f"their weights and checkpoints. Wait for it, or give another --output."
                    ) from None
                continue  # stale: removed, try again
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            self.locked = True
            return
        raise OutputFolderError(f"--output {self.path}: cannot take its lock {path} (it keeps reappearing).")

    def _holder(self, path: Path) -> dict[str, Any] | None:
        """The live run holding the lock, or None after removing a stale lock."""
        try:
            holder = json.loads(path.read_text())
            pid = int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid = None, None
            if _age_seconds(path) < FRESH_LOCK_SECONDS:  # being written by a run starting this moment
                return {"pid": "(being written)", "host": socket.gethostname(), "started": "just now"}
        if holder is not None and pid is not None and (holder.get("host") != socket.gethostname() or _process_alive(pid)):
            return holder  # another machine's lock (a shared disk) is never judged stale from here
        logger.warning(f"{path}: a lock left by a run that is gone (pid {pid}); taking it over.")
        path.unlink(missing_ok=True)
        return None

    def _remove_leftovers(self) -> None:
        removed = []
        for entry in self.path.iterdir():
            name = entry.name
            killed_write = any(mark in name for mark in LEFTOVER_MARKS) or name == "audit.json.partial"
            killed_checkpoint = name.startswith("checkpoint-") and name.endswith(".partial")
            if killed_write or killed_checkpoint:
                remove_path(entry)
                removed.append(name)
        if removed:
            logger.info(f"removed what a killed run left unfinished in {self.path}: {', '.join(sorted(removed))}")

    def close(self) -> None:
        if not self.locked:
            return
        path = self.path / LOCK
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        self.locked = False

    # -- after a failure -----------------------------------------------------------------------------
    def failure_audit_name(self, trained_steps: int, *, refused: bool) -> str:
        """Where a failed or refused run's audit goes: ``audit.json``, unless that would replace
        another run's record -- any audit, for a run that trained no step; a finished run's, for
        a run that trained and then failed."""
        previous = self.previous_audit
        if previous is None:
            return "audit.json"
        if trained_steps == 0:
            return f"audit-{'refused' if refused else 'stopped'}-{_utc_stamp()}.json"
        if previous.get("completed") is True:
            return f"audit-failed-{_utc_stamp()}.json"
        return "audit.json"

    def clean_after_failure(self) -> None:
        """Remove what a rerun writes again (the embedded data, the 'before' grid) and unfinished
        temporaries -- the first two only when nothing else of the run is kept, since a resume
        needs them --, then the folder, if this run created it and it is empty; say what is kept."""
        if self.rank != 0 or not self.path.is_dir():
            return
        self.close()
        for entry in list(self.path.iterdir()):
            if any(mark in entry.name for mark in LEFTOVER_MARKS):
                remove_path(entry)
        names = sorted(p.name for p in self.path.iterdir())
        trained = [n for n in names if n not in REGENERABLE and not (n.startswith("audit") and n.endswith(".json"))]
        if self.was_empty and not trained:
            for name in names:
                if name in REGENERABLE:
                    remove_path(self.path / name)
        elif self.was_empty:
            logger.info(f"the failed run kept in {self.path}: {', '.join(names)}")
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()
