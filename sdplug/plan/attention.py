"""The preset's attention, checked for this machine and installed in the host's model.

``Plan.attention`` documents the contract for hosts; the record it writes shows the
processors before and after, so a change is shown, not claimed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdplug.errors import MissingDependencyError, PresetError, SdplugError
from sdplug.plan.runs_here import cannot_run
from sdplug.preset import Preset


class AttentionChoice:
    """The attention strategy a plan installs (None: the model's own)."""

    def __init__(self, preset: Preset):
        self.preset = preset
        self.spec = preset.attention
        self.strategy = None
        if self.spec is not None:
            self.strategy = self.spec.create()
            try:
                self.strategy.check_available()
            except MissingDependencyError as exc:
                raise cannot_run(preset, exc, "attention.type") from exc

    def install(self, model: torch.nn.Module, install: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
        """The attention record: the host's own switch (``install``), or diffusers' processors
        before and after the preset's strategy."""
        spec = self.spec
        if install is not None:
            if spec is None:
                raise SdplugError("plan.attention(install=...): the preset names no attention to install.")
            return {"strategy": spec.type, **install(spec.type)}
        before = processor_classes(model)
        changed = 0
        if self.strategy is not None:
            try:
                changed = self.strategy.apply(model)
            except PresetError as exc:
                if exc.path is not None:
                    raise
                # a parameter that only the model can judge (sliced slice_size against its heads):
                # the strategy knows the key, the plan knows the file
                raise PresetError(exc.problem, path=(spec.path if spec else None) or self.preset.path, key=exc.key) from None
        return {
            "strategy": spec.type if spec else "(host default)",
            "processor_before": before,
            "processor": processor_classes(model),
            "modules": len(getattr(model, "attn_processors", {})),
            "changed": changed,
        }


def processor_classes(model: torch.nn.Module) -> str:
    return ",".join(sorted({type(p).__name__ for p in getattr(model, "attn_processors", {}).values()}))
