"""One edit of a diffusers training script: lines inserted at an anchor line, each ending in
``MARK`` so that ``unpatch`` finds and removes them."""

from __future__ import annotations

import dataclasses

MARK = "  # sdplug"


@dataclasses.dataclass(frozen=True)
class Edit:
    anchor: str  # the start of exactly one line of the script (indentation included)
    text: str  # the lines inserted (no trailing newline; MARK is appended to each)
    before: bool = False  # insert before the anchor line instead of after it
    until: str | None = None  # insert after the first line equal to this, at or below the anchor
