"""What installing a host adapter changed in this process, and how to take it all back.

Every change an adapter (kohya sd-scripts, EveryDream2) makes outside its own objects goes
through one ``Session``: the functions it replaces in the host's modules and classes, the names
it rebinds in a running script's namespace, ``sys.excepthook``, the ``atexit`` handler that
writes the audit, and the folder it puts on ``sys.path``. ``undo()`` (or leaving
``with session:``) restores each, last change first, so an adapter installed in a process that
goes on (a test, a notebook, a second run) leaves the host as it found it. Launchers and patched
scripts never undo: their process ends with the script, and the ``atexit`` handler must still
write the audit then.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

_ABSENT = object()


class Session:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.undone = False

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the session is undone (after everything installed later)."""
        self._undo.append(action)

    def replace(self, owner: Any, name: str, replacement: Any) -> Any:
        """Set ``owner.name`` (a module or class attribute); returns what it was."""
        original = getattr(owner, name)
        # the raw entry, not what getattr gives: a staticmethod or classmethod must come back as
        # one; and an inherited attribute has no entry of its own, so undo deletes ours again
        own = vars(owner).get(name, _ABSENT)
        setattr(owner, name, replacement)

        def restore() -> None:
            if own is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, own)

        self.on_undo(restore)
        return original

    def rebind(self, namespace: MutableMapping[str, Any], name: str, replacement: Any) -> None:
        """Point a name a script imported (``from m import f``) at ``replacement``."""
        previous = namespace.get(name, _ABSENT)
        namespace[name] = replacement

        def restore() -> None:
            if previous is _ABSENT:
                namespace.pop(name, None)
            else:
                namespace[name] = previous

        self.on_undo(restore)

    def set_excepthook(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """Install ``hook`` as ``sys.excepthook``; returns the one it replaces."""
        previous = sys.excepthook
        sys.excepthook = hook

        def restore() -> None:
            sys.excepthook = previous

        self.on_undo(restore)
        return previous

    def at_exit(self, handler: Callable[[], Any]) -> None:
        atexit.register(handler)
        self.on_undo(lambda: atexit.unregister(handler))

    def add_path(self, folder: str) -> None:
        """Put ``folder`` first on ``sys.path`` if it is not there yet."""
        if folder in sys.path:
            return
        sys.path.insert(0, folder)

        def restore() -> None:
            if folder in sys.path:
                sys.path.remove(folder)

        self.on_undo(restore)

    def undo(self) -> None:
        """Restore everything, last change first; a second call does nothing. One restore that
        fails does not keep the others from running; the first failure is raised after them."""
        failures: list[BaseException] = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # noqa: PERF203 - each restore on its own
                failures.append(exc)
        self.undone = True
        if failures:
            raise failures[0]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()
