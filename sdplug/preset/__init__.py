"""Presets: the TOML file a user writes (``loading``), what it resolves to (``model``), the
checks across its sections (``checks``) and its plain settings tables (``settings``)."""

from sdplug.preset.files import shipped_preset_names, shipped_presets_dir
from sdplug.preset.loading import load_preset, parse_preset, parse_preset_text
from sdplug.preset.model import SECTIONS, Preset, StrategySpec

__all__ = [
    "SECTIONS",
    "Preset",
    "StrategySpec",
    "load_preset",
    "parse_preset",
    "parse_preset_text",
    "shipped_preset_names",
    "shipped_presets_dir",
]
