"""What every evidence bench shares: options, seeds, mean ± spread, a progress bar on stderr,
and the writing of ``report.md`` and ``figures.json``.

A bench is a function ``run(options) -> Report``; ``main`` times it, writes its files into
``options.output`` and prints where they are. Every figure is reported as the mean ± sample
standard deviation over ``options.seeds`` runs with fixed seeds ``0 .. seeds-1``, and every
per-seed value goes into ``figures.json`` beside its summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdplug.bench.metrics import mean_spread
from sdplug.errors import SdplugError


@dataclasses.dataclass(frozen=True)
class Options:
    name: str
    quick: bool = False
    seeds: int = 3
    output: Path = Path("bench-output")
    threads: int = 1
    progress: bool = True

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))


def check_options(options: Options) -> None:
    if options.seeds < 1:
        raise SdplugError(f"sdplug bench {options.name}: --seeds is {options.seeds}; allowed: 1 or more (default 3).")
    if options.threads < 1:
        raise SdplugError(f"sdplug bench {options.name}: --threads is {options.threads}; allowed: 1 or more.")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "spread", "per_seed"}``: spread is the sample standard deviation over seeds."""
    mean, spread = mean_spread(values)
    return {"mean": mean, "spread": spread, "per_seed": [float(v) for v in values]}


def pm(entry: dict[str, Any], digits: int = 3, percent: bool = False) -> str:
    """``mean ± spread`` of a ``summary`` for a table cell."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    return f"{entry['mean'] * scale:.{digits}f} ± {entry['spread'] * scale:.{digits}f}{unit}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr (elapsed and estimated time left); on a non-terminal
    stderr a line at each tenth, so logs stay short."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.done, self.start, self._last_tenth = 0, time.monotonic(), -1
        self.tty = sys.stderr.isatty()

    def tick(self, amount: int = 1) -> None:
        self.done = min(self.total, self.done + amount)
        if not self.enabled:
            return
        fraction = self.done / self.total
        elapsed = time.monotonic() - self.start
        # no estimate before 2% is done: the first ticks (imports, set-up) say nothing about the rest
        left = f"~{elapsed / fraction - elapsed:4.0f}s left" if fraction >= 0.02 else "estimating"
        bar = "#" * int(30 * fraction)
        line = f"{self.label} [{bar:<30}] {100 * fraction:5.1f}%  {elapsed:5.0f}s elapsed, {left}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
            sys.stderr.flush()
        elif int(10 * fraction) != self._last_tenth:
            self._last_tenth = int(10 * fraction)
            sys.stderr.write(line + "\n")


@dataclasses.dataclass
class Report:
    """What a bench found: the headline table first, then sections; ``figures`` is the JSON."""

    title: str
    claim: str
    headline: str  # a markdown table
    verdict: list[str]  # a few sentences under the table: does the claim hold here, and why
    sections: list[tuple[str, str]]  # (heading, markdown body)
    figures: dict[str, Any]
    plots: list[str]  # file names inside the output folder
    setup: list[str]  # how it was measured
    # the bench's own consistency checks (a hand-written twin that no longer matches): shown
    # whatever the run's length, before the verdict
    checks: list[str] = dataclasses.field(default_factory=list)


NO_VERDICT = (
    "**No verdict: a smoke run (`--quick`) is far too short to judge the claim; it checks that the bench runs. "
    "Run it without `--quick` for a verdict.**"
)


def judgement(report: Report, options: Options) -> list[str]:
    """What the report says of the claim: the checks, then the verdict, or, for a quick run,
    that it gives none (its figures are too few to judge by)."""
    return [*report.checks, *([NO_VERDICT] if options.quick else report.verdict)]


def all_finite(value: Any) -> bool:
    """Every number in a JSON-ready structure is finite (bools and strings are not numbers)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return False


def write(report: Report, options: Options, seconds: float) -> tuple[Path, Path]:
    """``report.md`` and ``figures.json`` in ``options.output`` (the plots are already there)."""
    out = options.output
    mode = "quick" if options.quick else "full"
    lines = [
        f"# {report.title}",
        "",
        f"**Claim tested:** {report.claim}",
        "",
        report.headline,
        "",
        *judgement(report, options),
        "",
        f"Seeds {options.seed_list} ({options.seeds}); every figure is mean ± standard deviation over seeds. "
        f"Mode: {mode}; {seconds:.0f} s on {options.threads} CPU thread(s).",
        "",
    ]
    for heading, body in report.sections:
        lines += [f"## {heading}", "", body, ""]
    lines += ["## Plots", "", *(f"- `{name}`" for name in report.plots), ""]
    lines += ["## How it was measured", "", *(f"- {item}" for item in report.setup), ""]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines))
    data = {
        "bench": options.name,
        "mode": mode,
        "seeds": options.seed_list,
        "seconds": seconds,
        "threads": options.threads,
        "claim": report.claim,
        "plots": report.plots,
        "figures": report.figures,
    }
    if not all_finite(data):
        raise SdplugError(f"sdplug bench {options.name}: a figure is not finite; {report_path} was written, figures.json not.")
    json_path = out / "figures.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    return report_path, json_path


def main(run, options: Options) -> int:
    """Run one bench and write its files; the CLI's entry point for every evidence bench."""
    check_options(options)
    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    torch.set_num_threads(options.threads)
    options.output.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = run(options)
    seconds = time.monotonic() - start
    report_path, json_path = write(report, options, seconds)
    print(f"# {report.title}\n")
    print(report.headline)
    print("\n" + "\n".join(judgement(report, options)))
    print(f"\nwrote {report_path}, {json_path} and {', '.join(report.plots)} in {options.output} ({seconds:.0f} s)")
    return 0
