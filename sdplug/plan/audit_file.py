"""The one writer of ``audit.json``: a plan's audit, and a refusal's before any plan.

Every host writes through it, whatever ended the run, so every audit has the same top-level
keys (``AUDIT_KEYS``) and is whole or absent (written beside, then renamed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdplug.log import logger
from sdplug.plan.audit import preset_strategies
from sdplug.plan.problems import REFUSED
from sdplug.preset import Preset

# what every audit.json holds at its top level, whichever host wrote it and however the run ended
AUDIT_KEYS = ("steps", "completed", "strategies", "host", "problems")


def write_refusal(
    output_dir: str | Path,
    problem: str,
    *,
    host: dict[str, Any],
    preset: Preset | None = None,
    rank: int = 0,
    name: str | None = None,
    announce: bool = True,
) -> Path:
    """The audit of a run stopped before a plan was bound (a refusal: ``problem`` starts with
    ``REFUSED``), with the keys of every audit: ``steps`` 0, ``completed`` false, the
    ``strategies`` the preset names (none when the preset itself was refused), ``host``, and
    ``problem`` as the one problem. Written as a plan's audit is (``write``)."""
    strategies = preset_strategies(preset) if preset is not None else {}
    data = {"steps": 0, "completed": False, "strategies": strategies, "host": host, "problems": [problem]}
    return write(data, output_dir, rank, name=name, announce=announce)


def write(data: dict[str, Any], output_dir: str | Path, rank: int, *, name: str | None = None, announce: bool = True) -> Path:
    """An audit (a plan's, or a host's refusal before any plan: ``steps`` 0, the refusal first in
    ``problems``) as JSON: ``audit.json`` on rank 0, ``audit-rank<N>.json`` on the others, or
    ``name`` (a failed run's audit beside another run's record). Problems are logged unless
    ``announce`` is false (the host says why it stopped itself)."""
    output_dir = Path(output_dir)
    path = output_dir / (name or ("audit.json" if rank == 0 else f"audit-rank{rank}.json"))
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a reader never sees half a file
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(partial, path)
    if not announce:
        pass
    elif data["steps"] == 0 and data["problems"][:1] and str(data["problems"][0]).startswith(REFUSED):
        logger.info(f"the refusal is in {path}")  # its message follows as the error
    elif data["problems"]:
        logger.warning(f"AUDIT PROBLEMS in {path}: {'; '.join(data['problems'])}")
    return path
