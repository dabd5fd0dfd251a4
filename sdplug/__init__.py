"""sdplug: one correct, tested implementation of each diffusion-training trick, for every trainer.

Public API::

    sdplug.available("noise")                      # ['gaussian', 'immiscible', ...]
    noise = sdplug.create("noise", "pyramid", discount=0.8)
    preset = sdplug.load_preset("presets/pyramid-noise.toml")
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from sdplug.errors import MissingDependencyError, PluginError, PresetError, SdplugError, UnknownStrategyError
from sdplug.plan import NoiseDraw, Plan
from sdplug.preset import Preset, load_preset
from sdplug.strategies import FAMILIES, registry

try:  # the installed distribution's version: one number, in pyproject.toml
    __version__ = importlib.metadata.version("sdplug")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "FAMILIES",
    "MissingDependencyError",
    "NoiseDraw",
    "Plan",
    "PluginError",
    "Preset",
    "PresetError",
    "SdplugError",
    "UnknownStrategyError",
    "__version__",
    "available",
    "create",
    "load_preset",
]


def available(family: str) -> list[str]:
    """The names of every strategy of ``family``, built-in and plugin, sorted."""
    return registry(family).names()


def create(family: str, name: str, **params: Any) -> Any:
    """A strategy of ``family`` named ``name``, its ``params`` validated.

    Raises ``UnknownStrategyError`` for an unknown family or name and ``PresetError`` for a
    parameter that is unknown, of the wrong type or out of range.
    """
    return registry(family).create(name, **params)
