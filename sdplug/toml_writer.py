"""A small TOML writer for resolved presets (tomllib only reads).

Handles what presets hold: strings, booleans, numbers, lists of scalars, tables of those and
arrays of such tables, one level deep.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _body(table: dict[str, Any]) -> list[str]:
    return [f"{key} = {_scalar(value)}" for key, value in table.items() if value is not None]


def dumps(data: dict[str, Any]) -> str:
    """TOML text for ``data``: top-level tables and arrays of tables."""
    blocks = []
    for section, value in data.items():
        if isinstance(value, list):
            for entry in value:
                blocks.append("\n".join([f"[[{section}]]", *_body(entry)]))
            if not value:
                blocks.append(f"{section} = []")
        else:
            blocks.append("\n".join([f"[{section}]", *_body(value)]))
    return "\n\n".join(blocks) + "\n"
