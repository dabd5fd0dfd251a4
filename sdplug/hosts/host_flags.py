"""A host's own trick flags next to a preset: one flag type for every host's table, and the
two questions every host's checks ask -- does the preset set this section, did the user set
this flag?

A host flag conflicts with a preset only when both are set. A section is a preset family
(``noise``, ``timesteps``, ...) or one ``memory.<key>``. Each host keeps one table of
``HostFlag`` rows (``hosts/kohya/flags.py``, ``hosts/everydream/flags.py``,
``hosts/diffusers_scripts/flags.py``); its checks read only that table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# what a flag is next to a preset:
# - conflict: it sets a trick a preset section replaces; both set, the run is refused before
#   the model loads, naming the flag and the section;
# - reconciled: the preset's value wins; the host's value is changed before training, and the
#   rule printed and audited (``host.rules``);
# - independent: the host keeps doing it next to the preset; ``why`` says why that is sound.
KINDS = ("conflict", "reconciled", "independent")


@dataclasses.dataclass(frozen=True)
class HostFlag:
    """One argument (or config key) of a host that sets a trick, classified once."""

    name: str  # as the host spells it, without "--" (also its attribute on the host's Namespace)
    sections: tuple[str, ...]  # the preset sections that take it over (none: independent)
    why: str  # what it does, named in every message about it
    kind: str = "conflict"  # one of KINDS
    family: str = ""  # the table group it is listed under (a strategy family, or "memory")
    versions: tuple[str, ...] = ()  # the host versions that have it (empty: every known one)
    agrees: tuple[tuple[str, object], ...] = ()  # (section, value): written at that value, no conflict
    default: Any = None  # the host's own default, where the table rather than a parser knows it
    off: Any = None  # the value that switches the trick off ("keep": nothing to switch)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"HostFlag {self.name!r}: kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.kind == "independent" and self.sections:
            raise ValueError(f"HostFlag {self.name!r}: an independent flag is taken over by no section")

    def taken_by(self, preset: Any) -> list[str]:
        """The sections of ``preset`` that take this flag over (none: the host's flag stands)."""
        return [section for section in self.sections if section_set(preset, section)]


def section_set(preset: Any, section: str) -> bool:
    """Whether the preset sets ``section`` (a family, or one ``memory.<key>``)."""
    if section.startswith("memory."):
        value = getattr(preset.memory, section.split(".", 1)[1])
        return value not in (False, "no")
    value = getattr(preset, section)
    return bool(value) if isinstance(value, tuple) else value is not None


def preset_value(preset: Any, section: str) -> Any:
    """What the preset sets a ``memory.<key>`` to (a flag equal to it is no conflict); else None."""
    return getattr(preset.memory, section.split(".", 1)[1]) if section.startswith("memory.") else None


def is_set(value: Any, default: Any) -> bool:
    """A flag the user set: its value is not the parser's default (an empty value is unset)."""
    if value == default:
        return False
    empty: tuple[object, ...] = (None, False, 0, 0.0, "", (), [])
    return not (value in empty and default in empty)
