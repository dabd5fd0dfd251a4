"""The one problems policy of every host: what an audit lists as not proven applied.

A problem is anything the preset names that the run cannot prove it applied: a strategy that
ran in fewer steps than the run has, an optimizer or attention the host never asked the plan
for, no training step at all, or an exception that stopped the host. The policy, the same in
every host: the run keeps (saves) what it trained, ``audit.json`` lists the problems with
``completed`` saying whether the host ran to its end, and the host exits non-zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sdplug.errors import SdplugError
from sdplug.plan.divergence import DivergedRun
from sdplug.preset import Preset

REFUSED = "refused before training: "  # how a refusal's problem starts


def problems(preset: Preset, report: dict[str, Any], failure: str | None, divergence_cause: str) -> list[str]:
    """The problems of a run whose audit holds ``report`` (every section but ``problems``):
    ``failure`` is what stopped the host (None: it ran to its end), ``divergence_cause`` the
    likely cause should the run have gone non-finite (``likely_divergence_cause``)."""
    steps = report["steps"]
    found = []
    if failure is not None:
        found.append(failure)
        if steps == 0:
            return found  # a refusal: what never ran follows from it
    elif steps == 0:
        found.append("no training step ran (plan.step() was never called): nothing the preset names is proven applied")
    if "divergence" in report:
        found.append(divergence_problem(report["divergence"], divergence_cause))
    found += strategy_problems(report)
    if preset.optimizer is not None and "optimizer" not in report:
        found.append(f"optimizer {preset.optimizer.type!r} was never built (the host did not call plan.optimizer)")
    if preset.ema.decay is not None and "ema" not in report:
        found.append("ema was never kept (the host did not call plan.ema)")
    elif "ema" in report and report["ema"]["optimizer_steps"] < steps:
        found.append(f"ema followed {report['ema']['optimizer_steps']} optimizer steps in {steps} steps")
    if preset.attention is not None and "attention" not in report:
        found.append(f"attention {preset.attention.type!r} was never installed (the host did not call plan.attention)")
    return found


def failure(exc: BaseException, steps: int) -> str:
    """The problem an exception that stopped the host at ``steps`` puts first: refused before
    training (an sdplug error before the first step), interrupted, diverged or stopped."""
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted at step {steps} (Ctrl-C: KeyboardInterrupt)"
    if isinstance(exc, DivergedRun):
        return f"stopped at step {steps}: the run went non-finite (the next problem says where)"
    if isinstance(exc, SdplugError) and steps == 0:
        return f"{REFUSED}{exc}"
    return f"stopped at step {steps} by {type(exc).__name__}: {exc}"


def divergence_problem(record: dict[str, Any], cause: str) -> str:
    """One sentence: the step, where it showed, the losses before it, and the likely cause."""
    first, last = record["first_finite_loss"], record["last_finite_loss"]
    history = f"; the loss went from {first:.4g} to {last:.4g} before it" if first is not None and last is not None else ""
    return (
        f"the run went non-finite at step {record['first_step']} (a NaN or infinity in {record['seen_in']}{history}): "
        f"its weights from then on are not a result. {cause}"
    )


def likely_divergence_cause(
    *, optimizer: str, learning_rates: list[float], adapts_step_size: bool, weighting: str | None, weights: torch.Tensor | None
) -> str:
    """What most likely made a run diverge: a large lr (above 1e-2; 10 for an optimizer that
    adapts its step size, whose lr is a multiplier) or loss weights above 20."""
    causes = []
    if learning_rates and max(learning_rates) > (10.0 if adapts_step_size else 1e-2):
        causes.append(f"optimizer {optimizer} at lr {max(learning_rates):g}")
    if weighting is not None and weights is not None:
        weights = weights.detach().float()
        finite = torch.isfinite(weights)
        peak = float(weights[finite].max()) if finite.any() else math.inf
        if peak > 20.0:
            causes.append(f"loss weighting {weighting!r} with weights up to {peak:.3g}")
    if not causes:
        return "Likely cause: the step size for this model and data (lower the lr), or mixed precision overflowing."
    return f"Likely cause: {' and '.join(causes)}; lower the lr or the weighting's range."


def strategy_problems(report: dict[str, Any]) -> list[str]:
    """Strategies the preset names that ran in fewer steps than the run has (an empty list when all applied)."""
    steps = report["steps"]
    found = []
    for entry in report.get("noise", {}).get("applied", []):
        if entry["calls"] < steps:
            found.append(f"noise {entry['type']!r} ran {entry['calls']} times in {steps} steps")
    if "loss" in report and report["loss"]["calls"] < steps:
        found.append(f"loss type {report['loss']['type']!r} ran {report['loss']['calls']} times in {steps} steps")
    if "loss_weighting" in report and report["loss_weighting"]["calls"] < steps:
        found.append(f"loss weighting ran {report['loss_weighting']['calls']} times in {steps} steps")
    for entry in report.get("caption", {}).get("applied", []):
        if steps and entry["calls"] == 0:
            found.append(f"caption {entry['type']!r} never ran")
    return found
