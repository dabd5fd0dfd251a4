"""Two questions every host's flag checks ask: does the preset set this section, and did the user
set this flag?

A host flag conflicts with a preset only when both are set, so kohya's and EveryDream2's
reconcilers ask the same two things; they are answered here once. A section is a preset family
(``noise``, ``timesteps``, ...) or one ``memory.<key>``.
"""

from __future__ import annotations


def section_set(preset, section: str) -> bool:
    """Whether the preset sets ``section`` (a family, or one ``memory.<key>``)."""
    if section.startswith("memory."):
        value = getattr(preset.memory, section.split(".", 1)[1])
        return value not in (False, "no")
    value = getattr(preset, section)
    return bool(value) if isinstance(value, tuple) else value is not None


def preset_value(preset, section: str):
    """What the preset sets a ``memory.<key>`` to (a flag equal to it is no conflict); else None."""
    return getattr(preset.memory, section.split(".", 1)[1]) if section.startswith("memory.") else None


def is_set(value, default) -> bool:
    """A flag the user set: its value is not the parser's default (an empty value is unset)."""
    if value == default:
        return False
    empty: tuple[object, ...] = (None, False, 0, 0.0, "", (), [])
    return not (value in empty and default in empty)
