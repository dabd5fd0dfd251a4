"""Where the kohya adapter's ``audit.json`` goes, and the audit of a run refused before training.

A refused run writes an audit too (``steps`` 0, the refusal in ``problems``), in kohya's
``--output_dir`` when the arguments name one, so a missing audit never stands for a refusal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sdplug.log import logger

HOST_NAME = "kohya sd-scripts"


def audit_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / ("audit.json" if rank == 0 else f"audit-rank{rank}.json")


def write(report: dict[str, Any], output_dir: str | Path, rank: int) -> Path:
    path = audit_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report["steps"] == 0 and report["problems"][:1] and report["problems"][0].startswith("refused"):
        logger.info(f"the refusal is in {path}")  # its message follows as the error
    elif report["problems"]:
        logger.warning(f"AUDIT PROBLEMS in {path}: {'; '.join(report['problems'])}")
    return path


def refusal(message: str, *, preset=None, version: str | None = None, script: str | None = None) -> dict[str, Any]:
    """The audit of a run sdplug refused before its first step."""
    strategies = {}
    if preset is not None:
        strategies = {
            "noise": [s.type for s in preset.noise],
            "caption": [s.type for s in preset.caption],
            "timesteps": [preset.timesteps.type] if preset.timesteps else [],
            "loss_weighting": [preset.loss_weighting.type] if preset.loss_weighting else [],
        }
    return {
        "steps": 0,
        "completed": False,  # as sdplug's own trainer writes a refused run
        "strategies": strategies,
        "host": {"name": HOST_NAME, "version": version, "script": script, "rules": []},
        "problems": [f"refused before training: {message}"],
    }


def output_dir_from_args(script_args: list[str]) -> str | None:
    """kohya's ``--output_dir`` from a script's arguments, or from its ``--config_file``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_dir")
    parser.add_argument("--config_file")
    known, _ = parser.parse_known_args(script_args)
    if known.output_dir or not known.config_file:
        return known.output_dir
    from sdplug.errors import PresetError
    from sdplug.hosts.kohya.config_bridge import read_kohya_config

    config = known.config_file if known.config_file.endswith(".toml") else known.config_file + ".toml"  # as kohya reads it
    try:
        return read_kohya_config(Path(config)).get("output_dir")
    except PresetError:  # an unreadable config: kohya reports it itself; there is just no audit
        return None


# -- the audit of a configured run ----------------------------------------------------------------
def _host(adapter) -> dict[str, Any]:
    return {"name": HOST_NAME, "version": adapter.version.name, "script": adapter.script, "rules": adapter.rules}


def write_refusal(adapter, exc: BaseException) -> Path | None:
    """The audit of a run the adapter refused while configuring (no step ran)."""
    output_dir = getattr(adapter.args, "output_dir", None)
    if not output_dir:
        return None
    refused = refusal(str(exc), preset=adapter.preset, version=adapter.version.name, script=adapter.script)
    refused["host"] = {**_host(adapter), **adapter.flag_report}
    return write(refused, output_dir, adapter.rank)


def _learned_weighting(adapter) -> dict[str, Any]:
    plan, optimizer = adapter.plan, adapter.optimizer
    learned = {id(p) for p in plan.trainable_parameters()}
    if not learned:
        return {}
    lrs = [g["lr"] for g in optimizer.param_groups if any(id(p) in learned for p in g["params"])]
    network = getattr(plan.loss_weighting, "network", None)
    tensors = [*network.parameters(), *network.buffers()] if network is not None else []
    # proof that the weighting trains: it is in the optimizer, in a group with a non-zero lr,
    # and all its tensors (buffers too) are where that group's parameters are
    return {
        "learned_weighting_parameters": len(learned),
        "learned_weighting_lr": lrs,
        "learned_weighting_devices": sorted({str(t.device) for t in tensors}),
    }


def _problems(adapter, data: dict[str, Any]) -> list[str]:
    """What the run's report (``data``, the plan's audit report) shows the hooks did not do."""
    preset = adapter.preset
    problems = []
    if adapter.failure is not None:
        problems.append(f"sd-scripts stopped with an exception: {adapter.failure}")
    # a training step's noise call: main's validation draws are not in the audit
    if preset.noise and not any(entry["calls"] for entry in data["noise"]["applied"]):
        problems.append("noise hook never ran")
    if preset.loss_weighting and data["loss_weighting"]["calls"] == 0:
        problems.append("loss weighting never ran")
    if preset.caption and data["caption"]["samples"] == 0:
        problems.append("caption transforms never ran")
    if preset.optimizer and adapter.optimizer is None:
        problems.append("optimizer hook never ran")
    if preset.attention and adapter.attention_record is None:
        problems.append("attention hook never ran")
    return problems


def write_run(adapter) -> Path | None:
    """``audit.json`` of a configured run (at exit, after training or a crash)."""
    from sdplug.strategies.optimizer import state_bytes

    if adapter.plan is None or adapter.args is None or not getattr(adapter.args, "output_dir", None):
        return None
    audit, optimizer = adapter.plan.audit, adapter.optimizer
    if optimizer is not None:
        audit.record_host(
            optimizer={
                "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                "state_bytes_per_trainable_parameter": round(state_bytes(optimizer) / max(adapter.trainable_count, 1), 4),
                "trainable_parameters": adapter.trainable_count,
                "learning_rates": sorted({g["lr"] for g in optimizer.param_groups}),
                **_learned_weighting(adapter),
            }
        )
    if adapter.attention_record is not None:
        audit.record_host(attention=adapter.attention_record)
    data = audit.report()
    data["host"] = {**_host(adapter), "prediction_type": adapter.plan.prediction_type, **adapter.flag_report}
    data["completed"] = adapter.failure is None  # the script ran to its end
    data["problems"] = _problems(adapter, data)
    path = write(data, adapter.args.output_dir, adapter.rank)
    if adapter.rank == 0:
        logger.info(f"audit ({path}):\n{audit.summary()}")
    return path
