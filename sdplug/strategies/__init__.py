"""The strategy registries, one per family of ``sdplug.strategies.families``, and their built-ins.

Third-party packages add strategies through the entry-point group ``sdplug.<family>``.
"""

from __future__ import annotations

from typing import Any, cast

from sdplug.errors import UnknownStrategyError
from sdplug.registry import Registry
from sdplug.strategies.base import CaptionTransform, OptimizerStrategy
from sdplug.strategies.families import FAMILIES as FAMILIES  # re-exported: sdplug.FAMILIES
from sdplug.strategies.families import FAMILY_TABLE

# the built-in strategies of each family, by registered name
BUILTINS: dict[str, dict[str, type]] = {family.name: dict(family.builtins) for family in FAMILY_TABLE}


def build_registries(**registry_options: Any) -> dict[str, Registry]:
    """Fresh registries holding the built-ins (tests inject fake entry points through options)."""
    registries = {}
    for family in FAMILY_TABLE:
        registry = Registry(family.name, family.base, **registry_options)
        for name, cls in family.builtins.items():
            registry.register(name, cls)
        registries[family.name] = registry
    return registries


REGISTRIES = build_registries()


def registry(family: str) -> Registry:
    """The registry of ``family``; an unknown family lists the known ones."""
    try:
        return REGISTRIES[family]
    except KeyError:
        raise UnknownStrategyError("families", family, FAMILIES) from None


def optimizer_adapts_step_size(name: str) -> bool:
    """Whether the optimizer registered as ``name`` declares that it estimates its own step size
    (``OptimizerStrategy.adapts_step_size``: its lr near 1.0 only scales that estimate). An
    unknown name is False: the preset reports it, with what is allowed."""
    if name not in registry("optimizer").names():
        return False
    return cast("type[OptimizerStrategy]", registry("optimizer").get(name).cls).adapts_step_size


def cached_text_caption_types() -> list[str]:
    """The caption transforms that work on cached text-encoder outputs: those declaring
    ``needs_text = False``, which only decide whether a caption is dropped (the empty caption's
    embedding is substituted). Every plugin is loaded to be asked."""
    return [entry.name for entry in registry("caption").entries() if not cast("type[CaptionTransform]", entry.cls).needs_text]
