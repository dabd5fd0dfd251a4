"""The plan's report -- what ``audit.json`` holds -- and the one problems policy of every host.

A problem is anything the preset names that the run cannot prove it applied: a strategy that
ran in fewer steps than the run has, an optimizer or attention the host never asked the plan
for, no training step at all, or an exception that stopped the host. The policy, the same in
every host: the run keeps (saves) what it trained, ``audit.json`` lists the problems with
``completed`` saying whether the host ran to its end, and the host exits non-zero.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdplug import optimizer_groups
from sdplug.audit import preset_strategies
from sdplug.log import logger

if TYPE_CHECKING:
    from sdplug.plan import Plan
    from sdplug.presets import Preset


def problems(plan: Plan, report: dict[str, Any]) -> list[str]:
    steps = report["steps"]
    found = []
    if plan.failure is not None:
        found.append(plan.failure)
        if steps == 0:
            return found  # a refusal: what never ran follows from it
    elif steps == 0:
        found.append("no training step ran (plan.step() was never called): nothing the preset names is proven applied")
    if "divergence" in report:
        found.append(divergence_problem(plan, report["divergence"]))
    found += strategy_problems(report)
    if plan.preset.optimizer is not None and plan.built_optimizer is None:
        found.append(f"optimizer {plan.preset.optimizer.type!r} was never built (the host did not call plan.optimizer)")
    if plan.preset.ema.decay is not None and plan.ema_tracker is None:
        found.append("ema was never kept (the host did not call plan.ema)")
    elif plan.ema_tracker is not None and plan.ema_tracker.optimizer_steps < steps:
        found.append(f"ema followed {plan.ema_tracker.optimizer_steps} optimizer steps in {steps} steps")
    if plan.preset.attention is not None and "attention" not in report:
        found.append(f"attention {plan.preset.attention.type!r} was never installed (the host did not call plan.attention)")
    return found


def divergence_problem(plan: Plan, record: dict[str, Any]) -> str:
    """One sentence: the step, where it showed, the losses before it, and the likely cause."""
    first, last = record["first_finite_loss"], record["last_finite_loss"]
    history = f"; the loss went from {first:.4g} to {last:.4g} before it" if first is not None and last is not None else ""
    return (
        f"the run went non-finite at step {record['first_step']} (a NaN or infinity in {record['seen_in']}{history}): "
        f"its weights from then on are not a result. {likely_divergence_cause(plan)}"
    )


def likely_divergence_cause(plan: Plan) -> str:
    """What in the preset most likely made a run diverge: a large lr, large loss weights."""
    causes = []
    optimizer = plan.built_optimizer
    if optimizer is not None:
        lrs = [optimizer_groups.learning_rate(g["lr"]) for g in optimizer.param_groups if "lr" in g]
        spec = plan.optimizer_spec
        name = repr(spec.type) if spec is not None else "the host's optimizer"
        adapts = plan.optimizer_adapts_step_size
        if lrs and max(lrs) > (10.0 if adapts else 1e-2):
            causes.append(f"optimizer {name} at lr {max(lrs):g}")
    if plan.loss_weighting is not None and plan.preset.loss_weighting is not None:
        t = torch.arange(plan.num_train_timesteps)
        weights = plan.loss_weighting.weights(t, plan.alphas_cumprod, plan.prediction_type).detach().float()
        peak = float(weights[torch.isfinite(weights)].max()) if torch.isfinite(weights).any() else math.inf
        if peak > 20.0:
            causes.append(f"loss weighting {plan.preset.loss_weighting.type!r} with weights up to {peak:.3g}")
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


def report(plan: Plan) -> dict[str, Any]:
    data = plan.audit.report()
    if plan.built_optimizer is not None:
        spec = plan.optimizer_spec
        learned = plan.trainable_parameters()
        tensors = [*learned, *(plan.loss_weighting.buffers() if plan.loss_weighting is not None else [])]
        data["optimizer"] = {
            "strategy": spec.type if spec is not None else "(host default)",
            "fell_back": plan.optimizer_fell_back,
            **optimizer_groups.describe(plan.built_optimizer, learned, tensors),
        }
    alphas = plan.alphas_cumprod  # on the CPU: no device sync
    data["schedule"] = {
        "zero_terminal_snr": plan.preset.schedule.zero_terminal_snr,
        "alpha_cumprod_first": float(alphas[0]),
        "alpha_cumprod_last": float(alphas[-1]),  # 0 under zero-terminal SNR
        "prediction_type": plan.prediction_type,
    }
    if plan.ema_tracker is not None:
        data["ema"] = plan.ema_tracker.record()
    diverged = plan.divergence.record()
    if diverged is not None:
        data["divergence"] = diverged
    data["completed"] = plan.failure is None and diverged is None
    data["problems"] = problems(plan, data)
    return data


def write(
    plan: Plan, output_dir: Path, host: dict[str, Any], sections: dict[str, Any], name: str | None = None, announce: bool = True
) -> Path:
    data = report(plan)
    data["host"] = {**data.get("host", {}), **host}
    data.update(sections)
    return write_data(data, output_dir, plan.streams.rank, name=name, announce=announce)


# what every audit.json holds at its top level, whichever host wrote it and however the run ended
AUDIT_KEYS = ("steps", "completed", "strategies", "host", "problems")
REFUSED = "refused before training: "  # how a refusal's problem starts


def write_before_plan(
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
    ``problem`` as the one problem. Written as a plan's audit is (``write_data``)."""
    strategies = preset_strategies(preset) if preset is not None else {}
    data = {"steps": 0, "completed": False, "strategies": strategies, "host": host, "problems": [problem]}
    return write_data(data, output_dir, rank, name=name, announce=announce)


def write_data(
    data: dict[str, Any], output_dir: str | Path, rank: int, *, name: str | None = None, announce: bool = True
) -> Path:
    """An audit (a plan's, or a host's refusal before any plan: ``steps`` 0, the refusal first in
    ``problems``) as JSON: ``audit.json`` on rank 0, ``audit-rank<N>.json`` on the others, or
    ``name`` (a failed run's audit beside another run's record)."""
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
