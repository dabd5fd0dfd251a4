"""sdplug inside EveryDream2: ``"plugins": ["sdplug.hosts.everydream.Plugin"]`` in train.json.

``Plugin`` subclasses EveryDream2's own ``plugins.plugins.BasePlugin`` (its loader checks), so it
is built only on first use, inside an EveryDream2 process; importing this package needs nothing
of EveryDream2.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Plugin"]


def __getattr__(name: str) -> Any:
    if name == "Plugin":
        from sdplug.hosts.everydream.plugin import Plugin

        return Plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
