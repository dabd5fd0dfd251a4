"""``sdplug.hosts.everydream.Plugin``: the class EveryDream2 builds from train.json ``"plugins"``.

It subclasses EveryDream2's ``plugins.plugins.BasePlugin`` (EveryDream2's loader refuses
anything else), so it is defined only where that module imports: inside an EveryDream2 run.
Its constructor does the setup (``runtime.start``: EveryDream2 validates once before any hook
is called); the hooks hand EveryDream2's calls to the host. ``transform_caption`` is left as
EveryDream2's identity: it runs in data-loader worker processes, where a decision could never
be counted, so the caption decisions are made in ``on_step_start`` instead.
"""

from __future__ import annotations

import sys
from typing import Any

from sdplug.hosts.everydream import runtime

try:  # EveryDream2's plugin base class, from its tree on sys.path
    from plugins.plugins import BasePlugin  # type: ignore[import-not-found]
except ImportError:  # outside EveryDream2: building a Plugin is refused by runtime.start
    BasePlugin = object


class Plugin(BasePlugin):
    """Applies an sdplug preset inside EveryDream2 (preset: train.json ``sdplug_preset`` or ``SDPLUG_PRESET``)."""

    def __init__(self) -> None:
        self.host = runtime.start(sys._getframe(1))

    @property
    def sdplug_loss(self) -> Any:
        """The loss a patched train.py returns (``sdplug patch everydream``), when the preset sets ``[loss]``."""
        return self.host.steps.loss if self.host.loss_through_patch else None

    def on_training_start(self, **kwargs: Any) -> None:
        folder = kwargs.get("log_folder")
        if folder:
            self.host.log_folder = str(folder)

    def on_step_start(self, **kwargs: Any) -> None:
        self.host.steps.step_start(kwargs["batch"], int(kwargs.get("epoch", 0) or 0))

    def on_training_end(self, **kwargs: Any) -> None:
        self.host.write_audit()  # again at exit, with what stopped the run if anything did
