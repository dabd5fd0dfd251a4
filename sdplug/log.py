"""sdplug's one logger, ``logging.getLogger("sdplug")``, and how its front ends show it.

Library code logs; it never prints. The front ends -- the ``sdplug`` command and the kohya
host sessions (a patched script has no sdplug command around it) -- call ``show_messages``,
which sends the logger's INFO and above to stderr as ``sdplug: <message>`` lines. A program
that embeds sdplug configures logging its own way and gets the same records.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("sdplug")


class _ToStderr(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (tests and GUIs redirect it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not end a training run
            self.handleError(record)


def show_messages() -> None:
    """Show sdplug's messages on stderr (once per process, however often it is called)."""
    if any(isinstance(h, _ToStderr) for h in logger.handlers):
        return
    handler = _ToStderr()
    handler.setFormatter(logging.Formatter("sdplug: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, not again through the root logger
