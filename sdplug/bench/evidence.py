"""``sdplug bench noise-range | min-snr | cfg | cost | flow-samplers | flow-weightings | flow-noise-range``: one entry point for the evidence benches.

Each trains (or times) tiny models on a CPU and writes ``report.md``, PNG plots and
``figures.json`` into ``--output`` (default ``bench-NAME``); see ``sdplug.bench.common``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from sdplug.bench import common

MODULES = {
    "noise-range": "noise_range",
    "min-snr": "min_snr",
    "cfg": "cfg",
    "cost": "cost",
    "flow-samplers": "flow_samplers",
    "flow-weightings": "flow_weightings",
    "flow-noise-range": "flow_noise_range",
}


def main(name: str, *, quick: bool = False, seeds: int = 3, output: Path | None = None, threads: int = 1) -> int:
    module = importlib.import_module(f"sdplug.bench.{MODULES[name]}")
    options = common.Options(name, quick=quick, seeds=seeds, output=output or Path(f"bench-{name}"), threads=threads)
    return common.main(module.run, options)
